"""Generated datasets in the real Pascal VOC 2012 / SBD-aug and ADE20K folder layouts (nothing is downloaded).

Images show large shapes on a muted, smoothly textured background. Style `colour`: a shape's class is its
saturated colour (plus stripes), which a tiny model learns in minutes and which is robust by construction.
Style `texture`: objects are mostly grey with a faint class tint; the class is told by its stripe texture and
its shape, which is as easy to attack as real images (clean training collapses under a small ℓ∞ budget).
`object_images` renders single objects of the same classes as a classification set (the ImageNet stand-in that
PIR pretraining needs). Everything is a pure function of the arguments (the seed included); re-running into a
complete folder returns at once.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data.classes import ADE20K_CLASSES, IGNORE_INDEX, VOC_CLASSES, VOC_PALETTE

MARKER = "synthetic.json"
JPEG_QUALITY = 90
STYLES = ("colour", "texture")
# Style texture: the share of the class colour in an object's otherwise grey fill, and the stripes' amplitude.
TINT, STRIPE_AMPLITUDE = 0.2, 16.0


def _check_args(num_classes: int, max_classes: int, height: int, width: int, counts: dict[str, int],
                style: str = "colour") -> None:
    if style not in STYLES:
        raise ValueError(f"style = {style!r}: must be one of {', '.join(STYLES)}")
    if not 2 <= num_classes <= max_classes:
        raise ValueError(f"num_classes = {num_classes}: must be in [2, {max_classes}] (class 0 included)")
    if height < 32 or width < 32:
        raise ValueError(f"height x width = {height}x{width}: both must be >= 32 pixels")
    for name, count in counts.items():
        if count < 1:
            raise ValueError(f"{name} = {count}: must be >= 1")


def _class_colour(cls: int) -> np.ndarray:
    """A saturated colour per class: hues spread by the golden ratio, so neighbouring classes differ."""
    hue = (cls * 0.618034) % 1.0
    hsv = np.uint8([[[round(hue * 179), 230, 230]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _stripes(cls: int, yy: np.ndarray, xx: np.ndarray, scale: float, phase: float) -> np.ndarray:
    """Class-specific stripes in [-1, 1]: orientation and period depend on the class."""
    angle = math.radians((cls * 47) % 180)
    period = scale * (6 + 4 * (cls % 3))
    return np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    grid = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _shape_mask(rng: np.random.Generator, height: int, width: int, kind: int | None = None) -> np.ndarray:
    """One large ellipse (kind 0), rectangle (1) or triangle (2), about 20-50 % of the shorter side across;
    a random kind unless given."""
    mask = np.zeros((height, width), np.uint8)
    short = min(height, width)
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    ry, rx = rng.uniform(0.18, 0.4, size=2) * short
    if kind is None:
        kind = rng.integers(3)
    if kind == 0:
        cv2.ellipse(mask, (round(cx), round(cy)), (round(rx), round(ry)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 1:
        box = ((cx, cy), (2 * rx, 2 * ry), float(rng.uniform(0, 90)))
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(box)).astype(np.int32)], 1)
    else:
        angles = rng.uniform(0, 2 * math.pi) + np.array([0, 2 * math.pi / 3, 4 * math.pi / 3])
        points = np.stack([cx + rx * 1.3 * np.cos(angles), cy + ry * 1.3 * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted, smoothly textured float HxWx3 background."""
    base = rng.uniform(90, 160) + rng.uniform(-20, 20, size=3)
    texture = _smooth_noise(rng, height, width, max(8, min(height, width) // 6))
    return base[None, None, :] * (0.7 + 0.6 * texture[..., None])


@functools.lru_cache(maxsize=16)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (float32 HxW, read-only), made once per image size."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _draw_object(rng: np.random.Generator, image: np.ndarray, cls: int, style: str) -> np.ndarray:
    """Paint one object of class `cls` into `image` (in place); returns its mask (tiny objects are not drawn)."""
    height, width = image.shape[:2]
    mask = _shape_mask(rng, height, width, None if style == "colour" else (cls - 1) % 3)
    if mask.sum() < 0.01 * height * width:
        return np.zeros_like(mask)
    yy, xx = _grid(height, width)
    stripes = _stripes(cls, yy, xx, max(min(height, width) / 240.0, 0.5), float(rng.uniform(0, 2 * math.pi)))
    if style == "colour":
        fill = (_class_colour(cls) * rng.uniform(0.85, 1.1))[None, None, :] * (1.0 + 0.3 * stripes[..., None])
    else:
        grey = rng.uniform(90, 160)
        colour = (1 - TINT) * grey + TINT * _class_colour(cls) * rng.uniform(0.85, 1.1)
        fill = colour[None, None, :] + STRIPE_AMPLITUDE * stripes[..., None]
    image[mask] = fill[mask]
    return mask


def render_sample(rng: np.random.Generator, height: int, width: int, num_classes: int,
                  style: str = "colour") -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3) with 1-3 objects and its class map (uint8 HxW, 0 = background, no borders)."""
    image = _background(rng, height, width)
    label = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, num_classes))
        label[_draw_object(rng, image, cls, style)] = cls
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def object_images(rng: np.random.Generator, count: int, classes: int, size: int,
                  style: str = "texture") -> tuple[np.ndarray, np.ndarray]:
    """`count` size x size uint8 images of one object each and their labels in [0, classes): label c shows an
    object of segmentation class c + 1, rendered as in the segmentation images (a classification set whose
    objects are those of the generated segmentation data)."""
    _check_args(classes + 1, len(ADE20K_CLASSES), size, size, {"count": count}, style)
    labels = rng.integers(classes, size=count)
    images = np.empty((count, size, size, 3), np.uint8)
    for index, label in enumerate(labels):
        image = _background(rng, size, size)
        while not _draw_object(rng, image, int(label) + 1, style).any():
            pass
        image += rng.normal(0, 6, size=image.shape)
        images[index] = np.clip(image, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def voc_borders(label: np.ndarray, width: int) -> np.ndarray:
    """Mark a band of `width` pixels around every region boundary with the ignore value, as VOC does."""
    kernel = np.ones((width, width), np.uint8)
    edge = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    out = label.copy()
    out[edge] = IGNORE_INDEX
    return out


def _palette_png(indices: np.ndarray, path: Path) -> None:
    image = Image.fromarray(indices)
    image.putpalette([channel for rgb in VOC_PALETTE for channel in rgb])
    image.save(path, format="PNG")


def _is_complete(root: Path, args: dict) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == args
    except json.JSONDecodeError:
        return False


def _style_arg(style: str) -> dict:
    """The marker's style entry; absent for `colour` so that folders written before styles existed stay complete."""
    return {} if style == "colour" else {"style": style}


def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def generate_voc(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_images: int = 64,
    val_images: int = 16,
    num_classes: int = 5,
    height: int = 375,
    width: int = 500,
    style: str = "colour",
) -> Path:
    """Write `out_dir/VOCdevkit/VOC2012` (VOC 2012 + SBD-aug layout) and return that root.

    SegmentationClass holds palette PNGs with 255 borders, SegmentationClassAug single-channel PNGs
    without borders; train_aug.txt lists the train ids, as SBD's list contains VOC train.
    """
    _check_args(num_classes, len(VOC_CLASSES), height, width,
                {"train_images": train_images, "val_images": val_images}, style)
    root = Path(out_dir) / "VOCdevkit" / "VOC2012"
    args = {"layout": "voc", "seed": seed, "train_images": train_images, "val_images": val_images,
            "num_classes": num_classes, "height": height, "width": width, **_style_arg(style)}
    if _is_complete(root, args):
        return root
    (root / MARKER).unlink(missing_ok=True)
    dirs = {name: root / name for name in ("JPEGImages", "SegmentationClass", "SegmentationClassAug")}
    lists = root / "ImageSets" / "Segmentation"
    for path in (*dirs.values(), lists):
        path.mkdir(parents=True, exist_ok=True)
    border = max(3, round(min(height, width) / 75))
    ids: dict[str, list[str]] = {"train": [], "val": []}
    for split_code, (split, count) in enumerate((("train", train_images), ("val", val_images))):
        for index in range(count):
            sample_id = f"{2007 + split_code}_{index:06d}"
            image, label = render_sample(_rng(seed, split_code, index), height, width, num_classes, style)
            Image.fromarray(image).save(dirs["JPEGImages"] / f"{sample_id}.jpg", quality=JPEG_QUALITY)
            _palette_png(voc_borders(label, border), dirs["SegmentationClass"] / f"{sample_id}.png")
            Image.fromarray(label).save(dirs["SegmentationClassAug"] / f"{sample_id}.png")
            ids[split].append(sample_id)
    for name, members in (("train", ids["train"]), ("val", ids["val"]),
                          ("trainval", ids["train"] + ids["val"]), ("train_aug", ids["train"])):
        (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))
    (root / MARKER).write_text(json.dumps(args))
    return root


