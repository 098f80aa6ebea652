"""Train and val transforms on decoded arrays (NumPy/OpenCV), shared by the Ray pipeline and plain loops.

Images are padded with the ImageNet mean and labels with the ignore value; labels are only ever resized
with nearest-neighbour interpolation, so no new class values appear.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from data.classes import IGNORE_INDEX

# ImageNet mean in [0, 1]: the padding colour, which a mean/std-normalising model maps to zero.
IMAGE_MEAN = (0.485, 0.456, 0.406)
MEAN_UINT8 = tuple(round(255 * m) for m in IMAGE_MEAN)


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"size {size!r}: must be positive")
    return int(height), int(width)


def _resize(image: np.ndarray, label: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    if (height, width) == label.shape:
        return image, label
    return (
        cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR),
        cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST),
    )


def _pad_to(image: np.ndarray, label: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right up to at least height x width: image with the mean, label with the ignore value."""
    pad_h, pad_w = max(height - label.shape[0], 0), max(width - label.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return image, label
    return (
        cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=MEAN_UINT8),
        cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=IGNORE_INDEX),
    )


def check_scale_range(scale_range: tuple[float, float]) -> None:
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range {tuple(scale_range)!r}: must be (low, high) with 0 < low <= high")


def _check(image: np.ndarray, label: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.dtype} {image.shape}: expected uint8 HxWx3")
    if label.dtype != np.uint8 or label.shape != image.shape[:2]:
        raise ValueError(f"label {label.dtype} {label.shape}: expected uint8 {image.shape[:2]}")


def train_augment(
    image: np.ndarray,
    label: np.ndarray,
    *,
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, pad to the crop, random crop and horizontal flip on uint8 arrays (HxWx3, HxW)."""
    _check(image, label)
    check_scale_range(scale_range)
    crop_h, crop_w = _size2(crop_size)
    scale = rng.uniform(*scale_range)
    height, width = label.shape
    image, label = _resize(image, label, max(1, round(height * scale)), max(1, round(width * scale)))
    image, label = _pad_to(image, label, crop_h, crop_w)
    top = int(rng.integers(0, label.shape[0] - crop_h + 1))
    left = int(rng.integers(0, label.shape[1] - crop_w + 1))
    image, label = image[top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return image, label


def fit_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """The (height, width) an image takes inside size when resized to fit with its aspect kept (no padding)."""
    out_h, out_w = _size2(size)
    scale = min(out_h / height, out_w / width)
    return min(out_h, max(1, round(height * scale))), min(out_w, max(1, round(width * scale)))


def val_resize(image: np.ndarray, label: np.ndarray, *, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize to fit inside size (aspect kept; a no-op when it already fits exactly), then pad to size."""
    _check(image, label)
    image, label = _resize(image, label, *fit_size(*label.shape, size))
    return _pad_to(image, label, *_size2(size))


def reference_crop(image: np.ndarray, label: np.ndarray, *, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference code's val view: short side resized to size, then the centre size x size crop.

    As the reference does it (so its figures are reproduced pixel for pixel): PIL's bilinear filter for the
    image and nearest for the label, the long side scaled by size / short side and truncated, and the crop's
    offset rounded half to even (Python's round).
    """
    _check(image, label)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size {size!r}: must be a positive int (the side of the square crop)")
    height, width = label.shape
    if width > height:
        new_h, new_w = size, int(width * size / height)
    else:
        new_h, new_w = int(height * size / width), size
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.Resampling.NEAREST))
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return image[top:top + size, left:left + size], label[top:top + size, left:left + size]


def check_ignore_as(value: int) -> int:
    """A class index the ignore value may be counted as, else a ValueError naming the value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < IGNORE_INDEX:
        raise ValueError(f"ignore_as = {value!r}: must be a class index in [0, {IGNORE_INDEX})")
    return int(value)


def ignored_as(label: np.ndarray, value: int) -> np.ndarray:
    """A copy of label where the ignore value counts as class `value` (the reference protocol's VOC borders)."""
    return np.where(label == IGNORE_INDEX, np.uint8(check_ignore_as(value)), label)


def to_chw(
    image: np.ndarray, label: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWx3 / HxW -> uint8 3xHxW / HxW (copies, written into `out` when given).

    Pipelines hand rows on in uint8, a quarter of float32's bytes; `to_float` converts whole batches
    where they are consumed.
    """
    height, width = label.shape
    if out is None:
        out = np.empty((3, height, width), np.uint8), np.empty((height, width), np.uint8)
    chw, labels = out
    chw[...] = image.transpose(2, 0, 1)
    labels[...] = label
    return chw, labels


def to_float(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (...x3xHxW) and labels -> float32 in [0, 1] and int64, as the models take them."""
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"images {images.dtype}, labels {labels.dtype}: expected uint8 (from to_chw)")
    return np.divide(images, np.float32(255), dtype=np.float32), labels.astype(np.int64)


def train_transform(
    image: np.ndarray,
    label: np.ndarray,
    *,
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Train augmentation, returning float32 3xHxW in [0, 1] and int64 HxW (crop_size x crop_size)."""
    return to_float(*to_chw(*train_augment(image, label, crop_size=crop_size, scale_range=scale_range, rng=rng)))


def val_transform(
    image: np.ndarray, label: np.ndarray, *, size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic val transform, returning float32 3xHxW in [0, 1] and int64 HxW (size x size)."""
    return to_float(*to_chw(*val_resize(image, label, size=size)))
