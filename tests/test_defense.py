"""The non-local-means front end: OpenCV parameters, denoising, identity gradient (BPDA), SEA through it."""

import cv2
import numpy as np
import pytest
import torch

from tests.segtoy import NUM_CLASSES, make_batch
from trainables.attacks import aggregate, sea
from trainables.defense import NLMDefended, defended_models, nlm_bpda, nlm_denoise
from trainables.metrics import intersection_union

EPS = 8 / 255


def test_nlm_is_opencv_coloured_nlm_with_the_seed_parameters_on_bgr_bytes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=g)
    out = nlm_denoise(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    bgr = np.ascontiguousarray((x[1] * 255).round().byte().permute(1, 2, 0).numpy()[:, :, ::-1])
    want = cv2.fastNlMeansDenoisingColored(bgr, None, 10, 10, 7, 21)[:, :, ::-1].copy()
    assert torch.equal((out[1] * 255).round().byte(), torch.from_numpy(want).permute(2, 0, 1))


def test_nlm_removes_noise_from_a_flat_image():
    g = torch.Generator().manual_seed(1)
    x = (0.5 + 0.03 * torch.randn(1, 3, 48, 48, generator=g)).clamp(0, 1)
    assert float(nlm_denoise(x).std()) < 0.3 * float(x.std())


def test_bpda_passes_the_gradient_through_unchanged():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 16, 16, generator=g, requires_grad=True)
    weights = torch.randn(1, 3, 16, 16, generator=g)
    (grad,) = torch.autograd.grad((nlm_bpda(x) * weights).sum(), x)
    assert torch.equal(grad, weights)


def test_defended_models_choose_what_is_attacked_and_what_is_scored(model):
    assert defended_models(model, None) == (model, model)
    attacked, scored = defended_models(model, "nlm")
    assert attacked is model and isinstance(scored, NLMDefended) and scored.model is model
    attacked, scored = defended_models(model, "nlm-bpda")
    assert attacked is scored and isinstance(scored, NLMDefended)
    assert not scored.training  # follows the wrapped model's mode
    with pytest.raises(ValueError, match="valid: None, 'nlm', 'nlm-bpda'"):
        defended_models(model, "median")


def test_sea_scores_the_defended_model_under_non_adaptive_and_bpda_attacks(model):
    x, y = make_batch(4, seed=21)
    runs = {d: sea(model, x, y, eps=EPS, num_classes=NUM_CLASSES, n_iter=10, losses=("js",), seed=0, defense=d,
                   return_adv=True) for d in ("nlm", "nlm-bpda")}
    with torch.no_grad():
        inter, _, correct, _ = intersection_union(model(nlm_denoise(x)).argmax(1), y, NUM_CLASSES)
    for defense, r in runs.items():
        assert r.defense == defense
        assert torch.equal(r.inter["clean"], inter) and torch.equal(r.correct["clean"], correct)
        assert float((r.adv["js"] - x).abs().max()) <= EPS + 1e-6
        scores = aggregate([r], NUM_CLASSES)
        print(defense, {k: round(v["aacc"], 4) for k, v in scores.items()})
        assert scores["js"]["aacc"] < scores["clean"]["aacc"] - 0.05
    # the two threat models produce different attack points
    assert not torch.equal(runs["nlm"].adv["js"], runs["nlm-bpda"].adv["js"])
