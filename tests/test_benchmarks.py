"""The benchmarks measure like with like: APGD on a fixed full batch, the DataLoader side verifying shards once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.segtoy import ToySegNet, make_batch
from trainables.attacks import apgd

BENCHMARKS = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks"


def load(name: str):
    """A benchmark script as a module (they are scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # spawned DataLoader workers import the script's classes by name
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _forward_sizes(model: torch.nn.Module) -> list[int]:
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, inputs: sizes.append(int(inputs[0].shape[0])))
    return sizes


@pytest.mark.realpath
def test_apgd_early_exit_off_keeps_the_full_batch_every_iteration():
    torch.manual_seed(0)
    model = ToySegNet(num_classes=4).eval()
    x, _ = make_batch(3, seed=0, size=32)
    with torch.no_grad():
        y = model(x).argmin(1)  # every pixel misclassified from the start: 0% accuracy at the first iteration
    sizes = _forward_sizes(model)
    out = apgd(model, x, y, eps=8 / 255, n_iter=10, loss="mce", seed=0, early_exit=False)
    assert sizes == [3] * 10  # red-ε's three stages, 3 + 3 + 4 iterations, all on the whole batch
    assert (out - x).abs().amax() <= 8 / 255 + 1e-6
    sizes.clear()
    apgd(model, x, y, eps=8 / 255, n_iter=10, loss="mce", seed=0)
    assert sizes == [3, 3, 3]  # the default leaves after one iteration per stage


@pytest.mark.realpath
def test_attack_speed_times_full_batch_iterations_and_ends_with_the_ratios(capsys):
    attack_speed = load("attack_speed")
    losses = ["mce", "js"]
    assert attack_speed.main(["--size", "32", "--batch", "2", "--classes", "5", "--decoder-width", "16",
                              "--iterations", "3", "--sea-iterations", "2", "--repeats", "1", "--threads", "1",
                              "--losses", *losses]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = lines[-1]
    assert last.startswith("ratios APGD iteration / bare fwd+bwd (target <= 1.10")
    ratios = {part.split()[2]: float(part.split()[3]) for part in last.split(": ", 1)[1].split("; ")}
    assert set(ratios) == set(losses) and all(0.2 < r < 10 for r in ratios.values())
    sea_line = next(line for line in lines if line.strip().startswith("width 16 K=5:"))
    assert "images/s" in sea_line and "forward passes" in sea_line


@pytest.mark.realpath
def test_dataloader_side_verifies_each_shard_once_and_reads_every_image_each_pass(tmp_path, monkeypatch):
    data_pipeline = load("data_pipeline")
    from data import shards

    uri = data_pipeline.make_shards(tmp_path, images=12, shard_rows=4)
    hashed: list[int] = []
    real_sha256 = shards.sha256
    monkeypatch.setattr(shards, "sha256", lambda data: hashed.append(len(data)) or real_sha256(data))
    loader, sampler = data_pipeline.data_loader(uri, workers=0, batch_size=5, crop_size=32)
    seen = []
    for epoch in (1, 2):
        sampler.epoch = epoch
        batches = list(loader)
        assert [len(b["image"]) for b in batches] == [5, 5, 2]
        assert batches[0]["image"].dtype == torch.float32 and batches[0]["image"].shape[1:] == (3, 32, 32)
        assert batches[0]["label"].dtype == torch.int64
        seen.append(torch.cat([b["image"] for b in batches]))
    assert len(hashed) == 3  # three shards, hashed once (before the passes), never again
    assert not torch.equal(seen[0], seen[1])  # another epoch: another order and other crops
