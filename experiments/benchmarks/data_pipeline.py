"""Train-pipeline throughput: Ray Data (2 CPUs) against a plain single-process loop, measured in one run.

Both read the same Parquet shards of generated ~500x375 JPEGs and run the same decode
(data.codec), augmentation (data.transforms.train_augment, 473x473 crops) and conversion (uint8 rows,
data.pipeline.train_collate per batch) into float32 N x 3 x H x W and int64 batch tensors; the script
prints images/s of each and their ratio (target: >= 1.0).

    PYTHONPATH=. python experiments/benchmarks/data_pipeline.py [--images 1024] [--passes 5] [--workdir DIR]

Passes alternate between the two so both see the same load on a shared machine; each figure is
the median pass (one warm-up pass each is not timed; a Ray pass includes its per-pass start-up).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.codec import decode_image, decode_label  # noqa: E402
from data.pipeline import train_collate  # noqa: E402
from data.prepare import prepare_split  # noqa: E402
from data.shards import join, read_manifest, read_shard  # noqa: E402
from data.synthetic import generate_voc  # noqa: E402
from data.transforms import to_chw, train_augment  # noqa: E402


def plain_loop(uri: str, *, crop_size: int, batch_size: int, seed: int, epoch: int, part: int = 0,
               parts: int = 1) -> int:
    """Single process: read each shard (every `parts`-th from `part`), decode, augment, stack batches."""
    rng = np.random.default_rng([seed, epoch, part])
    count = 0
    images, labels = [], []

    def emit() -> int:
        batch = train_collate({"image": np.stack(images), "label": np.stack(labels)})  # as the Ray side converts
        images.clear()
        labels.clear()
        return len(batch["image"])

    for shard in read_manifest(uri)["shards"][part::parts]:
        table = read_shard(join(uri, shard["file"]), shard["sha256"], shard["rows"])
        for image, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True):
            x, y = to_chw(*train_augment(decode_image(image), decode_label(label), crop_size=crop_size, rng=rng))
            images.append(x)
            labels.append(y)
            if len(images) == batch_size:
                count += emit()
    if images:
        count += emit()
    return count


def two_process_loop(pool, uri: str, *, crop_size: int, batch_size: int, seed: int, epoch: int) -> int:
    """The plain loop in two processes over alternate shards: what 2 CPUs give without any framework."""
    futures = [pool.submit(plain_loop, uri, crop_size=crop_size, batch_size=batch_size, seed=seed, epoch=epoch,
                           part=part, parts=2) for part in range(2)]
    return sum(future.result() for future in futures)


def ray_loop(dataset, *, batch_size: int) -> tuple[int, float, int]:
    """One pass of iter_torch_batches; returns (images, seconds to the first batch, images in it)."""
    count, first, first_count = 0, None, 0
    start = time.perf_counter()
    for batch in dataset.iter_torch_batches(batch_size=batch_size, collate_fn=train_collate):
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
        count += batch["image"].shape[0]
        if first is None:
            first, first_count = time.perf_counter() - start, count
    return count, first, first_count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="generated training images (default 1024)")
    parser.add_argument("--passes", type=int, default=5,
                        help="timed passes per pipeline, interleaved plain/Ray after one warm-up each (default 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=473)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray (default 2)")
    parser.add_argument("--workdir", help="where data and shards go, reused when present (default: a temporary folder)")
    args = parser.parse_args(argv)

    import ray

    from data.pipeline import load_train_rows, train_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        root = generate_voc(work / "voc", seed=0, train_images=args.images, val_images=1, num_classes=5)
        uri = str(work / "shards" / "train")
        prepare_split("voc", root, "train", uri, shard_rows=args.shard_rows, workers=2, progress=False)
        print(f"data: {args.images} generated 500x375 JPEGs in {len(read_manifest(uri)['shards'])} shards; "
              f"crops {args.crop_size}, batch {args.batch_size}; {args.passes} timed passes each, interleaved")

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            rows = load_train_rows(uri)  # read and checked once, as a trial does

            load_before = os.getloadavg()[0]
            times: dict[str, list[float]] = {"plain": [], "two": [], "ray": [], "ray_steady": []}
            first_batch: list[float] = []
            options = dict(crop_size=args.crop_size, batch_size=args.batch_size, seed=0)
            with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
                for epoch in range(args.passes + 1):  # pass 0 of each is warm-up (worker start, page cache)
                    start = time.perf_counter()
                    assert plain_loop(uri, epoch=epoch, **options) == args.images
                    plain_time = time.perf_counter() - start
                    start = time.perf_counter()
                    assert two_process_loop(pool, uri, epoch=epoch, **options) == args.images
                    two_time = time.perf_counter() - start
                    start = time.perf_counter()
                    dataset = train_dataset(rows, crop_size=args.crop_size, seed=0, epoch=epoch + 1)
                    count, first, first_count = ray_loop(dataset, batch_size=args.batch_size)
                    ray_time = time.perf_counter() - start
                    assert count == args.images, count
                    if epoch:
                        times["plain"].append(plain_time)
                        times["two"].append(two_time)
                        times["ray"].append(ray_time)
                        # Rate after the first batch arrived, i.e. without Ray Data's per-pass start-up.
                        times["ray_steady"].append((ray_time - first) * args.images / (args.images - first_count))
                        first_batch.append(first)
            load_after = os.getloadavg()[0]
        finally:
            ray.shutdown()

    rates = {name: args.images / statistics.median(t) for name, t in times.items()}

    def line(label: str, name: str, note: str = "") -> None:
        print(f"{label:30s}: {rates[name]:7.1f} images/s  (passes: " + ", ".join(f"{t:.2f}s" for t in times[name])
              + ")" + note)

    line("plain loop (1 process)", "plain")
    line(f"Ray Data ({args.cpus} CPUs)", "ray")
    print(f"{'Ray Data after first batch':30s}: {rates['ray_steady']:7.1f} images/s  (first batch after "
          + ", ".join(f"{t:.2f}s" for t in first_batch) + ")")
    line("reference: plain, 2 processes", "two", "  <- what 2 CPUs allow here without a framework")
    print(f"{'ratio Ray / plain':30s}: {rates['ray'] / rates['plain']:7.2f}  (target >= 1.0; "
          f"after first batch {rates['ray_steady'] / rates['plain']:.2f}; 2 plain processes / 1: "
          f"{rates['two'] / rates['plain']:.2f})")
    print(f"machine load average (1 min): {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
