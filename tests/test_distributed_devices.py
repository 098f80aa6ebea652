"""Multi-GPU readiness checked on CPU: every tensor the PIR-AT loop hands to a collective lives on the model's
device (NCCL accepts CUDA tensors only), the backend follows the scaling config, SyncBatchNorm on several GPUs."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from orchestrator.config import load_config, with_values
from trainables.pir_at import use_sync_batchnorm

from .conftest import REPO

DEMO = REPO / "tests" / "tiny.yaml"


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from trainables.pir_at import PirAt

    sys.path.insert(0, str(REPO / "experiments" / "benchmarks"))
    from gpu_suite import recorded_collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    seen: list[dict] = []
    try:
        config = with_values(load_config(DEMO), {"train.attack.steps": 1})
        torch.manual_seed(0)
        trainer = PirAt(config.train, config.model, 4, steps_per_epoch=2)
        trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.module)
        trainer.world_size = world
        generator = torch.Generator().manual_seed(rank)
        batches = [{"image": torch.rand(2, 3, 64, 64, generator=generator),
                    "label": torch.randint(0, 4, (2, 64, 64), generator=generator)} for _ in range(2)]
        # A tensor made without a device lands on 'meta' here, as it would land on the CPU in a GPU run.
        torch.set_default_device("meta")
        try:
            with recorded_collectives(seen):
                trainer.train_epoch(batches, epoch=1)
                trainer.validate(batches, proxy_iterations=2, rank=rank, world_size=world)
        finally:
            torch.set_default_device(None)
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump({"seen": seen, "model": str(next(trainer.module.parameters()).device)}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.realpath
@pytest.mark.slow
def test_collectives_get_tensors_on_the_model_device(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        ops = {entry["op"] for entry in report["seen"]}
        assert {"all_reduce", "broadcast"} <= ops, ops  # the divergence check, BatchNorm sync, confusion sums
        wrong = [entry for entry in report["seen"] if entry["device"] != report["model"]]
        assert not wrong, f"rank {rank}: collectives got tensors off the model's device {report['model']}: {wrong}"


@pytest.mark.realpath
def test_process_group_backend_follows_the_scaling_config():
    from orchestrator.train import process_group_backend

    base = load_config(DEMO)
    assert process_group_backend(base) == "gloo"
    assert process_group_backend(with_values(base, {"cluster.gpus_per_worker": 1, "cluster.workers": 8})) == "nccl"


@pytest.mark.realpath
def test_sync_batchnorm_only_on_several_gpus():
    assert use_sync_batchnorm("cuda", 8) and use_sync_batchnorm(torch.device("cuda:3"), 2)
    assert not use_sync_batchnorm("cuda", 1)
    assert not use_sync_batchnorm("cpu", 8)
