"""Bad input is a clear error naming the file, the ids or the values; nothing is dropped silently."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from data.errors import DataError, ShardIntegrityError
from data.prepare import prepare_split
from data.shards import iter_samples, verify
from data.synthetic import generate_ade20k, generate_voc


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pristine")
    voc = generate_voc(base, seed=0, train_images=14, val_images=2, num_classes=3, height=48, width=64)
    ade = generate_ade20k(base, seed=0, train_images=3, val_images=2, num_classes=3, height=48, width=64)
    return voc, ade


@pytest.fixture
def voc(pristine, tmp_path):
    return shutil.copytree(pristine[0], tmp_path / "VOC2012")


@pytest.fixture
def ade(pristine, tmp_path):
    return shutil.copytree(pristine[1], tmp_path / "ADEChallengeData2016")


def _train_ids(voc):
    return (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def _fails(dataset, root, split, tmp_path, pattern, workers=1, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern) as exc:
        prepare_split(dataset, root, split, str(out), shard_rows=4, workers=workers, progress=False, **kwargs)
    assert not (out / "manifest.json").exists()
    return str(exc.value)


def test_missing_root(tmp_path):
    message = _fails("voc", tmp_path / "nowhere", "train", tmp_path, "root .*nowhere: not found")
    assert "VOCdevkit/VOC2012" in message
    _fails("ade20k", tmp_path / "nowhere", "val", tmp_path, "expected the ADEChallengeData2016 folder")


def test_missing_split_list(voc, ade, tmp_path):
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    _fails("voc", voc, "val", tmp_path, re.escape(str(voc / "ImageSets" / "Segmentation" / "val.txt")) + " not found")
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    _fails("voc_aug", voc, "train", tmp_path, "train_aug.txt not found")
    shutil.rmtree(ade / "images" / "validation")
    _fails("ade20k", ade, "val", tmp_path, "image folder .*validation not found")


def test_unknown_split_or_dataset(voc, tmp_path):
    _fails("voc", voc, "test", tmp_path, "voc split 'test': expected one of train, val, trainval")
    _fails("voc_aug", voc, "val", tmp_path, "expected one of train; VOC recipes validate on dataset 'voc'")
    _fails("coco", voc, "train", tmp_path, "dataset 'coco'")
    _fails("voc", voc, "train", tmp_path, "reduce_zero_label applies to ade20k only", reduce_zero_label=True)


def test_listed_ids_without_files_named_up_to_ten_with_count(voc, ade, tmp_path):
    ids = _train_ids(voc)
    for sample_id in ids[:11]:
        (voc / "JPEGImages" / f"{sample_id}.jpg").unlink()
    (voc / "SegmentationClass" / f"{ids[12]}.png").unlink()
    message = _fails("voc", voc, "train", tmp_path, "12 of 14 listed ids lack an image or label file")
    named = [i for i in ids if i in message]
    assert named == ids[:10]
    assert "and 2 more" in message
    (ade / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    message = _fails("ade20k", ade, "train", tmp_path, "1 of 3 listed ids lack")
    assert "ADE_train_00000002" in message and "annotations/training/ADE_train_00000002.png missing" in message


def test_image_and_label_sizes_differ(voc, tmp_path):
    sample_id = _train_ids(voc)[5]
    label = voc / "SegmentationClass" / f"{sample_id}.png"
    Image.open(label).resize((60, 48)).save(label)
    message = _fails("voc", voc, "train", tmp_path, f"size mismatch for {sample_id}")
    assert "is 64x48 but label" in message and "is 60x48" in message and str(label) in message


@pytest.mark.parametrize("workers", [1, 2])
def test_label_values_neither_class_nor_ignore(voc, tmp_path, workers):
    sample_id = _train_ids(voc)[9]
    path = voc / "SegmentationClassAug" / f"{sample_id}.png"
    label = np.asarray(Image.open(path)).copy()
    label[0, 0], label[5, 5] = 30, 254
    Image.fromarray(label).save(path)
    message = _fails("voc_aug", voc, "train", tmp_path, re.escape(str(path)), workers=workers)
    assert "[30, 254]" in message and "0-20" in message and "255" in message


def test_ade20k_value_above_150(ade, tmp_path):
    path = ade / "annotations" / "training" / "ADE_train_00000003.png"
    label = np.asarray(Image.open(path)).copy()
    label[3, 3] = 151
    Image.fromarray(label).save(path)
    _fails("ade20k", ade, "train", tmp_path, re.escape(str(path)) + r": label values \[151\]")


def test_colour_label_png(voc, tmp_path):
    path = voc / "SegmentationClass" / f"{_train_ids(voc)[0]}.png"
    Image.open(path).convert("RGB").save(path)
    _fails("voc", voc, "train", tmp_path, re.escape(str(path)) + ": PNG mode 'RGB' holds colours")


def test_corrupt_jpeg(voc, tmp_path):
    path = voc / "JPEGImages" / f"{_train_ids(voc)[3]}.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    _fails("voc", voc, "train", tmp_path, re.escape(str(path)) + ": corrupt or unreadable image")
    path.write_bytes(b"\xff\xd8 garbage")
    _fails("voc", voc, "train", tmp_path, re.escape(str(path)) + ": corrupt or unreadable image")


def test_corrupt_png(voc, tmp_path):
    path = voc / "SegmentationClass" / f"{_train_ids(voc)[13]}.png"
    path.write_bytes(path.read_bytes()[:60])
    _fails("voc", voc, "train", tmp_path, re.escape(str(path)) + ": corrupt or unreadable label PNG")


def test_empty_split(voc, ade, tmp_path):
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n\n")
    _fails("voc", voc, "train", tmp_path, "voc split 'train': empty split")
    for image in (ade / "images" / "validation").glob("*.jpg"):
        image.unlink()
    _fails("ade20k", ade, "val", tmp_path, "ade20k split 'val': empty split")


def test_duplicate_ids(voc, tmp_path):
    lists = voc / "ImageSets" / "Segmentation" / "train.txt"
    lists.write_text(lists.read_text() + _train_ids(voc)[2] + "\n")
    _fails("voc", voc, "train", tmp_path, "listed more than once: " + _train_ids(voc)[2])


def test_shard_checksum_mismatch_at_read_time(voc, tmp_path):
    uri = str(tmp_path / "shards")
    prepare_split("voc", voc, "train", uri, shard_rows=4, workers=1, progress=False)
    shard = tmp_path / "shards" / "part-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    samples = iter_samples(uri)
    for _ in range(8):
        next(samples)  # the first two shards are intact
    with pytest.raises(ShardIntegrityError, match=r"shard .*part-00002\.parquet: sha256 [0-9a-f]{64} does not match"):
        next(samples)
    with pytest.raises(ShardIntegrityError, match="part-00002.parquet"):
        verify(uri)
    shard.unlink()
    with pytest.raises(DataError, match="part-00002.parquet: not found"):
        verify(uri)


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest.json: not found"):
        list(iter_samples(str(tmp_path)))
