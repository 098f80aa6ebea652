"""Benchmark: PIR-AT step time inside a Ray Train worker vs the same loop in a plain process, same run.

Both sides run `trainables.pir_at.PirAt` with the same config and the same torch thread count; the plain side
is fed decoded batches from memory, the Ray side streams them through the Ray Data pipeline (so data wait is
part of what is measured there). Plain and Ray runs alternate (plain, Ray, plain, Ray, ..., plain); each Ray
run's ratio is taken against the mean of the plain runs around it, and the median over rounds is reported,
so the machine's drift cancels. Prints steps/s of each and the steady-state ratio (epochs after the first;
target >= 0.95), the Ray side's split of step time into attack / forward-backward / optimizer / data wait
(target: data wait < 5%), and, as its own figure, Ray Data's start-up per epoch: the time from building an
epoch's dataset to its first batch (the worker overlaps it with validation and checkpointing, but an epoch of a
few steps pays it nearly in full). The ratio with that start-up added to every epoch is printed beside the
steady one: with epochs of few steps, that is the number to look at. The last line holds the ratios.

    python experiments/benchmarks/train_step.py [--epochs 3] [--threads 1] [--rounds 3] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.config import DEFAULT_CONFIG, load_config, resolve_paths, with_values  # noqa: E402
from orchestrator.data_stage import prepare_data  # noqa: E402


def plain_batches(config, steps: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Decoded, augmented training batches held in memory (the plain loop's data costs nothing)."""
    from data.shards import iter_samples
    from data.transforms import train_transform

    rng = np.random.default_rng(0)
    samples = list(iter_samples(f"{config.data.shards}/train"))
    batches = []
    for step in range(steps):
        pairs = [train_transform(img, lab, crop_size=config.data.crop_size, scale_range=config.data.scale_range,
                                 rng=rng)
                 for _, img, lab in (samples[(step * batch + i) % len(samples)] for i in range(batch))]
        batches.append({"image": torch.from_numpy(np.stack([p[0] for p in pairs])),
                        "label": torch.from_numpy(np.stack([p[1] for p in pairs]))})
    return batches


def run_plain(config, batches: list[dict[str, torch.Tensor]], epochs: int, threads: int) -> dict[str, float]:
    from trainables.pir_at import PirAt

    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed)
    trainer = PirAt(config.train, config.model, config.data.num_classes, len(batches))
    per_epoch = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        stats = trainer.train_epoch(batches, epoch)
        per_epoch.append((time.perf_counter() - started, stats))
    seconds = sum(s for s, _ in per_epoch[1:])  # the first epoch warms up
    steps = sum(st.steps for _, st in per_epoch[1:])
    return {"steps_per_s": steps / seconds, "step_s": seconds / steps}


def data_startup(config, epochs: int) -> list[float]:
    """Seconds from building each epoch's training dataset to its first batch, as a one-worker trial builds it."""
    from data.epoch_order import worker_positions
    from data.pipeline import load_train_rows, train_collate, train_dataset
    from orchestrator.train import steps_per_epoch

    rows = load_train_rows(f"{config.data.shards}/train")
    batch = config.train.batch_size
    positions = worker_positions(steps=steps_per_epoch(rows.total_rows, batch), global_batch=batch, world_size=1,
                                 rank=0)
    seconds = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        ds = train_dataset(rows, crop_size=config.data.crop_size, scale_range=tuple(config.data.scale_range),
                           seed=config.train.seed, epoch=epoch, positions=positions)
        next(iter(ds.iter_torch_batches(batch_size=batch, prefetch_batches=2, collate_fn=train_collate)))
        seconds.append(time.perf_counter() - started)
    return seconds


