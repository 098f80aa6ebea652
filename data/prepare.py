"""Convert a VOC / SBD-aug / ADE20K split into Parquet shards plus manifest.json at a URI (CLI and API).

Shards are built in parallel processes; each finished shard is recorded in manifest.partial.json, so a
re-run skips every shard whose source files are unchanged and whose bytes still match their sha256.

    python -m data.prepare --dataset voc --root VOCdevkit/VOC2012 --split train --out s3://bucket/voc/train
    python -m data.prepare --verify s3://bucket/voc/train
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from data import shards
from data.classes import IGNORE_INDEX, class_names
from data.errors import DataError
from data.layouts import Sample, list_samples, read_sample, split_names

PARTIAL = "manifest.partial.json"
SHARD_NAME = "part-{:05d}.parquet"
# Which rows of a split a set of shards holds: all of them, the held-out selection images, or the rest.
PARTS = ("all", "select", "rest")


def selection_ids(ids: list[str], count: int) -> set[str]:
    """The `count` ids with the smallest sha256 of the id: a fixed choice, spread over the split, that any
    process (and any later run on the same split) makes alike, whatever the listing order."""
    if not 1 <= count < len(ids):
        raise DataError(f"select_images = {count}: must be >= 1 and leave training images "
                        f"(the split has {len(ids)})")
    return set(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:count])


def _check_part(part: str, select_images: int) -> None:
    if part not in PARTS:
        raise DataError(f"part = {part!r}: must be one of {', '.join(PARTS)}")
    if part == "all" and select_images:
        raise DataError(f"select_images = {select_images} needs part 'select' or 'rest'")


def _part(samples: list[Sample], part: str, select_images: int) -> list[Sample]:
    if part == "all":
        return samples
    chosen = selection_ids([sample.id for sample in samples], select_images)
    return [sample for sample in samples if (sample.id in chosen) == (part == "select")]


def _fingerprint(samples: list[Sample], options: dict) -> str:
    """Identifies a shard's inputs: options, ids, and the size and mtime of each source file."""
    entries = []
    for sample in samples:
        stats = [sample.image.stat(), sample.label.stat()]
        entries.append([sample.id, *[(s.st_size, s.st_mtime_ns) for s in stats]])
    return hashlib.sha256(json.dumps([options, entries]).encode()).hexdigest()


def build_shard(samples: list[Sample], dataset: str, reduce_zero_label: bool, shard_uri: str) -> dict:
    """Read and check the samples, write one Parquet shard to shard_uri and return its manifest record."""
    rows: dict[str, list] = {"id": [], "image": [], "label": [], "height": [], "width": []}
    for sample in samples:
        image, label, height, width = read_sample(sample, dataset, reduce_zero_label=reduce_zero_label)
        for key, value in zip(rows, (sample.id, image, label, height, width), strict=True):
            rows[key].append(value)
    data = shards.shard_bytes(rows)
    shards.write_bytes(shard_uri, data)
    return {"file": shard_uri.rsplit("/", 1)[1], "rows": len(samples), "sha256": shards.sha256(data)}


def _previous_records(out_uri: str, options: dict) -> dict[str, dict]:
    """Shard records of an earlier run with the same options (complete manifest or partial record)."""
    for name in (shards.MANIFEST, PARTIAL):
        uri = shards.join(out_uri, name)
        if not shards.exists(uri):
            continue
        try:
            previous = json.loads(shards.read_bytes(uri))
        except json.JSONDecodeError:
            continue
        if previous.get("options") == options:
            return {record["file"]: record for record in previous.get("shards", [])}
    return {}


def _reusable(out_uri: str, record: dict | None, source: str) -> bool:
    if record is None or record.get("source") != source:
        return False
    shard_uri = shards.join(out_uri, record["file"])
    return shards.exists(shard_uri) and shards.sha256(shards.read_bytes(shard_uri)) == record["sha256"]


def _manifest(options: dict, records: list[dict], names: tuple[str, ...]) -> dict:
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "dataset": options["dataset"],
        "split": options["split"],
        "class_names": list(names),
        "num_classes": len(names),
        "ignore_index": IGNORE_INDEX,
        "reduce_zero_label": options["reduce_zero_label"],
        "part": options["part"],
        "select_images": options["select_images"],
        "shard_rows": options["shard_rows"],
        "total_rows": sum(record["rows"] for record in records),
        "image_encoding": "source file bytes, unchanged",
        "label_encoding": "single-channel PNG of class indices; 255 = ignore",
        "options": options,
        "shards": records,
    }


def prepare_split(
    dataset: str,
    root: str | Path,
    split: str,
    out_uri: str,
    *,
    shard_rows: int = 256,
    workers: int = 2,
    reduce_zero_label: bool = False,
    progress: bool = True,
    part: str = "all",
    select_images: int = 0,
    source: str | None = None,
) -> dict:
    """Write `out_uri/part-NNNNN.parquet` and `out_uri/manifest.json` for one split; returns the manifest.

    Rows: id, image (the source JPEG's bytes), label (PNG of the source class indices; with
    reduce_zero_label, ADE20K's 0 -> 255 and c -> c-1), height, width. With part 'select' only the
    `select_images` held-out images (`selection_ids`) are written, with 'rest' every other image: the
    checkpoint-selection split and the training split, disjoint by image id.
    """
    _check_options(dataset, shard_rows, workers, reduce_zero_label, part, select_images)
    samples = _part(list_samples(dataset, root, split), part, select_images)
    names = class_names(dataset, reduce_zero_label)
    options = {"dataset": dataset, "split": split, "reduce_zero_label": reduce_zero_label,
               "shard_rows": shard_rows, "schema_version": shards.SCHEMA_VERSION, "part": part,
               "select_images": select_images}
    if source is not None:
        options["source"] = source
    chunks = [samples[i:i + shard_rows] for i in range(0, len(samples), shard_rows)]
    records, todo = _reusable_shards(chunks, out_uri, options)
    bar = tqdm(total=len(samples), unit="img", desc=f"{dataset}/{split} -> {out_uri}", disable=not progress,
               file=sys.stderr)
    bar.update(sum(record["rows"] for record in records if record))
    if len(todo) < len(chunks) and progress:
        bar.write(f"{len(chunks) - len(todo)} of {len(chunks)} shards already written with matching sha256; "
                  f"writing {len(todo)}")
    try:
        _write_shards(chunks, todo, records, out_uri, options, names, workers, bar)
    finally:
        bar.close()
    return _finish(out_uri, options, records, names)


