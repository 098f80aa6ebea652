"""The main job end to end: resume after an interrupt, a killed SEA actor, object storage, `ray job submit`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import PYTHON, REPO, S3_ENV, TINY_CONFIG

SCRIPT = REPO / "experiments" / "pir_at_sweep.py"

# A sweep of two 1-2 epoch trials on 16 generated training images (plus 4 held out for selection) from a backbone
# the pretrain stage makes in 2 steps: seconds per trial, every stage exercised.
TINY = [
    "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.image_size=32",
    "data.synthetic.train_images=20", "data.select_images=4", "data.synthetic.val_images=8", "data.crop_size=64",
    "data.val_size=128", "train.batch_size=8", "train.epochs=1", "train.warmup_epochs=0",
    "train.proxy_iterations=2", "sweep.params={train.attack.steps: [0, 1]}",
    "sea.eps=[8]", "sea.iterations=3", "sea.images=8", "sea.batch_size=4", "sea.max_actors=1",
]


def sweep_command(*overrides: str) -> list[str]:
    return [PYTHON, str(SCRIPT), *TINY, *overrides]


def mlflow_runs(uri: str, experiment: str = "pir-at-demo"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("run_role") == "trial"]
    return client, parents, children


def epochs_logged(storage: Path, sweep: str = "demo") -> dict[str, list[int]]:
    """Per trial, the epochs its TorchTrainer reported (from the run's epochs.jsonl)."""
    out = {}
    for log in sorted((storage / sweep / "trials").glob("*/*/epochs.jsonl")):  # trials/<start>/<trial>/
        out[log.parent.name] = [json.loads(line)["epoch"] for line in log.read_text().splitlines() if line.strip()]
    return out


@pytest.mark.slow
@pytest.mark.fault
def test_interrupted_sweep_resumes_without_repeating_finished_trials(tmp_path, repo_env):
    storage, db = tmp_path / "ray_results", tmp_path / "mlruns.db"
    overrides = [f"data.shards={tmp_path}/shards", f"sweep.storage_path={storage}", f"tracking.uri=sqlite:///{db}",
                 "train.epochs=2"]
    log = tmp_path / "first.log"  # a file, not a pipe: a full pipe would stall the driver
    with open(log, "w") as out:
        proc = subprocess.Popen(sweep_command(*overrides), cwd=tmp_path, env=repo_env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None \
                and not list((storage / "demo" / "trials").glob("*/t01_*")):
            time.sleep(0.2)  # the second trial's trainer has started: the first one has finished
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted" in output and "--resume" in output
    first = epochs_logged(storage)
    t00 = next(name for name in first if name.startswith("t00_"))
    assert first[t00] == [1, 2]
    t00_log = next((storage / "demo" / "trials").glob(f"*/{t00}/epochs.jsonl"))
    stamp = t00_log.stat().st_mtime_ns

    resumed = subprocess.run(sweep_command(*overrides, "--resume"), cwd=tmp_path, env=repo_env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    after = epochs_logged(storage)
    assert after[t00] == [1, 2] and t00_log.stat().st_mtime_ns == stamp  # not trained again
    t01 = next(name for name in after if name.startswith("t01_"))
    assert after[t01][-1] == 2 and sorted(set(after[t01])) == [1, 2]
    _, parents, children = mlflow_runs(f"sqlite:///{db}")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == sorted([t00, t01])
    for child in children:
        assert "sea_miou_eps8" in child.data.metrics and child.info.status == "FINISHED"


@pytest.fixture
def trained_checkpoint(tmp_path, demo_shards) -> tuple[object, str]:
    """A demo config over the session's shards and a checkpoint folder of a (seeded) model."""
    import torch

    from orchestrator.config import load_config, resolve_paths, with_values
    from trainables.pir_at import PirAt
    from trainables.report_keys import CHECKPOINT_FILE

    config = with_values(resolve_paths(load_config(TINY_CONFIG), REPO), {
        "data.shards": demo_shards, "sea.eps": [8], "sea.iterations": 40, "sea.images": 16, "sea.batch_size": 4,
        "sea.min_actors": 2, "sea.max_actors": 2,
    })
    torch.manual_seed(0)
    state = PirAt(config.train, config.model, config.data.num_classes, steps_per_epoch=1).state_dict(epoch=1)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save(state, folder / CHECKPOINT_FILE)
    return config, str(folder)


@pytest.mark.slow
@pytest.mark.fault
def test_killed_sea_actor_changes_nothing(trained_checkpoint, repo_env):
    import psutil
    import ray

    from orchestrator.sea_pool import score_checkpoint

    config, checkpoint = trained_checkpoint
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        undisturbed = score_checkpoint(config, checkpoint)
        killed: dict[str, float] = {}

        def scorer_pids() -> set[int]:
            return {p.pid for p in psutil.process_iter(["cmdline"])
                    if "SeaScorer" in " ".join(p.info["cmdline"] or [])
                    and (p.info["cmdline"] or [""])[0].startswith("ray::")}

        earlier = scorer_pids()  # the undisturbed run's actors, possibly still shutting down

        def kill_one_scorer():
            deadline = time.time() + 120
            while time.time() < deadline:
                fresh = sorted(scorer_pids() - earlier)
                if fresh:
                    time.sleep(3.0)  # past loading the checkpoint, inside its first batches
                    os.kill(fresh[0], signal.SIGKILL)
                    killed["pid"], killed["at"] = fresh[0], time.time()
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=kill_one_scorer, daemon=True)
        thread.start()
        disturbed = score_checkpoint(config, checkpoint)
        finished = time.time()
        thread.join(timeout=5)
    finally:
        ray.shutdown()
    assert "pid" in killed, "no SEA actor was found to kill"
    assert killed["at"] < finished - 1.0, "the actor was killed only as scoring ended"
    assert killed["pid"] not in disturbed.scored_by  # whatever it had in hand was scored again elsewhere
    print(f"\nkilled SEA actor pid {killed['pid']} {finished - killed['at']:.1f}s before scoring ended; "
          f"undisturbed {undisturbed.seconds:.1f}s, disturbed {disturbed.seconds:.1f}s")
    assert disturbed.images == undisturbed.images == 16
    assert disturbed.by_eps == undisturbed.by_eps


@pytest.mark.slow
def test_demo_sweep_keeps_everything_in_s3(tmp_path, s3_bucket, repo_env):
    import boto3

    env = {**repo_env, **S3_ENV, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
    db = tmp_path / "mlruns.db"
    result = subprocess.run(
        sweep_command(f"data.shards={s3_bucket}/shards", f"sweep.storage_path={s3_bucket}/ray",
                      f"tracking.artifact_location={s3_bucket}/mlflow", f"tracking.uri=sqlite:///{db}"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    bucket = s3_bucket[len("s3://"):]
    keys = [obj["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for obj in page.get("Contents", [])]
    joined = "\n".join(keys)
    for split in ("train", "val"):
        assert f"shards/{split}/manifest.json" in keys and f"shards/{split}/part-00000.parquet" in keys
    for trial in ("t00_steps=0", "t01_steps=1"):
        for name in ("epochs.jsonl", "epoch_0001/state.pt"):
            assert any(re.fullmatch(rf"ray/demo/trials/[^/]+/{re.escape(trial)}/{name}", k) for k in keys), joined
    assert any(k.startswith("ray/demo/") and "experiment_state" in k for k in keys), joined
    _, parents, children = mlflow_runs(f"sqlite:///{db}")
    assert len(parents) == 1 and len(children) == 2
    for run in [*parents, *children]:
        assert run.info.artifact_uri.startswith(f"{s3_bucket}/mlflow/")
    parent_prefix = parents[0].info.artifact_uri[len(s3_bucket) + 1:]
    for name in ("config.yaml", "summary.csv", "summary.md"):
        assert f"{parent_prefix}/{name}" in keys, joined
    for child in children:
        prefix = child.info.artifact_uri[len(s3_bucket) + 1:]
        for name in ("config.yaml", "checkpoint.txt", "sea_miou_vs_eps.png", "examples_eps8.png"):
            assert f"{prefix}/{name}" in keys, joined
        assert child.data.tags["checkpoint_uri"].startswith(f"{s3_bucket}/ray/demo/trials/")
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_sweep_submitted_as_ray_job_logs_to_mlflow_server(ray_head, tmp_path):
    from .mlflow_server import mlflow_server

    with mlflow_server(tmp_path, str(tmp_path / "artifacts")) as uri:
        job_id = f"sweep-{tmp_path.name[-12:]}-{int(time.time())}"
        submitted = ray_head.submit(
            "python", "experiments/pir_at_sweep.py", *TINY, f"data.shards={tmp_path}/shards",
            f"sweep.storage_path={tmp_path}/ray_results", f"tracking.uri={uri}", submission_id=job_id, timeout=900)
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
        assert ray_head.job_info(job_id)["status"] == "SUCCEEDED"
        client, parents, children = mlflow_runs(uri)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(c.info.run_name for c in children) == ["t00_steps=0", "t01_steps=1"]
        for child in children:
            assert child.data.params["attack_steps"] in ("0", "1") and child.data.params["backbone"]
            assert {"clean_miou", "clean_aacc", "sea_miou_eps8", "sea_aacc_eps8", "sea_mce-bal_miou_eps8",
                    "train_hours", "attack_hours"} <= set(child.data.metrics)
            assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1]
