"""Ray Data pipelines over Parquet shards: read_parquet -> decode -> train or val transforms -> batches.

Rows come out as {"image": uint8 3xHxW, "label": uint8 HxW} (val also "id"): a quarter of float32's bytes
through the object store. `train_collate` / `val_collate` turn a batch into float32 N x 3 x H x W in [0, 1]
and int64 N x H x W tensors in the consumer's iterator threads. Every shard's
sha256 is checked against the manifest when a dataset is built, so a damaged shard is an error naming it.
Train augmentation is a pure function of (seed, pass over the data, sample id): reproducible, and new
on every epoch. Val keeps manifest order and is deterministic.

In a Ray Train loop: `ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=B,
collate_fn=train_collate)`, and for val `...iter_torch_batches(batch_size=B, collate_fn=val_collate)` (which
keeps the string ids); pass `dataset_config=ingest_config()` to the trainer so val keeps its order there too.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.collate_fn import NumpyBatchCollateFn

from data import shards
from data.classes import IGNORE_INDEX
from data.codec import decode_image, decode_label
from data.errors import DataError
from data.transforms import (
    check_ignore_as,
    check_scale_range,
    fit_size,
    ignored_as,
    reference_crop,
    to_chw,
    to_float,
    train_augment,
    val_resize,
)

# Rows decoded per output batch: a 473x473 uint8 image plus label is ~0.9 MB, so outputs stream in ~7 MB.
MAP_BATCH_ROWS = 8
# Encoded rows per read block when shards are split to give every CPU work: a decode task should
# take well over Ray's per-task cost (tens of ms on 2 cores). Shards are split only when there are
# fewer of them than twice the cluster's CPUs; split blocks stream less evenly than whole files.
DECODE_BLOCK_ROWS = 32
# Val views (see val_dataset): training's fit-and-pad, and the two evaluation protocols of `eval.protocol`.
VAL_PROTOCOLS = ("fit", "reference", "full")
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


def _read(uri: str, manifest: dict, shuffle, block_rows: int | None = None):
    import ray
    import ray.data

    if not manifest["shards"]:
        raise DataError(f"{uri}: the manifest lists no shards")
    fs, base = shards.filesystem(uri)
    paths = [f"{base}/{shard['file']}" for shard in manifest["shards"]]
    if block_rows is not None:
        blocks = max(len(paths), -(-manifest["total_rows"] // block_rows))
    else:
        wanted = 2 * int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else len(paths)
        blocks = max(len(paths), min(wanted, -(-manifest["total_rows"] // DECODE_BLOCK_ROWS)))
    context = ray.data.DataContext.get_current().copy()
    # The V1 Parquet reader: V2's per-pass file listing task costs ~1 s on every epoch on a 2-CPU node.
    context.use_datasource_v2 = False
    # Without per-operator reservations: with them, a 2-CPU node ran one decode task at a time (the read
    # operator's share sits idle), ~0.6x the throughput. Object-store backpressure still applies.
    context.op_resource_reservation_enabled = False
    with ray.data.DataContext.current(context):
        ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, shuffle=shuffle,
                                   override_num_blocks=blocks)
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


def _permuted(table: pa.Table, *, seed: int, pass_index: int) -> pa.Table:
    """The (still encoded) rows of a block in an order seeded by the pass and the block's first id."""
    if table.num_rows < 2:
        return table
    rng = np.random.default_rng([seed, pass_index, _id_key(table.column("id")[0].as_py())])
    return table.take(rng.permutation(table.num_rows))


def _chunks(table: pa.Table) -> Iterator[tuple[list, list, list]]:
    """(ids, encoded images, encoded labels) of MAP_BATCH_ROWS rows at a time."""
    for start in range(0, table.num_rows, MAP_BATCH_ROWS):
        part = table.slice(start, MAP_BATCH_ROWS)
        yield part.column("id").to_pylist(), part.column("image").to_pylist(), part.column("label").to_pylist()


