"""Builds and runs the Ray Train `TorchTrainer` of one PIR-AT trial from a validated config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.callback import UserCallback

from data import shards
from data.pipeline import ingest_config, load_train_rows, val_dataset
from orchestrator.cluster import quiet_data
from orchestrator.config import Config
from trainables.report_keys import RANK_METRIC

EPOCH_LOG = "epochs.jsonl"


class EpochLog(UserCallback):
    """Controller-side callback: every report (rank 0's metrics) is appended to `epochs.jsonl` in the run's
    storage folder, so the full per-epoch history survives restarts and checkpoint retention."""

    def __init__(self, run_uri: str):
        self.uri = f"{run_uri.rstrip('/')}/{EPOCH_LOG}"

    def after_report(self, run_context, metrics, checkpoint):
        row = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str, bool))}
        row["checkpoint"] = checkpoint.path if checkpoint is not None else None
        previous = shards.read_bytes(self.uri) if shards.exists(self.uri) else b""
        shards.write_bytes(self.uri, previous + (json.dumps(row) + "\n").encode())


def read_epoch_log(run_uri: str) -> list[dict[str, Any]]:
    """The per-epoch reports of a run, in the order they were made."""
    uri = f"{run_uri.rstrip('/')}/{EPOCH_LOG}"
    if not shards.exists(uri):
        return []
    return [json.loads(line) for line in shards.read_bytes(uri).decode().splitlines() if line.strip()]


class TrialFailed(RuntimeError):
    """A trial that ended without a usable model (diverged loss, exhausted restarts)."""


@dataclass
class TrainOutcome:
    """What a finished training run hands on to SEA scoring and tracking."""

    best_checkpoint: ray.train.Checkpoint
    best_metrics: dict[str, Any]
    final_checkpoint: ray.train.Checkpoint
    final_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    path: str


def shard_uris(config: Config) -> tuple[str, str, str]:
    """Train, selection and val shard URIs under `data.shards` (selection: held out of the training split)."""
    base = config.data.shards.rstrip("/")
    return f"{base}/train", f"{base}/select", f"{base}/val"


def process_group_backend(config: Config) -> str:
    """NCCL when the workers have GPUs (every tensor handed to a collective lives on the GPU), gloo on CPUs."""
    return "nccl" if config.cluster.gpus_per_worker else "gloo"


def steps_per_epoch(train_rows: int, global_batch: int) -> int:
    """Optimizer steps per epoch (incomplete last batches are dropped on every worker)."""
    if train_rows < global_batch:
        raise ValueError(
            f"the training split has {train_rows} images, fewer than train.batch_size = {global_batch}"
        )
    return train_rows // global_batch


def scaling_config(config: Config) -> ScalingConfig:
    c = config.cluster
    resources: dict[str, float] = {"CPU": c.cpus_per_worker}
    if c.gpus_per_worker:
        resources["GPU"] = c.gpus_per_worker
    return ScalingConfig(
        num_workers=c.workers, use_gpu=bool(c.gpus_per_worker), resources_per_worker=resources,
        placement_strategy=c.placement_strategy,
    )


def build_trainer(
    config: Config,
    *,
    name: str,
    storage_path: str,
    callbacks: Sequence[Any] = (),
    resume_from: str | None = None,
    extra_loop_config: dict[str, Any] | None = None,
) -> TorchTrainer:
    """A TorchTrainer for one trial: training rows in the object store, DDP workers, best-K checkpoints ranked on
    the selection images, restarts."""
    quiet_data()
    train_uri, select_uri, _ = shard_uris(config)
    data = config.data
    rows = load_train_rows(train_uri)
    loop_config = {
        "config": config,
        "num_classes": data.num_classes,
        "train_rows": rows,
        "steps_per_epoch": steps_per_epoch(rows.total_rows, config.train.batch_size),
        "per_worker_batch": config.per_worker_batch,
        "threads": max(1, int(config.cluster.cpus_per_worker)),
        "resume_from": resume_from,
        **(extra_loop_config or {}),
    }
    datasets = {"select": val_dataset(select_uri, size=data.val_size, num_cpus=config.cluster.cpus_per_data_task)}
    run_config = RunConfig(
        name=name,
        storage_path=storage_path,
        checkpoint_config=CheckpointConfig(
            num_to_keep=config.train.keep_checkpoints,
            checkpoint_score_attribute=RANK_METRIC,
            checkpoint_score_order="max",
        ),
        failure_config=FailureConfig(max_failures=config.cluster.max_failures),
        callbacks=[EpochLog(f"{storage_path.rstrip('/')}/{name}"), *callbacks],
    )
    # Imported here: the worker's module pulls in the models (timm, torchvision), which this module's other users
    # (the Tune trial process, the Train controller that unpickles EpochLog) would otherwise import for nothing.
    from orchestrator.worker import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=process_group_backend(config)),
        scaling_config=scaling_config(config),
        run_config=run_config,
        datasets=datasets,
        dataset_config=ingest_config(),
    )


def _score(metrics: dict[str, Any]) -> float:
    """A checkpoint's rank: its robust proxy, or -1 for an epoch without validation."""
    return float(metrics.get(RANK_METRIC, -1.0))


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """A checkpoint's location as a URI any process can open (Checkpoint.path drops s3:// and gs://)."""
    scheme = {"s3": "s3://", "gcs": "gs://"}.get(checkpoint.filesystem.type_name, "")
    return f"{scheme}{checkpoint.path}"


def open_checkpoint(uri: str) -> ray.train.Checkpoint:
    """The Ray Train checkpoint at a URI written by `checkpoint_uri` (local path, s3://, gs://)."""
    import pyarrow.fs

    if "://" not in uri:
        return ray.train.Checkpoint(uri)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    return ray.train.Checkpoint(path, filesystem=filesystem)


def fit(trainer: TorchTrainer) -> TrainOutcome:
    """Run a trainer; a failed or diverged run raises TrialFailed naming the reason."""
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrialFailed(f"training failed: {exc}") from exc
    final = dict(result.metrics or {})
    if isinstance(result.return_value, dict) and "diverged" in result.return_value:
        raise TrialFailed(result.return_value["diverged"])
    if not result.best_checkpoints:
        raise TrialFailed("training reported no checkpoint")
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda item: _score(item[1]))
    history = read_epoch_log(result.path)
    return TrainOutcome(best_checkpoint, dict(best_metrics), result.checkpoint, final, history, result.path)
