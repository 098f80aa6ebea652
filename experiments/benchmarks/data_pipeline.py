"""Train-pipeline throughput: Ray Data (2 CPUs) against a plain single-process loop, measured in one run.

Both read the same Parquet shards of generated ~500x375 JPEGs and run the same decode
(data.codec) and augmentation (data.transforms.train_transform, 473x473 crops) into float32
N x 3 x H x W batches; the script prints images/s of each and their ratio (target: >= 1.0).

    PYTHONPATH=. python experiments/benchmarks/data_pipeline.py [--images 128] [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.codec import decode_image, decode_label  # noqa: E402
from data.prepare import prepare_split  # noqa: E402
from data.shards import join, read_manifest, read_shard  # noqa: E402
from data.synthetic import generate_voc  # noqa: E402
from data.transforms import train_transform  # noqa: E402


def plain_loop(uri: str, *, crop_size: int, batch_size: int, seed: int, epoch: int) -> int:
    """Single process: read each shard, decode, augment, stack batches; returns images produced."""
    rng = np.random.default_rng([seed, epoch])
    count = 0
    images, labels = [], []
    for shard in read_manifest(uri)["shards"]:
        table = read_shard(join(uri, shard["file"]), shard["sha256"], shard["rows"])
        for image, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True):
            x, y = train_transform(decode_image(image), decode_label(label), crop_size=crop_size, rng=rng)
            images.append(x)
            labels.append(y)
            if len(images) == batch_size:
                batch = np.stack(images), np.stack(labels)
                count += len(batch[0])
                images, labels = [], []
    if images:
        count += len(np.stack(images))
    return count


def ray_loop(dataset, *, batch_size: int) -> int:
    count = 0
    for batch in dataset.iter_torch_batches(batch_size=batch_size):
        assert batch["image"].dtype.is_floating_point and batch["label"].dtype.is_signed
        count += batch["image"].shape[0]
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="generated training images (default 128)")
    parser.add_argument("--epochs", type=int, default=3, help="passes per pipeline; the first is warm-up (default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=473)
    parser.add_argument("--shard-rows", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray (default 2)")
    parser.add_argument("--workdir", help="where data and shards go (default: a temporary folder)")
    args = parser.parse_args(argv)

    import ray

    from data.pipeline import train_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        root = generate_voc(work / "voc", seed=0, train_images=args.images, val_images=1, num_classes=5)
        uri = str(work / "shards" / "train")
        prepare_split("voc", root, "train", uri, shard_rows=args.shard_rows, workers=2, progress=False)
        print(f"data: {args.images} generated 500x375 JPEGs in {len(read_manifest(uri)['shards'])} shards; "
              f"crops {args.crop_size}, batch {args.batch_size}, {args.epochs} passes (first = warm-up)")

        plain_times = []
        for epoch in range(args.epochs):
            start = time.perf_counter()
            n = plain_loop(uri, crop_size=args.crop_size, batch_size=args.batch_size, seed=0, epoch=epoch)
            plain_times.append(time.perf_counter() - start)
            assert n == args.images

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            dataset = train_dataset(uri, crop_size=args.crop_size, seed=0)
            ray_times = []
            for _ in range(args.epochs):
                start = time.perf_counter()
                n = ray_loop(dataset, batch_size=args.batch_size)
                ray_times.append(time.perf_counter() - start)
                assert n == args.images, n
        finally:
            ray.shutdown()

    steady = slice(1, None) if args.epochs > 1 else slice(None)
    plain_rate = args.images * len(plain_times[steady]) / sum(plain_times[steady])
    ray_rate = args.images * len(ray_times[steady]) / sum(ray_times[steady])
    print(f"plain loop (1 process)   : {plain_rate:7.1f} images/s  (per pass: "
          + ", ".join(f"{t:.2f}s" for t in plain_times) + ")")
    print(f"Ray Data ({args.cpus} CPUs)        : {ray_rate:7.1f} images/s  (per pass: "
          + ", ".join(f"{t:.2f}s" for t in ray_times) + ")")
    print(f"ratio Ray / plain         : {ray_rate / plain_rate:7.2f}  (target >= 1.0; warm passes only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