def _outputs(count: int, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    height, width = (size, size) if isinstance(size, int) else size
    return np.empty((count, 3, height, width), np.uint8), np.empty((count, height, width), np.uint8)


def _train_rows(table: pa.Table, *, crop_size: int, scale_range: tuple[float, float], seed: int) -> Iterator[dict]:
    """A whole read block (so the map fuses into the read task): shuffle it, then decode and augment."""
    pass_index = _pass_index(seed)
    for ids, encoded_images, encoded_labels in _chunks(_permuted(table, seed=seed, pass_index=pass_index)):
        images, labels = _outputs(len(ids), crop_size)
        for row, (sample_id, image, label) in enumerate(zip(ids, encoded_images, encoded_labels, strict=True)):
            rng = np.random.default_rng([seed, pass_index, _id_key(sample_id)])
            augmented = train_augment(decode_image(image), decode_label(label), crop_size=crop_size,
                                      scale_range=scale_range, rng=rng)
            to_chw(*augmented, out=(images[row], labels[row]))
        yield {"image": images, "label": labels}


def _val_rows(table: pa.Table, *, size: int, protocol: str = "fit", ignore_as: int | None = None) -> Iterator[dict]:
    """A whole read block, in order: decode, then the protocol's view (see val_dataset)."""
    for ids, encoded_images, encoded_labels in _chunks(table):
        images, labels = _outputs(len(ids), size)
        rows = {"id": np.asarray(ids, dtype=object), "image": images, "label": labels}
        if protocol == "full":
            rows["label_full"] = np.empty(len(ids), dtype=object)
            rows["content"] = np.empty((len(ids), 2), np.int32)
        for row, (image, label) in enumerate(zip(encoded_images, encoded_labels, strict=True)):
            image, label = decode_image(image), decode_label(label)
            if ignore_as is not None:
                label = ignored_as(label, ignore_as)
            view = reference_crop if protocol == "reference" else val_resize
            to_chw(*view(image, label, size=size), out=(images[row], labels[row]))
            if protocol == "full":
                rows["label_full"][row] = label
                rows["content"][row] = fit_size(*label.shape, size)
        yield rows


def train_dataset(uri: str, *, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0):
    """Training rows: random scale, pad, crop_size x crop_size random crop and flip; shards and rows shuffled."""
    from ray.data import FileShuffleConfig

    check_scale_range(scale_range)
    manifest = checked_manifest(uri)
    ds = _read(uri, manifest, FileShuffleConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(
        _train_rows, fn_kwargs={"crop_size": crop_size, "scale_range": tuple(scale_range), "seed": seed},
        batch_size=None, batch_format="pyarrow",
    )


def val_dataset(uri: str, *, size: int, limit: int | None = None, block_rows: int | None = None,
                protocol: str = "fit", ignore_as: int | None = None):
    """Val rows in manifest order, in one of three views (`protocol`); first `limit` rows.

    "fit": resized to fit size x size (bilinear image, nearest label), padded (mean colour, ignore value).
    "reference": the reference code's evaluation: short side resized to size (the crop size), centre
    size x size crop, scored there. "full": image and label as "fit" (the model input, and the label the
    attacks use), and also the label at the image's original size ("label_full") and the image's height
    and width inside the padded input ("content"), so that predictions are scored at the original size
    (the segmentation toolkits' protocol). Images of different sizes then share a batch as one padded model
    input and original labels padded with the ignore value (ValCollate), which no score counts.
    ignore_as counts the ignore value as that class (the reference protocol scores VOC's 255 borders as
    background, 0). block_rows splits the shards into blocks of about that many rows (e.g. the SEA batch
    size, so that a pool of actors shares the images evenly and a retried block is small); by default a
    block is a whole shard.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit = {limit}: must be >= 1 (or None for all rows)")
    if protocol not in VAL_PROTOCOLS:
        raise DataError(f"protocol = {protocol!r}: must be one of {', '.join(VAL_PROTOCOLS)}")
    if ignore_as is not None:
        try:
            check_ignore_as(ignore_as)
        except ValueError as error:
            raise DataError(str(error)) from None
    manifest = checked_manifest(uri)
    ds = _read(uri, manifest, None, block_rows)
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(_val_rows, fn_kwargs={"size": size, "protocol": protocol, "ignore_as": ignore_as},
                        batch_size=None, batch_format="pyarrow")
    return ds if limit is None else ds.limit(limit)


def full_labels(labels) -> tuple[np.ndarray, np.ndarray]:
    """Labels of different sizes -> int64 N x H x W (each top-left, padded with the ignore value to the
    largest height and width) and their sizes, int64 N x 2."""
    sizes = np.asarray([np.shape(label) for label in labels], np.int64).reshape(-1, 2)
    height, width = sizes.max(0) if len(sizes) else (0, 0)
    out = np.full((len(sizes), height, width), IGNORE_INDEX, np.int64)
    for row, label in enumerate(labels):
        out[row, :label.shape[0], :label.shape[1]] = label
    return out, sizes


class TrainCollate(NumpyBatchCollateFn):
    """iter_torch_batches collate: uint8 rows -> float32 N x 3 x H x W in [0, 1] and int64 N x H x W tensors."""

    def __call__(self, batch: dict) -> dict:
        import torch

        images, labels = to_float(batch["image"], batch["label"])
        return {"image": torch.from_numpy(images), "label": torch.from_numpy(labels)}


class ValCollate(TrainCollate):
    """As TrainCollate, and the ids as a list of str (strings cannot become tensors); rows of the "full"
    protocol also give "score_label" / "score_size" (full_labels) and "content" (int64 N x 2)."""

    def __call__(self, batch: dict) -> dict:
        import torch

        out = {"id": [str(i) for i in batch["id"]], **super().__call__(batch)}
        if "label_full" in batch:
            labels, sizes = full_labels(batch["label_full"])
            out.update(score_label=torch.from_numpy(labels), score_size=torch.from_numpy(sizes),
                       content=torch.from_numpy(np.asarray(batch["content"], np.int64).reshape(-1, 2)))
        return out


train_collate = TrainCollate()
val_collate = ValCollate()


def ingest_config(split: tuple[str, ...] = ("train",), ordered: tuple[str, ...] = ("val",)):
    """Ray Train DataConfig: split the `split` datasets across workers; the `ordered` ones keep their order."""
    import ray.train
    from ray.data import ExecutionOptions

    return ray.train.DataConfig(
        datasets_to_split=list(split),
        execution_options={name: ExecutionOptions(preserve_order=True) for name in ordered},
    )
