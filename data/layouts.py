"""Readers of the real dataset layouts: Pascal VOC 2012, SBD 'aug' and ADE20K (ADEChallengeData2016).

`list_samples` checks the folder and split list up front; `read_sample` checks one image/label pair
(decodable, same size, only valid class values) and returns what a shard row stores.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.classes import ADE20K_CLASSES, IGNORE_INDEX, VOC_CLASSES
from data.codec import LABEL_MODES, encode_label
from data.errors import DataError

# dataset -> split -> (split list or image folder, label folder)
VOC_SPLITS = {"train": "train.txt", "val": "val.txt", "trainval": "trainval.txt"}
VOC_AUG_SPLITS = {"train": "train_aug.txt"}
ADE20K_SPLITS = {"train": "training", "val": "validation"}
ROOT_NAMES = {"voc": "VOCdevkit/VOC2012", "voc_aug": "VOCdevkit/VOC2012", "ade20k": "ADEChallengeData2016"}
MAX_NAMED = 10


@dataclass(frozen=True)
class Sample:
    """One listed sample: its id and the two files it is read from."""

    id: str
    image: Path
    label: Path


def source_num_classes(dataset: str) -> int:
    """Classes as stored in the source annotations (VOC 21, ADE20K 151 with 0 = other)."""
    return len(ADE20K_CLASSES) if dataset == "ade20k" else len(VOC_CLASSES)


def split_names(dataset: str) -> tuple[str, ...]:
    """The split names a dataset accepts."""
    return tuple({"voc": VOC_SPLITS, "voc_aug": VOC_AUG_SPLITS, "ade20k": ADE20K_SPLITS}[_check_dataset(dataset)])


def _check_dataset(dataset: str) -> str:
    if dataset not in ROOT_NAMES:
        raise DataError(f"dataset {dataset!r}: expected one of {', '.join(ROOT_NAMES)}")
    return dataset


def _check_split(dataset: str, split: str) -> None:
    valid = split_names(dataset)
    if split not in valid:
        hint = "; VOC recipes validate on dataset 'voc' split 'val'" if dataset == "voc_aug" else ""
        raise DataError(f"{dataset} split {split!r}: expected one of {', '.join(valid)}{hint}")


def _read_list(path: Path, dataset: str, split: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{dataset} split {split!r}: split list {path} not found")
    ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    seen: set[str] = set()
    repeated = sorted({i for i in ids if i in seen or seen.add(i)})
    if repeated:
        raise DataError(f"{path}: ids listed more than once: {', '.join(repeated[:MAX_NAMED])}")
    return ids


def list_samples(dataset: str, root: str | Path, split: str) -> list[Sample]:
    """All samples of a split, in list order (ADE20K: sorted file names); raises DataError on any gap."""
    _check_dataset(dataset)
    _check_split(dataset, split)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{dataset} root {root}: not found (expected the {ROOT_NAMES[dataset]} folder)")
    if dataset == "ade20k":
        folder = ADE20K_SPLITS[split]
        image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
        if not image_dir.is_dir():
            raise DataError(f"ade20k split {split!r}: image folder {image_dir} not found")
        samples = [Sample(p.stem, p, label_dir / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]
        where = str(image_dir)
    else:
        lists = root / "ImageSets" / "Segmentation"
        list_file = lists / (VOC_SPLITS if dataset == "voc" else VOC_AUG_SPLITS)[split]
        label_dir = root / ("SegmentationClass" if dataset == "voc" else "SegmentationClassAug")
        samples = [
            Sample(i, root / "JPEGImages" / f"{i}.jpg", label_dir / f"{i}.png")
            for i in _read_list(list_file, dataset, split)
        ]
        where = str(list_file)
    if not samples:
        raise DataError(f"{dataset} split {split!r}: empty split ({where} lists no samples)")
    _check_files(samples, dataset, split, root)
    return samples


def _check_files(samples: list[Sample], dataset: str, split: str, root: Path) -> None:
    missing = []
    for sample in samples:
        absent = [str(p.relative_to(root)) for p in (sample.image, sample.label) if not p.is_file()]
        if absent:
            missing.append(f"{sample.id} ({' and '.join(absent)} missing)")
    if missing:
        more = f"; and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
        raise DataError(
            f"{dataset} split {split!r}: {len(missing)} of {len(samples)} listed ids lack an image or label file "
            f"under {root}: " + "; ".join(missing[:MAX_NAMED]) + more
        )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc


def read_sample(sample: Sample, dataset: str, *, reduce_zero_label: bool = False) -> tuple[bytes, bytes, int, int]:
    """Validate one pair and return (image file bytes unchanged, label PNG bytes, height, width).

    The label PNG holds the source indices; with reduce_zero_label (ADE20K) 0 becomes 255 and c becomes c-1.
    """
    image_bytes = _read_bytes(sample.image)
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            width, height = image.size
    except Exception as exc:
        raise DataError(f"{sample.image}: corrupt or unreadable image ({exc})") from exc
    try:
        with Image.open(io.BytesIO(_read_bytes(sample.label))) as image:
            image.load()
            mode = image.mode
            label = np.asarray(image) if mode in LABEL_MODES else None
    except Exception as exc:
        raise DataError(f"{sample.label}: corrupt or unreadable label PNG ({exc})") from exc
    if label is None:
        raise DataError(
            f"{sample.label}: PNG mode {mode!r} holds colours, not class indices "
            f"(expected mode {' or '.join(map(repr, LABEL_MODES))})"
        )
    if label.shape != (height, width):
        raise DataError(
            f"size mismatch for {sample.id}: image {sample.image} is {width}x{height} "
            f"but label {sample.label} is {label.shape[1]}x{label.shape[0]}"
        )
    classes = source_num_classes(dataset)
    values = np.unique(label)
    bad = values[(values >= classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"{sample.label}: label values {bad.tolist()[:MAX_NAMED]} are neither a class index "
            f"(0-{classes - 1}) nor the ignore value {IGNORE_INDEX}"
        )
    if reduce_zero_label:
        if dataset != "ade20k":
            raise DataError(f"reduce_zero_label applies to ade20k only, not {dataset!r}")
        label = reduce_zero(label)
    return image_bytes, encode_label(np.ascontiguousarray(label)), height, width


def reduce_zero(label: np.ndarray) -> np.ndarray:
    """ADE20K's reduce_zero_label: 0 ('other') -> ignore, c -> c-1, ignore stays ignore."""
    out = label.astype(np.int16) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)
