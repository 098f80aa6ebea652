"""The generated datasets: real layouts, deterministic by seed, valid labels, VOC borders, cheap re-runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.classes import IGNORE_INDEX
from data.synthetic import generate_ade20k, generate_voc


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_voc_layout_labels_and_borders(tmp_path):
    root = generate_voc(tmp_path, seed=1, train_images=6, val_images=3, num_classes=4, height=120, width=160)
    assert root == tmp_path / "VOCdevkit" / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    train = (lists / "train.txt").read_text().split()
    val = (lists / "val.txt").read_text().split()
    assert len(train) == 6 and len(val) == 3 and not set(train) & set(val)
    assert (lists / "trainval.txt").read_text().split() == train + val
    assert (lists / "train_aug.txt").read_text().split() == train
    seen = set()
    for sample_id in train + val:
        with Image.open(root / "JPEGImages" / f"{sample_id}.jpg") as image:
            assert image.format == "JPEG" and image.size == (160, 120) and image.mode == "RGB"
        with Image.open(root / "SegmentationClass" / f"{sample_id}.png") as label:
            assert label.mode == "P"
            voc = np.asarray(label)
        with Image.open(root / "SegmentationClassAug" / f"{sample_id}.png") as label:
            assert label.mode == "L"
            aug = np.asarray(label)
        assert voc.shape == aug.shape == (120, 160)
        assert set(np.unique(aug)) <= {0, 1, 2, 3}
        assert set(np.unique(voc)) <= {0, 1, 2, 3, IGNORE_INDEX}
        assert IGNORE_INDEX not in aug
        # Borders only replace pixels; everywhere else the two annotations agree.
        border = voc == IGNORE_INDEX
        assert np.array_equal(voc[~border], aug[~border])
        if len(np.unique(aug)) > 1:
            assert border.any()
        seen |= set(np.unique(aug).tolist())
    assert seen == {0, 1, 2, 3}


def test_ade20k_layout(tmp_path):
    root = generate_ade20k(tmp_path, seed=0, train_images=3, val_images=2, num_classes=6, height=96, width=128)
    assert root == tmp_path / "ADEChallengeData2016"
    train = sorted((root / "images" / "training").glob("*.jpg"))
    assert [p.name for p in train] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg", "ADE_train_00000003.jpg"]
    assert len(list((root / "images" / "validation").glob("*.jpg"))) == 2
    for image in train:
        label = np.asarray(Image.open(root / "annotations" / "training" / f"{image.stem}.png"))
        assert label.shape == (96, 128) and label.max() < 6


def test_deterministic_by_seed_and_idempotent(tmp_path):
    args = dict(train_images=3, val_images=2, num_classes=5, height=64, width=80)
    a = generate_voc(tmp_path / "a", seed=3, **args)
    b = generate_voc(tmp_path / "b", seed=3, **args)
    c = generate_voc(tmp_path / "c", seed=4, **args)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*.jpg")}
    assert generate_voc(tmp_path / "a", seed=3, **args) == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.jpg")} == mtimes
    # Different arguments into the same folder regenerate it.
    generate_voc(tmp_path / "a", seed=3, **{**args, "train_images": 2})
    assert len((a / "ImageSets" / "Segmentation" / "train.txt").read_text().split()) == 2


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes = 1"):
        generate_voc(tmp_path, num_classes=1)
    with pytest.raises(ValueError, match="num_classes = 22"):
        generate_voc(tmp_path, num_classes=22)
    with pytest.raises(ValueError, match="train_images = 0"):
        generate_ade20k(tmp_path, train_images=0)


def test_classes_separable_by_colour(tmp_path):
    """A nearest-mean classifier on per-pixel chromaticity, fit on train, labels > 95 % of val pixels."""
    root = generate_voc(tmp_path, seed=0, train_images=16, val_images=8, num_classes=4, height=120, width=160)

    def pixels(split):
        ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        rgb = np.concatenate([np.asarray(Image.open(root / "JPEGImages" / f"{i}.jpg"), np.float32).reshape(-1, 3)
                              for i in ids])
        label = np.concatenate([np.asarray(Image.open(root / "SegmentationClassAug" / f"{i}.png")).reshape(-1)
                                for i in ids])
        return rgb / (rgb.sum(1, keepdims=True) + 1), label

    features, labels = pixels("train")
    means = np.stack([features[labels == c].mean(0) for c in range(4)])
    val_features, val_labels = pixels("val")
    predicted = np.argmin(((val_features[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == val_labels).mean() > 0.95
