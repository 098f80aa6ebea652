"""Ray Data pipelines over Parquet shards: training epochs in a fixed order, val/selection rows in manifest order.

Rows come out as {"id", "image": uint8 3xHxW, "label": uint8 HxW}: a quarter of float32's bytes through the
object store. `train_collate` / `val_collate` turn a batch into float32 N x 3 x H x W in [0, 1] and int64
N x H x W tensors in the consumer's iterator threads. Every shard's sha256 is checked against the manifest
when it is first read, so a damaged shard is an error naming it.

Training: `load_train_rows` puts the encoded split into the object store once per trial; each worker then
builds `train_dataset(rows, epoch=e, positions=...)` per epoch with the positions `data.epoch_order` gives it,
so what each worker sees, in which order and with which crop, is a function of (seed, epoch, position) only.
Val and selection rows keep manifest order (pass `dataset_config=ingest_config()` to a trainer).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.collate_fn import NumpyBatchCollateFn

from data import shards
from data.classes import IGNORE_INDEX
from data.codec import decode_image, decode_label
from data.epoch_order import epoch_order, sample_rng
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


def _read(uri: str, manifest: dict, block_rows: int | None = None, num_cpus: float = 1.0):
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
        ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None,
                                   override_num_blocks=blocks, ray_remote_args={"num_cpus": num_cpus})
    return ds.select_columns(["id", "image", "label"])


def _chunks(table: pa.Table) -> Iterator[tuple[list, list, list]]:
    """(ids, encoded images, encoded labels) of MAP_BATCH_ROWS rows at a time."""
    for start in range(0, table.num_rows, MAP_BATCH_ROWS):
        part = table.slice(start, MAP_BATCH_ROWS)
        yield part.column("id").to_pylist(), part.column("image").to_pylist(), part.column("label").to_pylist()


def _outputs(count: int, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    height, width = (size, size) if isinstance(size, int) else size
    return np.empty((count, 3, height, width), np.uint8), np.empty((count, height, width), np.uint8)


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


@dataclass(frozen=True)
class TrainRows:
    """The training split's encoded rows in Ray's object store: one object per shard, read and checked once.

    Workers on a node share the node's copy (zero-copy reads), so an epoch in any order reads no file. A node
    that decodes pulls the shards it needs once (at most the whole encoded split: about 1.5 GB for VOC-aug,
    3 GB for ADE20K), and every trial that runs at the same time holds its own copy.
    """

    uri: str
    shard_refs: tuple
    offsets: tuple[int, ...]  # shard i holds rows offsets[i] .. offsets[i + 1] - 1

    @property
    def total_rows(self) -> int:
        return self.offsets[-1]


def load_train_rows(uri: str, *, threads: int = 4) -> TrainRows:
    """Read every training shard (sha256 and row count checked against the manifest) into the object store."""
    import ray

    manifest = shards.read_manifest(uri)
    if not manifest["shards"]:
        raise DataError(f"{uri}: the manifest lists no shards")

    def read(shard: dict):
        table = shards.read_shard(shards.join(uri, shard["file"]), shard["sha256"], shard["rows"])
        return ray.put(table.select(["id", "image", "label"]))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        refs = tuple(pool.map(read, manifest["shards"]))
    offsets = tuple(int(n) for n in np.cumsum([0] + [shard["rows"] for shard in manifest["shards"]]))
    return TrainRows(uri, refs, offsets)


def _train_rows(batch: dict[str, np.ndarray], *, shard_refs: tuple, offsets: tuple[int, ...], seed: int,
                epoch: int, crop_size: int, scale_range: tuple[float, float]) -> Iterator[dict]:
    """Decode and augment the rows at the given positions of the epoch, in their order, MAP_BATCH_ROWS at a time."""
    import ray

    rows, positions = batch["row"], batch["position"]
    shard_of = np.searchsorted(offsets, rows, side="right") - 1
    needed = sorted(set(shard_of.tolist()))
    tables = dict(zip(needed, ray.get([shard_refs[i] for i in needed]), strict=True))
    columns = {i: (t.column("id"), t.column("image"), t.column("label")) for i, t in tables.items()}
    for start in range(0, len(rows), MAP_BATCH_ROWS):
        stop = min(start + MAP_BATCH_ROWS, len(rows))
        images, labels = _outputs(stop - start, crop_size)
        ids = []
        for out, j in enumerate(range(start, stop)):
            (id_col, image_col, label_col), local = columns[shard_of[j]], int(rows[j] - offsets[shard_of[j]])
            ids.append(id_col[local].as_py())
            augmented = train_augment(
                decode_image(image_col[local].as_py()), decode_label(label_col[local].as_py()),
                crop_size=crop_size, scale_range=scale_range,
                rng=sample_rng(seed=seed, epoch=epoch, position=int(positions[j])),
            )
            to_chw(*augmented, out=(images[out], labels[out]))
        yield {"id": np.asarray(ids, dtype=object), "image": images, "label": labels}


def train_dataset(rows: TrainRows | str, *, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0),
                  seed: int = 0, epoch: int = 1, positions: np.ndarray | None = None, num_cpus: float = 1.0):
    """One epoch's training rows in order: the epoch order's `positions` (default: all of them), each
    randomly scaled, padded, cropped to crop_size x crop_size and flipped as (seed, epoch, position) says.

    `rows` is a `load_train_rows` result (or a shard URI, loaded here). Decoding runs in parallel Ray Data
    tasks of `num_cpus` CPUs each; the output keeps the positions' order, so the batches do not depend on task
    timing.
    """
    import ray.data

    check_scale_range(scale_range)
    if isinstance(rows, str):
        rows = load_train_rows(rows)
    order = epoch_order(rows.total_rows, seed=seed, epoch=epoch)
    positions = np.arange(rows.total_rows) if positions is None else np.asarray(positions, dtype=np.int64)
    if len(positions) == 0:
        raise DataError(f"{rows.uri}: no training positions for this worker (batch larger than the split?)")
    items = [{"position": int(p), "row": int(order[p])} for p in positions]
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // DECODE_BLOCK_ROWS))
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        _train_rows, batch_size=None, batch_format="numpy",
        fn_kwargs={"shard_refs": rows.shard_refs, "offsets": rows.offsets, "seed": seed, "epoch": epoch,
                   "crop_size": crop_size, "scale_range": tuple(scale_range)},
        num_cpus=num_cpus,
    )


def val_dataset(uri: str, *, size: int, limit: int | None = None, block_rows: int | None = None,
                protocol: str = "fit", ignore_as: int | None = None, num_cpus: float = 1.0):
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
    block is a whole shard. Reading and decoding run as Ray Data tasks of `num_cpus` CPUs each.
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
    ds = _read(uri, manifest, block_rows, num_cpus)
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(_val_rows, fn_kwargs={"size": size, "protocol": protocol, "ignore_as": ignore_as},
                        batch_size=None, batch_format="pyarrow", num_cpus=num_cpus)
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


def ingest_config(split: tuple[str, ...] = (), ordered: tuple[str, ...] = ("select",)):
    """Ray Train DataConfig: split the `split` datasets across workers; the `ordered` ones keep their order.

    Training data is not among them: each worker builds its own epochs (`train_dataset`)."""
    import ray.train
    from ray.data import ExecutionOptions

    return ray.train.DataConfig(
        datasets_to_split=list(split),
        execution_options={name: ExecutionOptions(preserve_order=True) for name in ordered},
    )
