"""Parquet shards and their manifest at a URI (local path, file://, s3://, gs://): read, verify, iterate.

Every shard's sha256 is in the manifest; whoever reads a shard's bytes checks them, so a damaged or
replaced shard is an error naming it, never silently different data. Credentials come from the
environment of whoever reads or writes (pyarrow's default credential chain) and are stored nowhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data.codec import decode_image, decode_label
from data.errors import DataError, ShardIntegrityError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("label", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
])
MANIFEST_KEYS = (
    "schema_version", "dataset", "split", "class_names", "num_classes", "ignore_index",
    "reduce_zero_label", "shard_rows", "total_rows", "shards",
)
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a local path, file://, s3:// or gs:// URI."""
    if uri.startswith(REMOTE_SCHEMES):
        return pafs.FileSystem.from_uri(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise DataError(f"URI {uri!r}: unsupported scheme (use a local path, file://, s3:// or gs://)")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, name: str) -> str:
    """URI of `name` inside the folder `uri`."""
    return uri.rstrip("/") + "/" + name


def is_local(uri: str) -> bool:
    """A path on this machine: no scheme, or file://; s3://, gs://, https:// and the like are not."""
    return "://" not in uri or uri.startswith("file://")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as exc:
        raise DataError(f"{uri}: not found") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; locally through a temporary name and a rename, so readers never see half a file."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if is_local(uri):
        fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str) -> list[str]:
    """Names of the files directly inside the folder `uri` (empty when it does not exist)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_bytes(rows: dict[str, list]) -> bytes:
    """Serialise shard rows (columns of SCHEMA) to Parquet bytes; encoded images are stored uncompressed."""
    table = pa.table(rows, schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="NONE", row_group_size=len(table) or 1)
    return buffer.getvalue()


def read_manifest(uri: str) -> dict:
    """The manifest at `uri`, checked for the keys and schema version this code reads."""
    manifest_uri = join(uri, MANIFEST)
    if not exists(manifest_uri):
        raise DataError(f"{manifest_uri}: not found (write the shards with `python -m data.prepare ... --out {uri}`)")
    try:
        manifest = json.loads(read_bytes(manifest_uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"{manifest_uri}: not valid JSON ({exc})") from exc
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{manifest_uri}: missing keys {', '.join(missing)}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DataError(
            f"{manifest_uri}: schema_version {manifest['schema_version']!r}, this code reads {SCHEMA_VERSION}; "
            "re-run data.prepare"
        )
    return manifest


def shard_uris(uri: str) -> list[str]:
    """URIs of the shards listed in the manifest at `uri`, in manifest order."""
    return [join(uri, shard["file"]) for shard in read_manifest(uri)["shards"]]


def read_shard(shard_uri: str, expected_sha256: str, expected_rows: int | None = None) -> pa.Table:
    """Read one shard, check its sha256 (and row count) against the manifest and return it as a table."""
    data = read_bytes(shard_uri)
    actual = sha256(data)
    if actual != expected_sha256:
        raise ShardIntegrityError(
            f"shard {shard_uri}: sha256 {actual} does not match the manifest's {expected_sha256} "
            "(damaged or replaced; re-run data.prepare to rewrite it)"
        )
    table = pq.read_table(pa.BufferReader(data))
    if expected_rows is not None and table.num_rows != expected_rows:
        raise ShardIntegrityError(f"shard {shard_uri}: {table.num_rows} rows, the manifest says {expected_rows}")
    if not table.schema.equals(SCHEMA, check_metadata=False):
        raise ShardIntegrityError(f"shard {shard_uri}: schema {table.schema} differs from {SCHEMA}")
    return table


def _verify_shard(uri: str, shard: dict) -> int:
    return read_shard(join(uri, shard["file"]), shard["sha256"], shard["rows"]).num_rows


def verify(uri: str, *, threads: int = 4) -> dict:
    """Re-check every shard's sha256, schema, row count and the total; a mismatch raises ShardIntegrityError."""
    manifest = read_manifest(uri)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        rows = list(pool.map(lambda shard: _verify_shard(uri, shard), manifest["shards"]))
    if sum(rows) != manifest["total_rows"]:
        raise ShardIntegrityError(f"{join(uri, MANIFEST)}: shards hold {sum(rows)} rows, total_rows says "
                                  f"{manifest['total_rows']}")
    return {"uri": uri, "dataset": manifest["dataset"], "split": manifest["split"],
            "shards": len(rows), "rows": sum(rows)}


def iter_samples(uri: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (id, image uint8 HxWx3, label uint8 HxW) from the shards at `uri`, in manifest order.

    Labels are as stored in the shards (VOC borders stay 255); each shard's checksum is checked first.
    """
    for shard in read_manifest(uri)["shards"]:
        table = read_shard(join(uri, shard["file"]), shard["sha256"], shard["rows"])
        for sample_id, image, label in zip(
            table.column("id").to_pylist(), table.column("image").to_pylist(), table.column("label").to_pylist(),
            strict=True,
        ):
            yield sample_id, decode_image(image), decode_label(label)
