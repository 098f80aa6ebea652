"""Sharding round trips (local and S3), the manifest, the CLI, --verify and resuming."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.classes import ADE20K_CLASSES, IGNORE_INDEX, VOC_CLASSES
from data.errors import ShardIntegrityError
from data.layouts import list_samples
from data.prepare import main, prepare_split
from data.shards import iter_samples, read_bytes, read_manifest, shard_uris, verify
from data.synthetic import generate_ade20k, generate_voc
from tests.conftest import PYTHON, REPO

SIZE = dict(height=72, width=96)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return generate_voc(tmp_path_factory.mktemp("voc"), seed=0, train_images=7, val_images=3, num_classes=4, **SIZE)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return generate_ade20k(tmp_path_factory.mktemp("ade"), seed=0, train_images=5, val_images=2, num_classes=5,
                           **SIZE)


def _source_label(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _rows(uri: str) -> list[dict]:
    rows = []
    for shard in shard_uris(uri):
        rows.extend(pq.read_table(shard.removeprefix("file://")).to_pylist())
    return rows


def _check_round_trip(dataset, root, split, uri, *, reduce_zero_label=False):
    samples = list_samples(dataset, root, split)
    rows = _rows(uri) if "://" not in uri else None
    if rows is not None:
        assert [row["id"] for row in rows] == [s.id for s in samples]
        for row, sample in zip(rows, samples, strict=True):
            assert row["image"] == sample.image.read_bytes()
            assert (row["height"], row["width"]) == (SIZE["height"], SIZE["width"])
    got = list(iter_samples(uri))
    assert [g[0] for g in got] == [s.id for s in samples]
    for (sample_id, image, label), sample in zip(got, samples, strict=True):
        expected = _source_label(sample.label)
        if reduce_zero_label:
            expected = np.where(expected == 0, IGNORE_INDEX, expected.astype(np.int16) - 1).astype(np.uint8)
        assert label.dtype == np.uint8 and np.array_equal(label, expected), sample_id
        assert image.dtype == np.uint8 and image.shape == (SIZE["height"], SIZE["width"], 3)
        with Image.open(sample.image) as source:
            assert np.array_equal(image, np.asarray(source.convert("RGB")))


@pytest.mark.parametrize("dataset,split", [("voc", "train"), ("voc", "val"), ("voc", "trainval"), ("voc_aug", "train")])
def test_voc_round_trip(voc_root, tmp_path, dataset, split):
    uri = str(tmp_path / "shards")
    manifest = prepare_split(dataset, voc_root, split, uri, shard_rows=3, workers=2, progress=False)
    _check_round_trip(dataset, voc_root, split, uri)
    assert manifest == read_manifest(uri)
    expected_rows = {"train": 7, "val": 3, "trainval": 10}[split]
    assert manifest["total_rows"] == expected_rows
    assert [s["rows"] for s in manifest["shards"]] == [3] * (expected_rows // 3) + (
        [expected_rows % 3] if expected_rows % 3 else [])
    assert manifest["dataset"] == dataset and manifest["split"] == split
    assert manifest["class_names"] == list(VOC_CLASSES) and manifest["num_classes"] == 21
    assert manifest["ignore_index"] == IGNORE_INDEX and manifest["shard_rows"] == 3
    assert manifest["schema_version"] == 1
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    if dataset == "voc":
        # VOC borders survive the round trip as 255.
        assert any((label == IGNORE_INDEX).any() for _, _, label in iter_samples(uri))


@pytest.mark.parametrize("reduce_zero_label", [False, True])
def test_ade20k_round_trip(ade_root, tmp_path, reduce_zero_label):
    uri = str(tmp_path / "shards")
    manifest = prepare_split("ade20k", ade_root, "train", uri, shard_rows=2, workers=1,
                             reduce_zero_label=reduce_zero_label, progress=False)
    _check_round_trip("ade20k", ade_root, "train", uri, reduce_zero_label=reduce_zero_label)
    assert manifest["num_classes"] == (150 if reduce_zero_label else 151)
    assert manifest["class_names"] == list(ADE20K_CLASSES[1:] if reduce_zero_label else ADE20K_CLASSES)
    assert manifest["reduce_zero_label"] is reduce_zero_label


def test_s3_round_trip(voc_root, ade_root, s3_bucket):
    cases = (("voc", voc_root, "train"), ("voc_aug", voc_root, "train"), ("ade20k", ade_root, "val"))
    for dataset, root, split in cases:
        uri = f"{s3_bucket}/shards/{dataset}/{split}"
        manifest = prepare_split(dataset, root, split, uri, shard_rows=4, workers=2, progress=False)
        _check_round_trip(dataset, root, split, uri)
        assert verify(uri)["rows"] == manifest["total_rows"]
        # Every row's image is the source JPEG's bytes.
        samples = {s.id: s for s in list_samples(dataset, root, split)}
        for shard in shard_uris(uri):
            table = pq.read_table(io.BytesIO(read_bytes(shard)))
            for row in table.to_pylist():
                assert row["image"] == samples[row["id"]].image.read_bytes()
        # No credential is written anywhere.
        assert "testing" not in json.dumps(manifest)


def test_resume_skips_matching_shards_and_rewrites_damaged(voc_root, tmp_path):
    uri = str(tmp_path / "shards")
    prepare_split("voc", voc_root, "trainval", uri, shard_rows=3, workers=1, progress=False)
    files = sorted((tmp_path / "shards").glob("part-*.parquet"))
    assert len(files) == 4
    before = {p.name: p.stat().st_mtime_ns for p in files}
    damaged = files[1]
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    files[2].unlink()
    with pytest.raises(ShardIntegrityError, match=damaged.name):
        verify(uri)
    manifest = prepare_split("voc", voc_root, "trainval", uri, shard_rows=3, workers=2, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in sorted((tmp_path / "shards").glob("part-*.parquet"))}
    assert after[files[0].name] == before[files[0].name] and after[files[3].name] == before[files[3].name]
    assert after[damaged.name] != before[damaged.name] and files[2].exists()
    assert verify(uri)["rows"] == manifest["total_rows"] == 10
    _check_round_trip("voc", voc_root, "trainval", uri)


def test_interrupted_run_resumes_from_partial_record(voc_root, tmp_path):
    """A run that fails part-way keeps its finished shards; the re-run writes only the rest."""
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    ids = (root / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split()
    broken = root / "SegmentationClass" / f"{ids[7]}.png"
    good = broken.read_bytes()
    broken.write_bytes(b"not a png")
    uri = str(tmp_path / "shards")
    with pytest.raises(Exception, match=str(broken)):
        prepare_split("voc", root, "trainval", uri, shard_rows=3, workers=1, progress=False)
    assert not (tmp_path / "shards" / "manifest.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("part-*.parquet")}
    assert sorted(written) == ["part-00000.parquet", "part-00001.parquet"]
    broken.write_bytes(good)
    prepare_split("voc", root, "trainval", uri, shard_rows=3, workers=1, progress=False)
    for name, mtime in written.items():
        assert (tmp_path / "shards" / name).stat().st_mtime_ns == mtime
    assert not (tmp_path / "shards" / "manifest.partial.json").exists()
    _check_round_trip("voc", root, "trainval", uri)


def test_fewer_shards_remove_stale_ones(voc_root, tmp_path):
    uri = str(tmp_path / "shards")
    prepare_split("voc", voc_root, "train", uri, shard_rows=2, workers=1, progress=False)
    assert len(list((tmp_path / "shards").glob("part-*"))) == 4
    prepare_split("voc", voc_root, "train", uri, shard_rows=4, workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "shards").glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    _check_round_trip("voc", voc_root, "train", uri)


def test_cli_prepare_and_verify(voc_root, tmp_path, repo_env, capsys):
    uri = f"file://{tmp_path}/shards"
    proc = subprocess.run(
        [PYTHON, "-m", "data.prepare", "--dataset", "voc_aug", "--root", str(voc_root), "--split", "train",
         "--out", uri, "--shard-rows", "4", "--workers", "2"],
        cwd=REPO, env=repo_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 shards, 7 rows" in proc.stdout
    assert "img" in proc.stderr  # the progress bar
    assert main(["--verify", uri]) == 0
    assert "2 shards, 7 rows, checksums match" in capsys.readouterr().out
    shard = tmp_path / "shards" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes() + b"x")
    assert main(["--verify", uri]) == 1
    err = capsys.readouterr().err
    assert "part-00001.parquet" in err and "sha256" in err


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "voc"])
    assert exc.value.code == 2
    assert "--root, --split, --out required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dataset", "voc_aug", "--root", "x", "--split", "val", "--out", "y"])
    assert "voc_aug accepts train" in capsys.readouterr().err
