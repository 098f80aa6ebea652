"""Train/val transforms: shapes, dtypes, padding values, image/label alignment, exact labels."""

from __future__ import annotations

import numpy as np
import pytest

from data.classes import IGNORE_INDEX
from data.transforms import MEAN_UINT8, train_transform, val_transform


def _coded(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A label map of blocks and an image whose every channel is 40 * label: alignment is checkable."""
    rng = np.random.default_rng(seed)
    label = np.kron(rng.integers(0, 5, size=(height // 8 + 1, width // 8 + 1)), np.ones((8, 8)))[:height, :width]
    label = label.astype(np.uint8)
    return np.repeat((label * 40)[..., None], 3, axis=2), label


def test_train_shapes_dtypes_and_range():
    image, label = _coded(120, 160)
    x, y = train_transform(image, label, crop_size=96, rng=np.random.default_rng(0))
    assert x.shape == (3, 96, 96) and x.dtype == np.float32
    assert y.shape == (96, 96) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) <= {0, 1, 2, 3, 4, IGNORE_INDEX}


@pytest.mark.parametrize("seed", range(6))
def test_train_keeps_image_and_label_aligned(seed):
    image, label = _coded(120, 160, seed)
    x, y = train_transform(image, label, crop_size=(64, 80), scale_range=(1.0, 1.0), rng=np.random.default_rng(seed))
    assert x.shape == (3, 64, 80)
    np.testing.assert_array_equal(np.round(x[0] * 255).astype(np.int64), y * 40)


def test_train_pads_small_images_with_mean_and_ignore():
    image, label = _coded(30, 40)
    x, y = train_transform(image, label, crop_size=96, scale_range=(0.5, 0.5), rng=np.random.default_rng(1))
    assert x.shape == (3, 96, 96)
    padded = y == IGNORE_INDEX
    assert padded.sum() == 96 * 96 - 15 * 20
    for channel, mean in enumerate(MEAN_UINT8):
        np.testing.assert_array_equal(x[channel][padded], np.float32(mean) / np.float32(255))


def test_train_is_a_function_of_the_rng():
    image, label = _coded(120, 160)
    a = train_transform(image, label, crop_size=64, rng=np.random.default_rng(7))
    b = train_transform(image, label, crop_size=64, rng=np.random.default_rng(7))
    c = train_transform(image, label, crop_size=64, rng=np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1]) or not np.array_equal(a[0], c[0])


def test_train_flips_sometimes():
    image, label = _coded(64, 64)
    flipped = 0
    for seed in range(20):
        _, y = train_transform(image, label, crop_size=64, scale_range=(1.0, 1.0), rng=np.random.default_rng(seed))
        if np.array_equal(y, label[:, ::-1]):
            flipped += 1
        else:
            assert np.array_equal(y, label)
    assert 3 <= flipped <= 17


def test_val_exact_when_sizes_already_match():
    image, label = _coded(64, 64)
    label[10:20, 10:20] = IGNORE_INDEX
    x, y = val_transform(image, label, size=64)
    assert np.array_equal(y, label.astype(np.int64))
    assert np.array_equal(x, image.transpose(2, 0, 1).astype(np.float32) / 255)


def test_val_pads_bottom_right_without_resizing_when_it_fits():
    image, label = _coded(48, 64)
    x, y = val_transform(image, label, size=64)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert np.array_equal(y[:48], label) and (y[48:] == IGNORE_INDEX).all()
    assert np.allclose(x[:, 48:], np.array(MEAN_UINT8, np.float32)[:, None, None] / 255)


def test_val_resizes_larger_images_with_nearest_labels():
    image, label = _coded(120, 160)
    x, y = val_transform(image, label, size=128)
    assert x.shape == (3, 128, 128) and y.dtype == np.int64
    assert (y[96:] == IGNORE_INDEX).all() and (y[:96] != IGNORE_INDEX).all()
    assert set(np.unique(y[:96])) <= set(np.unique(label))
    a, b = val_transform(image, label, size=128)
    assert np.array_equal(a, x) and np.array_equal(b, y)


def test_rejects_wrong_inputs():
    image, label = _coded(32, 32)
    with pytest.raises(ValueError, match="expected uint8 HxWx3"):
        val_transform(image.astype(np.float32), label, size=32)
    with pytest.raises(ValueError, match="label uint8 \\(16, 32\\)"):
        val_transform(image, label[:16], size=32)
    with pytest.raises(ValueError, match="scale_range"):
        train_transform(image, label, crop_size=16, scale_range=(2.0, 0.5), rng=np.random.default_rng(0))
