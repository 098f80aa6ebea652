"""PIR-AT on Ray Train: two nodes stay in sync, a killed worker resumes exactly, training learns."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from orchestrator.config import load_config, resolve_paths, with_values
from orchestrator.train import TrialFailed, build_trainer, fit
from trainables.pir_at import CheckpointMismatch, read_state

from .conftest import REPO

DEMO = REPO / "tests" / "tiny.yaml"


def demo_config(shards: str, storage: Path, **values):
    base = resolve_paths(load_config(DEMO), REPO)
    values = {"data.shards": shards, "sweep.storage_path": str(storage), **values}
    return with_values(base, values)


@pytest.fixture
def two_node_cluster(repo_env):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def local_ray(repo_env):
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def evaluate_checkpoint(config, checkpoint_path: str) -> float:
    """Clean mIoU of a saved state on the selection images, computed outside Ray Train."""
    import numpy as np

    from data.shards import iter_samples
    from data.transforms import val_transform
    from trainables import metrics
    from trainables.models import build_from_config
    from trainables.pir_at import load_model_state

    k = config.data.num_classes
    model = build_from_config(config.model, k)
    load_model_state(model, read_state(os.path.join(checkpoint_path, "state.pt")), "test")
    model.eval()
    conf = torch.zeros(k, k, dtype=torch.long)
    samples = list(iter_samples(config.data.shards.rstrip("/") + "/select"))
    batch = config.per_worker_batch
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            pairs = [val_transform(img, lab, size=config.data.val_size) for _, img, lab in samples[start:start + batch]]
            x = torch.from_numpy(np.stack([p[0] for p in pairs]))
            y = torch.from_numpy(np.stack([p[1] for p in pairs]))
            conf += metrics.confusion_matrix(model(x).argmax(1), y, k, ignore_index=255)
    return metrics.scores(conf)["miou"]


@pytest.mark.slow
@pytest.mark.multinode
def test_two_workers_on_two_nodes_stay_identical(demo_shards, tmp_path, two_node_cluster):
    config = demo_config(demo_shards, tmp_path, **{
        "cluster.workers": 2, "cluster.placement_strategy": "STRICT_SPREAD", "train.epochs": 2,
        "train.attack.steps": 1,
    })
    outcome = fit(build_trainer(config, name="two_nodes", storage_path=str(tmp_path)))
    final = outcome.final_metrics
    assert final["epoch"] == 2
    nodes = final["worker_nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1], nodes
    prints = final["param_fingerprints"].split(",")
    assert len(prints) == 2 and prints[0] == prints[1], prints
    last = outcome.final_checkpoint
    miou = evaluate_checkpoint(config, last.path)
    assert miou == pytest.approx(final["select_clean_miou"], abs=1e-3), (miou, final["select_clean_miou"])


@pytest.mark.slow
@pytest.mark.fault
def test_killed_worker_resumes_from_last_epoch(demo_shards, tmp_path, local_ray):
    # Larger crops make an epoch last several seconds, so the kill lands inside epoch 2.
    config = demo_config(demo_shards, tmp_path, **{
        "cluster.workers": 2, "train.epochs": 3, "cluster.max_failures": 1, "train.attack.steps": 2,
        "data.crop_size": 160,
    })
    run = tmp_path / "runs" / "killme"
    killed: dict[str, object] = {}

    def kill_in_epoch_two():
        import psutil

        deadline = time.time() + 300
        pids = []
        while time.time() < deadline and not pids:  # Ray titles actor processes ray::<Class>.<method>
            pids = sorted(p.pid for p in psutil.process_iter(["cmdline"])
                          if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker"))
            time.sleep(0.2)
        log = run / "epochs.jsonl"  # written by the controller once every worker has reported the epoch
        while time.time() < deadline and not (log.exists() and '"epoch": 1' in log.read_text()):
            time.sleep(0.05)
        time.sleep(0.5)
        killed["epoch_2_done_before_kill"] = (run / "epoch_0002").exists()
        os.kill(pids[-1], signal.SIGKILL)
        killed["pid"] = pids[-1]

    thread = threading.Thread(target=kill_in_epoch_two, daemon=True)
    thread.start()
    outcome = fit(build_trainer(config, name="killme", storage_path=str(tmp_path / "runs")))
    thread.join(timeout=5)
    assert "pid" in killed, "the test did not find a worker to kill"
    assert killed["epoch_2_done_before_kill"] is False
    epochs = [int(row["epoch"]) for row in outcome.history]
    assert epochs == [1, 2, 3], epochs
    resumed = {int(row["epoch"]): int(row["resumed_from_epoch"]) for row in outcome.history}
    assert resumed == {1: 0, 2: 1, 3: 1}, resumed


def test_mismatched_checkpoint_is_named(tmp_path):
    from trainables.pir_at import PirAt

    base = load_config(DEMO)
    small = PirAt(base.train, base.model, 21, steps_per_epoch=2)
    other = with_values(base, {"model.backbone": "convnext_femto"})
    big = PirAt(other.train, other.model, 21, steps_per_epoch=2)
    with pytest.raises(CheckpointMismatch, match="does not fit the configured model") as info:
        big.load_state_dict(small.state_dict(epoch=1), source="resume_from x")
    assert "with another shape" in str(info.value) or "missing" in str(info.value)
    assert "convnext_atto" in str(info.value)


def test_nan_loss_stops_without_checkpoint(demo_shards, tmp_path, local_ray):
    config = demo_config(demo_shards, tmp_path, **{"train.epochs": 2, "train.lr": 1e30, "train.warmup_epochs": 0})
    with pytest.raises(TrialFailed, match=r"non-finite training loss at epoch \d+ step \d+"):
        fit(build_trainer(config, name="nan", storage_path=str(tmp_path)))
    assert not list(Path(tmp_path, "nan").glob("**/state.pt"))


def _train_in_process(config, epochs: int) -> dict[str, float]:
    """Train PirAt in this process on the demo shards (no Ray): same loop as the Ray workers run."""
    import numpy as np

    from data.shards import iter_samples
    from data.transforms import train_transform, val_transform
    from trainables.pir_at import PirAt

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = list(iter_samples(config.data.shards + "/train"))
    val = list(iter_samples(config.data.shards + "/val"))
    b = config.per_worker_batch
    steps = len(train) // b
    trainer = PirAt(config.train, config.model, config.data.num_classes, steps)

    def batches(samples, transform):
        for start in range(0, len(samples) - b + 1, b):
            pairs = [transform(img, lab) for _, img, lab in samples[start:start + b]]
            yield {"image": torch.from_numpy(np.stack([p[0] for p in pairs])),
                   "label": torch.from_numpy(np.stack([p[1] for p in pairs]))}

    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(train))
        shuffled = [train[i] for i in order]
        trainer.train_epoch(batches(shuffled, lambda i, lab: train_transform(
            i, lab, crop_size=config.data.crop_size, scale_range=config.data.scale_range, rng=rng)), epoch)
    return trainer.validate(batches(val, lambda i, lab: val_transform(i, lab, size=config.data.val_size)),
                            proxy_iterations=10, seed=0)


@pytest.mark.slow
def test_training_learns_and_adversarial_training_is_more_robust(demo_shards, tmp_path):
    torch.set_num_threads(1)  # one thread: the same arithmetic, hence the same figures, on every run
    # 10 epochs, as the demo: at 8 the 2-step model had not converged (clean mIoU 0.87) and led the clean-trained
    # one by 0.047 robust mIoU under torch 2.15 (0.647 vs 0.600); at 10 it is 0.744 vs 0.620 (2026-12-03).
    epochs = 10
    common = {"train.epochs": epochs, "train.lr": 0.003, "train.attack.eps": 8, "train.attack.step_size": 4,
              "train.warmup_epochs": 0.5}
    clean = _train_in_process(demo_config(demo_shards, tmp_path, **common, **{"train.attack.steps": 0}), epochs)
    adv = _train_in_process(demo_config(demo_shards, tmp_path, **common, **{"train.attack.steps": 2}), epochs)
    print(f"\nk=0: clean mIoU {clean['select_clean_miou']:.3f}, robust proxy mIoU at 8/255 "
          f"{clean['select_robust_miou']:.3f} (APGD-CE, 10 iterations)")
    print(f"k=2: clean mIoU {adv['select_clean_miou']:.3f}, robust proxy mIoU at 8/255 {adv['select_robust_miou']:.3f}")
    # Chance: a constant prediction scores at most 1/K of the classes present (K = 4 here): mIoU <= 0.25.
    assert clean["select_clean_miou"] > 0.75
    assert adv["select_clean_miou"] > 0.75
    assert adv["select_robust_miou"] > clean["select_robust_miou"] + 0.05