def generate_ade20k(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_images: int = 64,
    val_images: int = 16,
    num_classes: int = 5,
    height: int = 375,
    width: int = 500,
    style: str = "colour",
) -> Path:
    """Write `out_dir/ADEChallengeData2016` (images/ and annotations/, training and validation) and return it.

    Class 0 ('other') is the background; shapes use classes 1..num_classes-1 of the ADE20K list.
    """
    _check_args(num_classes, len(ADE20K_CLASSES), height, width,
                {"train_images": train_images, "val_images": val_images}, style)
    root = Path(out_dir) / "ADEChallengeData2016"
    args = {"layout": "ade20k", "seed": seed, "train_images": train_images, "val_images": val_images,
            "num_classes": num_classes, "height": height, "width": width, **_style_arg(style)}
    if _is_complete(root, args):
        return root
    (root / MARKER).unlink(missing_ok=True)
    for split_code, (folder, prefix, count) in enumerate(
        (("training", "ADE_train", train_images), ("validation", "ADE_val", val_images))
    ):
        images, annotations = root / "images" / folder, root / "annotations" / folder
        images.mkdir(parents=True, exist_ok=True)
        annotations.mkdir(parents=True, exist_ok=True)
        for stale in (*images.glob("*.jpg"), *annotations.glob("*.png")):
            stale.unlink()
        for index in range(count):
            sample_id = f"{prefix}_{index + 1:08d}"
            image, label = render_sample(_rng(seed, 10 + split_code, index), height, width, num_classes, style)
            Image.fromarray(image).save(images / f"{sample_id}.jpg", quality=JPEG_QUALITY)
            Image.fromarray(label).save(annotations / f"{sample_id}.png")
    (root / MARKER).write_text(json.dumps(args))
    return root
