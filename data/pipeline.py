"""Ray Data pipelines over Parquet shards: read_parquet -> decode -> train or val transforms -> batches.

Rows come out as {"image": float32 3xHxW in [0, 1], "label": int64 HxW} (val also "id"). Every shard's
sha256 is checked against the manifest when a dataset is built, so a damaged shard is an error naming it.
Train augmentation is a pure function of (seed, pass over the data, sample id): reproducible, and new
on every epoch. Val keeps manifest order and is deterministic.

In a Ray Train loop: `ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=B)`; pass
`dataset_config=ingest_config()` to the trainer so val keeps its order there too.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from data import shards
from data.codec import decode_image, decode_label
from data.errors import DataError
from data.transforms import train_transform, val_transform

# Rows per map call: a 473x473 float32 image plus int64 label is ~4.5 MB, so batches stay ~36 MB.
MAP_BATCH_ROWS = 8
# Encoded rows per block handed to a decode task: small blocks spread decoding over all CPUs.
DECODE_BLOCK_ROWS = 16
_VERIFIED: dict[str, tuple] = {}


def checked_manifest(uri: str) -> dict:
    """The manifest at `uri`, after checking every shard's sha256 (cached while the files' size/mtime hold)."""
    manifest = shards.read_manifest(uri)
    fs, base = shards.filesystem(uri)
    infos = fs.get_file_info([f"{base}/{shard['file']}" for shard in manifest["shards"]])
    key = tuple((info.path, info.type == pafs.FileType.File, info.size, info.mtime_ns, shard["sha256"])
                for info, shard in zip(infos, manifest["shards"], strict=True))
    if _VERIFIED.get(uri) != key:
        shards.verify(uri)
        _VERIFIED[uri] = key
    return manifest


def _read(uri: str, manifest: dict, shuffle):
    import ray.data

    if not manifest["shards"]:
        raise DataError(f"{uri}: the manifest lists no shards")
    fs, base = shards.filesystem(uri)
    paths = [f"{base}/{shard['file']}" for shard in manifest["shards"]]
    ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, shuffle=shuffle)
    return ds.select_columns(["id", "image", "label"])


def _pass_index(seed: int) -> int:
    """Which pass over the data this is (0, 1, ...): Ray Data counts executions of the same dataset."""
    from ray.data import DataContext, RandomSeedConfig

    seeds = RandomSeedConfig(seed=seed, reseed_after_execution=True).get_seed_tuple(
        data_context=DataContext.get_current()
    )
    return int(seeds.execution_idx or 0)


def _id_key(sample_id: str) -> int:
    return zlib.crc32(sample_id.encode())


def _shuffle_rows(table: pa.Table, *, seed: int) -> pa.Table:
    """Permute the (still encoded) rows of a block, seeded by the pass and the block's first id."""
    if table.num_rows < 2:
        return table
    rng = np.random.default_rng([seed, _pass_index(seed), _id_key(table.column("id")[0].as_py())])
    return table.take(rng.permutation(table.num_rows))


def _train_batch(batch: dict, *, crop_size: int, scale_range: tuple[float, float], seed: int) -> dict:
    pass_index = _pass_index(seed)
    images, labels = [], []
    for sample_id, image, label in zip(batch["id"], batch["image"], batch["label"], strict=True):
        rng = np.random.default_rng([seed, pass_index, _id_key(sample_id)])
        x, y = train_transform(decode_image(image), decode_label(label), crop_size=crop_size,
                               scale_range=scale_range, rng=rng)
        images.append(x)
        labels.append(y)
    return {"image": np.stack(images), "label": np.stack(labels)}


def _val_batch(batch: dict, *, size: int) -> dict:
    images, labels = [], []
    for image, label in zip(batch["image"], batch["label"], strict=True):
        x, y = val_transform(decode_image(image), decode_label(label), size=size)
        images.append(x)
        labels.append(y)
    return {"id": batch["id"], "image": np.stack(images), "label": np.stack(labels)}


def train_dataset(uri: str, *, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0):
    """Training rows: random scale, pad, crop_size x crop_size random crop and flip; shards and rows shuffled."""
    from ray.data import FileShuffleConfig

    manifest = checked_manifest(uri)
    ds = _read(uri, manifest, FileShuffleConfig(seed=seed, reseed_after_execution=True))
    ds = ds.map_batches(_shuffle_rows, fn_kwargs={"seed": seed}, batch_size=None, batch_format="pyarrow")
    ds = ds.repartition(target_num_rows_per_block=DECODE_BLOCK_ROWS)
    return ds.map_batches(
        _train_batch, fn_kwargs={"crop_size": crop_size, "scale_range": tuple(scale_range), "seed": seed},
        batch_size=MAP_BATCH_ROWS, batch_format="numpy",
    )


def val_dataset(uri: str, *, size: int, limit: int | None = None):
    """Val rows in manifest order: resized to fit size x size (nearest for labels), padded; first `limit` rows."""
    if limit is not None and limit < 1:
        raise DataError(f"limit = {limit}: must be >= 1 (or None for all rows)")
    manifest = checked_manifest(uri)
    ds = _read(uri, manifest, None)
    ds.context.execution_options.preserve_order = True
    if limit is not None:
        ds = ds.limit(limit)
    ds = ds.repartition(target_num_rows_per_block=DECODE_BLOCK_ROWS)
    return ds.map_batches(_val_batch, fn_kwargs={"size": size}, batch_size=MAP_BATCH_ROWS, batch_format="numpy")


def ingest_config(split: tuple[str, ...] = ("train",), ordered: tuple[str, ...] = ("val",)):
    """Ray Train DataConfig: split the `split` datasets across workers; the `ordered` ones keep their order."""
    import ray.train
    from ray.data import ExecutionOptions

    return ray.train.DataConfig(
        datasets_to_split=list(split),
        execution_options={name: ExecutionOptions(preserve_order=True) for name in ordered},
    )
