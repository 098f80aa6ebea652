"""Same seed, same numbers: two identical runs agree bit for bit, and a run killed after epoch 2 of 4 and
resumed by Ray Train ends with the uninterrupted run's weights and per-epoch metrics."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch

from orchestrator.train import build_trainer, fit
from trainables.pir_at import read_state

from .test_training import demo_config

pytestmark = [pytest.mark.slow, pytest.mark.realpath]

# Per-epoch keys that measure time or place, not the computation.
NOT_COMPARED = ("time_", "frac_", "images_per_s", "epoch_s", "worker_nodes", "placement_group", "checkpoint",
                "resumed_from_epoch")
# Two PGD steps make an epoch last seconds, so a kill sent as soon as epoch 2 is logged lands inside epoch 3.
SETTINGS = {"train.epochs": 4, "train.attack.steps": 2, "train.val_every": 1, "train.proxy_iterations": 2,
            "cluster.workers": 1, "cluster.max_failures": 1}


@pytest.fixture(scope="module")
def ray_for_module(tmp_path_factory):
    from .conftest import REPO

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def _run(shards: str, storage, name: str, on_start=None):
    config = demo_config(shards, storage, **SETTINGS)
    thread = None
    if on_start is not None:
        thread = threading.Thread(target=on_start, args=(storage / name,), daemon=True)
        thread.start()
    outcome = fit(build_trainer(config, name=name, storage_path=str(storage)))
    if thread is not None:
        thread.join(timeout=5)
    weights = read_state(os.path.join(outcome.final_checkpoint.path, "state.pt"))["model"]
    rows = [{k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)} for row in outcome.history]
    return weights, rows, outcome.history


@pytest.fixture(scope="module")
def reference_run(demo_shards, tmp_path_factory, ray_for_module):
    return _run(demo_shards, tmp_path_factory.mktemp("reference"), "reference")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_two_runs_of_one_config_are_bit_identical(demo_shards, tmp_path, reference_run):
    weights, rows, _ = reference_run
    again, again_rows, _ = _run(demo_shards, tmp_path, "again")
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert again_rows == rows
    assert _max_difference(weights, again) == 0.0


def test_run_killed_after_epoch_2_resumes_to_the_uninterrupted_result(demo_shards, tmp_path, reference_run):
    killed: dict[str, object] = {}

    def kill_after_epoch_two(run):
        import psutil

        deadline = time.time() + 300
        log = run / "epochs.jsonl"  # written by the controller once epoch 2's checkpoint is stored
        while time.time() < deadline and not (log.exists() and '"epoch": 2' in log.read_text()):
            time.sleep(0.02)
        pids = [p.pid for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")]
        killed["epoch_3_done_before_kill"] = '"epoch": 3' in log.read_text()
        os.kill(pids[-1], signal.SIGKILL)
        killed["pid"] = pids[-1]

    weights, rows, _ = reference_run
    resumed, resumed_rows, history = _run(demo_shards, tmp_path, "killed", on_start=kill_after_epoch_two)
    assert "pid" in killed and killed["epoch_3_done_before_kill"] is False
    assert {int(r["epoch"]): int(r["resumed_from_epoch"]) for r in history} == {1: 0, 2: 0, 3: 2, 4: 2}
    assert resumed_rows == rows
    assert _max_difference(weights, resumed) <= 1e-6
