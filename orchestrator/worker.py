"""The Ray Train worker of a PIR-AT trial: its epochs' data, DDP, checkpoints and per-epoch reports.

The PyTorch side (attack, step, validation, state) is `trainables.pir_at.PirAt`; this module only feeds it
and hands its results to Ray. What a worker trains on in an epoch comes from `data.epoch_order`, so a run
resumed from a checkpoint replays exactly the epochs an uninterrupted run would have trained.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from data.epoch_order import worker_positions
from data.pipeline import train_collate, train_dataset, val_collate
from orchestrator.config import Config
from trainables.pir_at import (
    PirAt,
    TrainingDiverged,
    epoch_seed,
    fingerprint,
    read_state,
    seed_everything,
    use_sync_batchnorm,
)
from trainables.report_keys import CHECKPOINT_FILE, PROXY_METRIC, RANK_METRIC


def _gather(value: str, world_size: int) -> str:
    """Comma-joined values of every rank (rank order); the value itself on one worker."""
    if world_size == 1:
        return value
    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, value)
    return ",".join(values)


def _started(make_batches: Callable[[], Iterable]) -> Iterator:
    """Batches whose iterator starts now, in a thread: the data pipeline's per-pass start-up (~0.1 s of
    scheduling on a small node) overlaps validation and checkpointing instead of the next epoch."""
    box: dict[str, Any] = {}

    def start() -> None:
        try:
            box["iterator"] = iter(make_batches())
            box["first"] = next(box["iterator"], None)
        except BaseException as exc:  # handed to the consumer below
            box["error"] = exc

    thread = threading.Thread(target=start, name="next-epoch-data", daemon=True)
    thread.start()

    def batches() -> Iterator:
        thread.join()
        if "error" in box:
            raise box["error"]
        if box["first"] is not None:
            yield box["first"]
            yield from box["iterator"]

    return batches()


def _restore(trainer: PirAt, loop_config: dict[str, Any], rank: int) -> int:
    """Load the run's latest checkpoint (or `resume_from`); returns the last epoch it holds (0: none)."""
    checkpoint = ray.train.get_checkpoint()
    source = "the run's latest checkpoint"
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
        source = f"resume_from {loop_config['resume_from']}"
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = read_state(os.path.join(folder, CHECKPOINT_FILE))
    done = trainer.load_state_dict(state, source)
    print(f"[rank {rank}] resumed from {source} after epoch {done}", flush=True)
    return done


def _setup(loop_config: dict[str, Any], rank: int, world: int) -> PirAt:
    """The worker's PirAt: threads, the same initial weights on every rank, SyncBatchNorm on GPUs, DDP."""
    config: Config = loop_config["config"]
    threads = loop_config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    seed_everything(config.train.seed)  # same initial weights on every rank
    device = ray.train.torch.get_device()
    trainer = PirAt(config.train, config.model, loop_config["num_classes"], loop_config["steps_per_epoch"],
                    device=device)
    if use_sync_batchnorm(device, world):
        trainer.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trainer.module)
    trainer.model = ray.train.torch.prepare_model(trainer.module, move_to_device=False)
    trainer.world_size = world
    return trainer


def _epoch_batches(loop_config: dict[str, Any], rank: int, world: int) -> Callable[[int], Callable[[], Iterable]]:
    """epoch -> a maker of this worker's batches of that epoch (its positions of the epoch's order)."""
    config: Config = loop_config["config"]
    train, data = config.train, config.data
    positions = worker_positions(steps=loop_config["steps_per_epoch"], global_batch=train.batch_size,
                                 world_size=world, rank=rank)
    pinned = ray.train.torch.get_device().type == "cuda"  # page-locked batches: the copy to the GPU is asynchronous

    def for_epoch(epoch: int) -> Callable[[], Iterable]:
        def make() -> Iterable:
            ds = train_dataset(loop_config["train_rows"], crop_size=data.crop_size,
                               scale_range=tuple(data.scale_range), seed=train.seed, epoch=epoch, positions=positions,
                               num_cpus=config.cluster.cpus_per_data_task)
            return ds.iter_torch_batches(batch_size=train.batch_size // world, prefetch_batches=2,
                                         collate_fn=train_collate, pin_memory=pinned)
        return make

    return for_epoch


def _save_and_report(trainer: PirAt, epoch: int, report: dict[str, Any], rank: int) -> None:
    """Rank 0 writes the epoch's state as a Ray checkpoint; every rank reports the epoch's metrics with it."""
    with tempfile.TemporaryDirectory() as folder:
        ckpt = None
        if rank == 0:
            torch.save(trainer.state_dict(epoch), os.path.join(folder, CHECKPOINT_FILE))
            ckpt = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point: resume if a checkpoint exists, then train, validate and checkpoint every epoch."""
    train = loop_config["config"].train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    trainer = _setup(loop_config, rank, world)
    loaded = getattr(trainer.module, "init_report", {})  # what the backbone was initialised from, for the report
    node = _gather(ray.get_runtime_context().get_node_id(), world)
    resumed_from = _restore(trainer, loop_config, rank)
    select_shard = ray.train.get_dataset_shard("select")
    epoch_batches = _epoch_batches(loop_config, rank, world)
    epochs = train.epochs
    batches = _started(epoch_batches(resumed_from + 1)) if resumed_from < epochs else None
    for epoch in range(resumed_from + 1, epochs + 1):
        seed_everything(epoch_seed(train.seed, epoch, rank))
        started = time.perf_counter()
        try:
            stats = trainer.train_epoch(batches, epoch)
        except TrainingDiverged as exc:
            return {"diverged": str(exc)}
        seconds = time.perf_counter() - started
        if epoch < epochs:  # the next epoch's data starts while this one validates and checkpoints
            batches = _started(epoch_batches(epoch + 1))
        validation = {RANK_METRIC: -1.0}
        if epoch % train.val_every == 0 or epoch == epochs:
            validation = trainer.validate(
                select_shard.iter_torch_batches(batch_size=train.batch_size // world, collate_fn=val_collate),
                proxy_iterations=train.proxy_iterations, rank=rank, world_size=world, seed=train.seed,
            )
            validation[RANK_METRIC] = validation[PROXY_METRIC]
        report = {
            "epoch": epoch,
            "loss": stats.loss_sum / max(stats.steps, 1),
            "lr": trainer.scheduler.get_last_lr()[0],
            "images_per_s": stats.images * world / seconds if seconds else 0.0,
            "epoch_s": seconds,
            "steps": stats.steps,
            "resumed_from_epoch": resumed_from,
            "worker_nodes": node,
            "placement_group": ray.get_runtime_context().get_placement_group_id() or "",
            "param_fingerprints": _gather(fingerprint(trainer.module), world),
            "init": loaded.get("init", ""),
            "init_uri": loaded.get("uri", ""),
            "seed": train.seed,
            **stats.times.as_metrics(),
            **validation,
        }
        _save_and_report(trainer, epoch, report, rank)
    return None
