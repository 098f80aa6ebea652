"""Train-pipeline throughput: Ray Data on N CPUs against a torch DataLoader with N worker processes, one run.

Both sides read the same Parquet shards of generated ~500x375 JPEGs, check every shard's sha256 once (Ray: when
`load_train_rows` puts them in the object store; DataLoader: `data.shards.verify` before the workers start, which
then read the files without hashing) and produce the same batches: the epoch order and every image's scale, crop
and flip come from `data.epoch_order` (seed, epoch, position), decoded by data.codec, augmented by
data.transforms.train_augment (473x473 crops), converted to float32 N x 3 x H x W and int64 labels. The first
batch of the warm-up pass is compared between the two, so a difference in work is an error, not a figure.

Printed per side: the one-time start-up (Ray: ray.init + read and verify; DataLoader: verify + worker start),
the per-pass start-up (time to the first batch, which a short epoch pays every pass), the steady-state images/s
after the first batch, and the whole-pass images/s. Passes alternate between the two so both see the same load;
each figure is the median pass after one warm-up pass each. The last line holds the ratios (target >= 1.0).

    PYTHONPATH=. python experiments/benchmarks/data_pipeline.py [--images 1024] [--passes 5] [--cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data import shards  # noqa: E402
from data.codec import decode_image, decode_label  # noqa: E402
from data.epoch_order import epoch_order, sample_rng  # noqa: E402
from data.transforms import to_chw, to_float, train_augment  # noqa: E402

TARGET = 1.0


class ShardImages(Dataset):
    """Training images of verified shards by (epoch, position), augmented exactly as data.pipeline's epochs are.

    Each worker process reads the shard files it needs once (no hashing: the caller verified them) and keeps
    the encoded rows, as Ray's object store keeps them for the Ray side.
    """

    def __init__(self, uri: str, manifest: dict, *, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0),
                 seed: int = 0):
        self.uri, self.crop_size, self.scale_range, self.seed = uri, crop_size, tuple(scale_range), seed
        self.files = [shards.join(uri, shard["file"]) for shard in manifest["shards"]]
        self.offsets = np.cumsum([0] + [shard["rows"] for shard in manifest["shards"]])
        self._tables: dict[int, tuple] = {}
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _columns(self, shard: int) -> tuple:
        if shard not in self._tables:
            fs, path = shards.filesystem(self.files[shard])
            with fs.open_input_file(path) as handle:
                table = pq.read_table(handle, columns=["image", "label"])
            self._tables[shard] = (table.column("image"), table.column("label"))
        return self._tables[shard]

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        epoch, position = key
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self), seed=self.seed, epoch=epoch)}
        row = int(self._orders[epoch][position])
        shard = int(np.searchsorted(self.offsets, row, side="right") - 1)
        images, labels = self._columns(shard)
        local = row - int(self.offsets[shard])
        return to_chw(*train_augment(decode_image(images[local].as_py()), decode_label(labels[local].as_py()),
                                     crop_size=self.crop_size, scale_range=self.scale_range,
                                     rng=sample_rng(seed=self.seed, epoch=epoch, position=position)))


class EpochPositions(Sampler):
    """(epoch, position) for every position of the epoch set in `epoch` (iterated in the main process, so a
    persistent worker pool sees each new epoch)."""

    def __init__(self, total: int):
        self.total, self.epoch = total, 1

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        return ((self.epoch, position) for position in range(self.total))


def collate(items: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """uint8 rows -> float32 N x 3 x H x W in [0, 1] and int64 N x H x W, as data.pipeline.train_collate."""
    images, labels = to_float(np.stack([i for i, _ in items]), np.stack([label for _, label in items]))
    return {"image": torch.from_numpy(images), "label": torch.from_numpy(labels)}


def data_loader(uri: str, *, workers: int, batch_size: int, crop_size: int, seed: int = 0):
    """(loader, its sampler): shards verified once here, then `workers` persistent processes decode and augment."""
    manifest = shards.read_manifest(uri)
    shards.verify(uri)
    dataset = ShardImages(uri, manifest, crop_size=crop_size, seed=seed)
    sampler = EpochPositions(len(dataset))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
                        multiprocessing_context="spawn" if workers else None)
    return loader, sampler


def timed_pass(batches) -> tuple[int, float, int, float, dict]:
    """Iterate a pass: (images, seconds to the first batch, images in it, seconds in all, the first batch)."""
    count, first_s, first_count, first = 0, None, 0, None
    start = time.perf_counter()
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
        count += batch["image"].shape[0]
        if first_s is None:
            first_s, first_count, first = time.perf_counter() - start, count, batch
    return count, first_s, first_count, time.perf_counter() - start, first


def make_shards(work: Path, images: int, shard_rows: int) -> str:
    """Generated VOC-layout JPEGs sharded to Parquet under `work` (reused when present); returns the train URI."""
    from data.prepare import prepare_split
    from data.synthetic import generate_voc

    uri = str(work / "shards" / "train")
    if not (work / "shards" / "train" / "manifest.json").exists():
        root = generate_voc(work / "voc", seed=0, train_images=images, val_images=1, num_classes=5)
        prepare_split("voc", root, "train", uri, shard_rows=shard_rows, workers=2, progress=False)
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="generated training images (default 1024)")
    parser.add_argument("--passes", type=int, default=5,
                        help="timed passes per pipeline, interleaved, after one warm-up each (default 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=473)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2,
                        help="each side's CPU budget: Ray's CPUs, the DataLoader's worker processes (default 2)")
    parser.add_argument("--workdir", help="where data and shards go, reused when present (default: a temporary folder)")
    args = parser.parse_args(argv)

    import ray

    from data.pipeline import load_train_rows, train_collate, train_dataset

    with tempfile.TemporaryDirectory() as tmp:
        uri = make_shards(Path(args.workdir or tmp), args.images, args.shard_rows)
        total = int(shards.read_manifest(uri)["total_rows"])
        print(f"data: {total} generated 500x375 JPEGs in {len(shards.read_manifest(uri)['shards'])} shards; crops "
              f"{args.crop_size}, batch {args.batch_size}; {args.cpus} CPUs each side; {args.passes} timed passes "
              "each, interleaved, after one warm-up", flush=True)
        load_before = os.getloadavg()[0]

        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        ray_init_s = time.perf_counter() - start
        loader = None
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            start = time.perf_counter()
            rows = load_train_rows(uri)  # read and verified once, as a trial does
            ray_read_s = time.perf_counter() - start

            start = time.perf_counter()
            loader, sampler = data_loader(uri, workers=args.cpus, batch_size=args.batch_size,
                                          crop_size=args.crop_size)
            loader_verify_s = time.perf_counter() - start

            runs: dict[str, list[tuple[float, float, float]]] = {"ray": [], "loader": []}
            warm_first: dict[str, float] = {}
            for epoch in range(1, args.passes + 2):  # pass 1 of each is warm-up (worker start, page cache)
                sampler.epoch = epoch
                count, first_s, first_count, seconds, loader_first = timed_pass(loader)
                assert count == total, (count, total)
                loader_run = (first_s, seconds, (seconds - first_s) / (count - first_count) * total)
                dataset = train_dataset(rows, crop_size=args.crop_size, seed=0, epoch=epoch)
                count, first_s, first_count, seconds, ray_first = timed_pass(
                    dataset.iter_torch_batches(batch_size=args.batch_size, collate_fn=train_collate))
                assert count == total, (count, total)
                ray_run = (first_s, seconds, (seconds - first_s) / (count - first_count) * total)
                if epoch == 1:
                    for name in ("image", "label"):
                        if not torch.equal(loader_first[name], ray_first[name]):
                            raise RuntimeError(f"the first batch's {name}s differ between Ray Data and the DataLoader")
                    warm_first = {"loader": loader_run[0], "ray": ray_run[0]}
                else:
                    runs["loader"].append(loader_run)
                    runs["ray"].append(ray_run)
            load_after = os.getloadavg()[0]
        finally:
            del loader
            ray.shutdown()

    def median(name: str, index: int) -> float:
        return statistics.median(run[index] for run in runs[name])

    pass_rate = {name: total / median(name, 1) for name in runs}
    steady_rate = {name: total / median(name, 2) for name in runs}
    first = {name: median(name, 0) for name in runs}
    print(f"start-up, once      : Ray Data {ray_init_s + ray_read_s:.2f} s (ray.init {ray_init_s:.2f} s, read and "
          f"verify {ray_read_s:.2f} s); DataLoader {loader_verify_s + warm_first['loader']:.2f} s (verify "
          f"{loader_verify_s:.2f} s, {args.cpus} workers start to first batch {warm_first['loader']:.2f} s)")
    print(f"start-up per pass   : Ray Data {first['ray']:.2f} s to the first batch, DataLoader {first['loader']:.2f} s "
          "(median pass)")
    for label, name in ((f"Ray Data ({args.cpus} CPUs)", "ray"), (f"DataLoader ({args.cpus} workers)", "loader")):
        print(f"{label:24s}: steady {steady_rate[name]:7.1f} images/s, whole pass {pass_rate[name]:7.1f} images/s "
              "(passes: " + ", ".join(f"{run[1]:.2f}s" for run in runs[name]) + ")")
    print(f"machine load average (1 min): {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs")
    steady, whole = steady_rate["ray"] / steady_rate["loader"], pass_rate["ray"] / pass_rate["loader"]
    print(f"ratios Ray Data / DataLoader (target >= {TARGET:.1f}): steady {steady:.2f}, whole pass {whole:.2f}; "
          f"per-pass start-up {first['ray']:.2f} s vs {first['loader']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