def _check_options(dataset: str, shard_rows: int, workers: int, reduce_zero_label: bool, part: str,
                   select_images: int) -> None:
    if shard_rows < 1:
        raise DataError(f"shard_rows = {shard_rows}: must be >= 1")
    if workers < 1:
        raise DataError(f"workers = {workers}: must be >= 1")
    if reduce_zero_label and dataset != "ade20k":
        raise DataError(f"reduce_zero_label applies to ade20k only, not {dataset!r}")
    _check_part(part, select_images)


def _reusable_shards(chunks: list, out_uri: str, options: dict) -> tuple[list[dict | None], list[tuple[int, str]]]:
    """Per chunk, the record of a shard already written from the same sources and options (else None), and the
    (index, source fingerprint) of the chunks still to write."""
    previous = _previous_records(out_uri, options)
    records: list[dict | None] = [None] * len(chunks)
    todo = []
    for index, chunk in enumerate(chunks):
        name, source = SHARD_NAME.format(index), _fingerprint(chunk, options)
        if _reusable(out_uri, previous.get(name), source):
            records[index] = previous[name]
        else:
            todo.append((index, source))
    return records, todo


def _write_shards(chunks: list, todo: list[tuple[int, str]], records: list[dict | None], out_uri: str,
                  options: dict, names: tuple[str, ...], workers: int, bar: tqdm) -> None:
    """Write the shards in `todo` (in worker processes), keeping a partial manifest of those done up to date."""
    def save_partial() -> None:
        partial = _manifest(options, [r for r in records if r], names)
        shards.write_bytes(shards.join(out_uri, PARTIAL), json.dumps(partial, indent=1).encode())

    def done(index: int, source: str, record: dict) -> None:
        records[index] = {**record, "source": source}
        bar.update(record["rows"])
        save_partial()

    if not todo:
        return
    # readers must not find a complete manifest while shards are rewritten
    save_partial()
    shards.delete(shards.join(out_uri, shards.MANIFEST))
    jobs = [(chunks[i], options["dataset"], options["reduce_zero_label"], shards.join(out_uri, SHARD_NAME.format(i)))
            for i, _ in todo]
    if workers == 1 or len(todo) <= 1:
        for (index, source), job in zip(todo, jobs, strict=True):
            done(index, source, build_shard(*job))
    else:
        _run_pool(todo, jobs, workers, done)


def _finish(out_uri: str, options: dict, records: list, names: tuple[str, ...]) -> dict:
    """Write the manifest, drop the partial one and any shard the manifest does not name; return the manifest."""
    manifest = _manifest(options, records, names)
    shards.write_bytes(shards.join(out_uri, shards.MANIFEST), json.dumps(manifest, indent=1).encode())
    shards.delete(shards.join(out_uri, PARTIAL))
    keep = {record["file"] for record in records}
    for stale in shards.list_files(out_uri):  # shards of an earlier, longer run; temporaries of a crashed one
        if stale.startswith("part-") and ".parquet" in stale and stale not in keep:
            shards.delete(shards.join(out_uri, stale))
    return manifest


def _run_pool(todo: list, jobs: list, workers: int, done) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(build_shard, *job): key for key, job in zip(todo, jobs, strict=True)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                done(*futures[future], future.result())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("voc", "voc_aug", "ade20k"))
    parser.add_argument("--root", help="VOCdevkit/VOC2012 or ADEChallengeData2016 folder")
    parser.add_argument("--split", help="voc: train/val/trainval; voc_aug: train (train_aug.txt); ade20k: train/val")
    parser.add_argument("--out", help="destination folder: local path, file://, s3:// or gs:// URI")
    parser.add_argument("--shard-rows", type=int, default=256, help="rows per shard (default 256)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    parser.add_argument("--reduce-zero-label", action="store_true",
                        help="ade20k: class 0 -> ignore (255), c -> c-1 (150 classes)")
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="all rows, the held-out selection images, or the rest (the training split)")
    parser.add_argument("--select-images", type=int, default=0,
                        help="with --part select/rest: how many images are held out for checkpoint selection")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify", metavar="URI", help="re-check the checksums and row counts of shards at URI")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 bad data or failed verification, 2 bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.verify:
            report = shards.verify(args.verify)
            print(f"ok: {report['uri']}: {report['shards']} shards, {report['rows']} rows, checksums match")
            return 0
        missing = [flag for flag, value in (("--dataset", args.dataset), ("--root", args.root),
                                            ("--split", args.split), ("--out", args.out)) if value is None]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --verify URI)")
        if args.split not in split_names(args.dataset):
            parser.error(f"--split {args.split}: {args.dataset} accepts {', '.join(split_names(args.dataset))}")
        manifest = prepare_split(args.dataset, args.root, args.split, args.out, shard_rows=args.shard_rows,
                                 workers=args.workers, reduce_zero_label=args.reduce_zero_label,
                                 progress=not args.no_progress, part=args.part, select_images=args.select_images)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(manifest['shards'])} shards, {manifest['total_rows']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