def run_ray(config, epochs: int, threads: int, storage: str, name: str) -> dict[str, float]:
    import ray

    from orchestrator.train import build_trainer, fit

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    try:
        config = with_values(config, {"cluster.workers": 1, "cluster.cpus_per_worker": threads})
        outcome = fit(build_trainer(config, name=name, storage_path=storage))
        startup = data_startup(config, epochs)
    finally:
        ray.shutdown()
    rows = [r for r in outcome.history if int(r["epoch"]) > 1]
    step_time = {k: sum(float(r[f"time_{k}_s"]) for r in rows) for k in ("attack", "forward_backward",
                                                                          "optimizer", "data")}
    steps = sum(int(r["steps"]) for r in rows)
    seconds = sum(float(r["epoch_s"]) for r in rows)
    total = sum(step_time.values())
    return {"steps_per_s": steps / seconds, "step_s": seconds / steps, "epoch_steps": steps / len(rows),
            "startup_s": statistics.median(startup[1:] or startup),
            **{f"frac_{k}": v / total for k, v in step_time.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per side; the first is warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training loop, both sides")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Ray runs, each between two plain runs (default 3; the median ratio counts)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve_paths(load_config(args.config, args.overrides), Path.cwd())
        config = with_values(config, {"train.epochs": args.epochs, "train.val_every": args.epochs})
        prepare_data(config)
        from data.shards import read_manifest
        from orchestrator.train import steps_per_epoch

        steps = steps_per_epoch(int(read_manifest(f"{config.data.shards}/train")["total_rows"]),
                                config.train.batch_size)
        print(f"PIR-AT step: {config.model.decoder}/{config.model.backbone}, crop {config.data.crop_size}, "
              f"batch {config.per_worker_batch}, PGD steps {config.train.attack.steps}, {args.threads} thread(s), "
              f"{steps} steps/epoch x {args.epochs} epochs (first is warm-up)", flush=True)
        batches = plain_batches(config, steps, config.per_worker_batch)  # decoded once, reused by every plain run
        plains = [run_plain(config, batches, args.epochs, args.threads)]
        rays = []
        for round_ in range(args.rounds):
            rays.append(run_ray(config, args.epochs, args.threads, tmp, name=f"bench{round_}"))
            plains.append(run_plain(config, batches, args.epochs, args.threads))
    # Each Ray run is compared with the mean of the plain runs just before and after it (drift cancels).
    ratios = [ray["steps_per_s"] / ((plains[i]["steps_per_s"] + plains[i + 1]["steps_per_s"]) / 2)
              for i, ray in enumerate(rays)]
    ratio = statistics.median(ratios)
    print("plain process : " + ", ".join(f"{p['steps_per_s']:.3f}" for p in plains)
          + f" steps/s (runs in order; median {statistics.median(p['step_s'] for p in plains) * 1000:.0f} ms/step)")
    print("Ray Train     : " + ", ".join(f"{r['steps_per_s']:.3f}" for r in rays)
          + f" steps/s (between them; median {statistics.median(r['step_s'] for r in rays) * 1000:.0f} ms/step)")
    print(f"ratio Ray/plain: {ratio:.3f} steady (median of " + ", ".join(f"{r:.3f}" for r in ratios)
          + "; target >= 0.95)")
    split = {k: statistics.mean(r[k] for r in rays) for k in rays[0] if k.startswith("frac_")}
    print("Ray step split: " + ", ".join(f"{k[5:]} {100 * v:.1f}%" for k, v in split.items())
          + " (mean over Ray runs; target: data < 5%)")
    # An epoch that pays Ray Data's start-up in full: its steps take epoch_steps * step_s + startup_s.
    startup = statistics.median(r["startup_s"] for r in rays)
    with_startup = [ray["epoch_steps"] / (ray["epoch_steps"] * ray["step_s"] + ray["startup_s"])
                    / ((plains[i]["steps_per_s"] + plains[i + 1]["steps_per_s"]) / 2) for i, ray in enumerate(rays)]
    epoch_steps = rays[0]["epoch_steps"]
    print(f"Ray Data start-up per epoch: {startup:.2f} s to the first batch (median; "
          + ", ".join(f"{r['startup_s']:.2f}" for r in rays) + f" s per run), {epoch_steps:.0f} steps/epoch here; "
          f"Ray/plain with it paid every epoch: {statistics.median(with_startup):.3f}")
    print(f"ratios Ray/plain (target >= 0.95): steady {ratio:.3f}, start-up paid every epoch "
          f"{statistics.median(with_startup):.3f}; data wait {100 * split['frac_data']:.1f}% (target < 5%); "
          f"start-up {startup:.2f} s/epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
