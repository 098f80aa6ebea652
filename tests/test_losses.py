"""Attack losses: each against a direct per-pixel computation, their gradients, masks, balance and AttackLoss."""

import math

import numpy as np
import pytest
import torch

from trainables.losses import (
    LOSS_NAMES,
    AttackLoss,
    class_balance_weights,
    per_image_loss,
    pixel_loss,
)

IGN = 255
K = 5


def _batch(seed=0, n=3, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, K, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n, h, w), generator=g)
    y[0, 0, :4] = IGN
    y[1, 2:4, 2:4] = IGN
    # make roughly half of the pixels correctly classified
    flip = torch.rand(n, h, w, generator=g) < 0.5
    y = torch.where(flip & (y != IGN), logits.argmax(1), y)
    return logits, y


def _direct(name, u, label, step=0, total=1, counts=None):
    """One pixel's loss from its logits u (numpy, K) and label, written out from ALGORITHMS.md."""
    if label == IGN:
        return 0.0
    p = np.exp(u - u.max())
    p /= p.sum()
    ce = -math.log(p[label])
    correct = int(np.argmax(u)) == label
    if name == "ce":
        return ce
    if name == "mce":
        return ce * correct
    if name == "mce-bal":
        return ce * correct / counts[label]
    if name == "js":
        onehot = np.eye(K)[label]
        m = 0.5 * (p + onehot)
        kl_p = sum(pc * math.log(pc / mc) for pc, mc in zip(p, m, strict=True) if pc > 0)
        kl_q = sum(qc * math.log(qc / mc) for qc, mc in zip(onehot, m, strict=True) if qc > 0)
        return 0.5 * (kl_p + kl_q)
    if name == "segpgd":
        lam = step / (2 * total)
        return ce * ((1 - lam) if correct else lam)
    if name == "cospgd":
        s = 1 / (1 + np.exp(-u))
        return ce * s[label] / np.linalg.norm(s)
    if name == "mask-sph":
        return -u[label] / np.linalg.norm(u) * correct
    raise AssertionError(name)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_each_loss_matches_direct_per_pixel_computation(name):
    logits, y = _batch()
    step, total = 3, 10
    got = pixel_loss(name, logits, y, step=step, total_steps=total).numpy()
    u, lab = logits.numpy(), y.numpy()
    for n in range(lab.shape[0]):
        counts = np.bincount(lab[n][lab[n] != IGN], minlength=K)
        for i in range(lab.shape[1]):
            for j in range(lab.shape[2]):
                want = _direct(name, u[n, :, i, j], int(lab[n, i, j]), step, total, counts)
                assert got[n, i, j] == pytest.approx(want, abs=1e-10), (name, n, i, j)
    # per image: sum over the image divided by its labelled pixels
    labelled = (y != IGN).sum((1, 2)).double()
    torch.testing.assert_close(per_image_loss(name, logits, y, step=step, total_steps=total),
                               torch.from_numpy(got).sum((1, 2)) / labelled)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ignored_and_masked_pixels_get_zero_gradient(name):
    logits, y = _batch(seed=1)
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(per_image_loss(name, logits, y, step=2, total_steps=5).sum(), logits)
    per_pixel = grad.abs().sum(1)
    ignored = y == IGN
    assert per_pixel[ignored].max() == 0
    wrong = (logits.detach().argmax(1) != y) & ~ignored
    assert wrong.any()
    if name in ("mce", "mce-bal", "mask-sph"):
        assert per_pixel[wrong].max() == 0
        assert (per_pixel[~wrong & ~ignored] > 0).all()
    else:
        assert (per_pixel[~ignored] > 0).all()


def test_mce_bal_gives_each_present_class_the_same_total_weight():
    y = torch.full((2, 8, 8), 0)
    y[0, :1, :3] = 1  # class 1: 3 pixels, class 0: 61, class 2 absent
    y[0, 7, :] = IGN
    y[1, :, :4] = 2
    weights = class_balance_weights(y, 3)
    for n in range(2):
        present = torch.unique(y[n][y[n] != IGN])
        totals = [float(weights[n][y[n] == c].sum()) for c in present]
        assert totals == pytest.approx([1.0] * len(present))
        assert weights[n][y[n] == IGN].sum() == 0
    # behaviour: with every pixel correct and a per-class constant CE, the loss is Σ_c CE_c / labelled pixels,
    # independent of how many pixels each class has, while plain Mask-CE is dominated by the large class
    logits = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    level = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    target = y.clamp(max=2)
    logits.scatter_(1, target.unsqueeze(1), level[target].unsqueeze(1))
    ce = torch.log(torch.exp(level) + 2) - level  # CE of a pixel of class c
    labelled = (y != IGN).sum((1, 2)).double()
    bal = per_image_loss("mce-bal", logits, y)
    torch.testing.assert_close(bal[0], (ce[0] + ce[1]) / labelled[0])
    torch.testing.assert_close(bal[1], (ce[0] + ce[2]) / labelled[1])
    plain = per_image_loss("mce", logits, y)
    torch.testing.assert_close(plain[0], (53 * ce[0] + 3 * ce[1]) / labelled[0])


def _objective_grad(bound, logits, **kwargs):
    x = logits.detach().requires_grad_(True)
    value, correct, objective = bound(x, **kwargs)
    (grad,) = torch.autograd.grad(objective, x)
    return value, correct, grad


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_attack_loss_is_the_reference_loss_with_a_per_image_power_of_two(name):
    logits, y = _batch(seed=2, n=4, h=9, w=5)
    y[3] = IGN  # an image without labelled pixels
    logits.requires_grad_(True)
    ref = per_image_loss(name, logits, y, step=4, total_steps=7)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    bound = AttackLoss(name, y)
    value, correct, grad = _objective_grad(bound, logits, step=4, total_steps=7)
    scale = bound.grad_scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad * scale, rtol=1e-10, atol=1e-12)
    want_correct = ((logits.detach().argmax(1) == y) & (y != IGN)).sum((1, 2))
    assert correct.tolist() == want_correct.tolist()
    assert value[3] == 0 and correct[3] == 0 and grad[3].abs().max() == 0
    # a restricted copy gives the rows of the full batch
    sub = bound.select(torch.tensor([2, 0]))
    sub_value, _, sub_grad = _objective_grad(sub, logits[[2, 0]], step=4, total_steps=7)
    torch.testing.assert_close(sub_value, ref.detach()[[2, 0]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sub_grad, (ref_grad * scale)[[2, 0]], rtol=1e-10, atol=1e-12)


def test_js_is_bounded_by_log2_and_zero_when_confidently_right():
    logits = torch.zeros(1, K, 1, 3, dtype=torch.float64)
    logits[0, 0, 0, 0] = 60.0  # confidently right
    logits[0, 1, 0, 1] = 60.0  # confidently wrong
    y = torch.zeros(1, 1, 3, dtype=torch.long)
    js = pixel_loss("js", logits, y)[0, 0]
    assert js[0] == pytest.approx(0.0, abs=1e-12)
    assert js[1] == pytest.approx(math.log(2), abs=1e-12)
    assert 0 < js[2] < math.log(2)


def test_attack_loss_rejects_labels_outside_the_classes_and_unknown_names():
    logits, y = _batch()
    y[0, 1, 1] = K  # not a class and not the ignore value
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        AttackLoss("ce", y)(logits)
    with pytest.raises(ValueError, match="valid losses: ce, mce, mce-bal, js, segpgd, cospgd, mask-sph"):
        AttackLoss("dice", y)


@pytest.mark.realpath
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ce_tracking_reports_cross_entropy_but_keeps_the_loss_gradient(name):
    logits, y = _batch(seed=4, n=3, h=8, w=6)
    own = _objective_grad(AttackLoss(name, y), logits, step=2, total_steps=9)
    tracked = _objective_grad(AttackLoss(name, y, track="ce"), logits, step=2, total_steps=9)
    torch.testing.assert_close(tracked[0], per_image_loss("ce", logits, y), rtol=1e-12, atol=1e-12)
    assert torch.equal(tracked[1], own[1])
    assert torch.equal(tracked[2], own[2])
    if name != "ce":
        assert not torch.allclose(tracked[0], own[0])
    with pytest.raises(ValueError, match="unknown track 'best'; valid: ce, own"):
        AttackLoss(name, y, track="best")


@pytest.mark.realpath
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_scaled_gradient_is_the_summed_loss_gradient_times_an_exact_power_of_two(name):
    # 473² labels with one 3-pixel class: the pixel-averaged gradient is ~1/(pixels) per pixel, what underflows in
    # a float16 backward pass; the scaled one has its largest per-pixel weight in (½, 1]
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (2, 473, 473), generator=g)
    y[0, 0, :3] = 4
    y[1, :100] = IGN
    logits = torch.randn(2, K, 473, 473, generator=g)
    bound = AttackLoss(name, y)
    value, _, scaled = _objective_grad(bound, logits, step=1, total_steps=4)
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(per_image_loss(name, x, y, step=1, total_steps=4).sum(), x)
    scale = bound.grad_scale
    torch.testing.assert_close(value, per_image_loss(name, logits, y, step=1, total_steps=4))
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale) and (scale >= 1).all()
    torch.testing.assert_close(scaled, grad * scale.view(-1, 1, 1, 1), rtol=1e-6, atol=0)
    labelled = (y != IGN).sum((1, 2)).double()
    weight = 1 / labelled  # the largest per-pixel weight of the per-image mean
    if name == "mce-bal":  # the smallest class's pixels: 3 in image 0; image 1's rarest of 3 classes
        counts = torch.stack([torch.bincount(y[i][y[i] != IGN], minlength=K) for i in range(2)]).double()
        weight = weight / torch.where(counts > 0, counts, torch.inf).amin(1)
    weight = weight * scale.double()
    assert ((weight > 0.5) & (weight <= 1)).all(), weight
    if name != "mask-sph":  # |softmax − onehot| ≤ 1 per class: the summed loss's gradient is O(1), not O(1/pixels)
        assert float(scaled.abs().amax()) > 1e-2
        assert float(grad.abs().amax()) < 1e-4


@pytest.mark.realpath
def test_cross_entropy_and_its_gradient_equal_torchs():
    logits, y = _batch(seed=7, n=3, h=5, w=4)
    x = logits.clone().requires_grad_(True)
    ours = pixel_loss("ce", x, y)
    w = torch.rand(ours.shape, dtype=ours.dtype, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((ours * w).sum(), x)
    ref_x = logits.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_x, y, ignore_index=IGN, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), ref_x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    # every loss's autograd gradient through it against finite differences (CosPGD's weight is not differentiated)
    for name in (n for n in LOSS_NAMES if n != "cospgd"):
        small = y[:, :2, :3]
        assert torch.autograd.gradcheck(lambda t, name=name, small=small: per_image_loss(name, t, small, step=1,
                                                                                         total_steps=3),
                                        (logits[:, :, :2, :3].clone().requires_grad_(True),))


@pytest.mark.realpath
def test_mask_sph_closed_form_gradient_equals_autograd_of_the_plain_formula():
    logits, y = _batch(seed=8, n=3, h=6, w=5)
    logits[2, :, 0, 0] = 0.0  # a pixel whose logits have no direction (norm below the clamp)
    y[2, 0, 0] = 0
    w = torch.rand(y.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(2))

    def plain(u):
        correct = (u.detach().argmax(1) == y) & (y != IGN)
        u_y = u.gather(1, torch.where(y == IGN, 0, y).unsqueeze(1)).squeeze(1)
        return -(u_y / (u * u).sum(1).sqrt().clamp_min(1e-12)) * correct

    ref_x = logits.clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad((plain(ref_x) * w).sum(), ref_x)
    x = logits.clone().requires_grad_(True)
    ours = pixel_loss("mask-sph", x, y)
    (grad,) = torch.autograd.grad((ours * w).sum(), x)
    torch.testing.assert_close(ours, plain(logits), rtol=1e-12, atol=1e-12)
    # there autograd's sqrt backward gives NaN (0·inf); the closed form gives the clamped function's gradient,
    # −w / 1e-12 on the true class and 0 elsewhere
    assert torch.isnan(ref_grad[2, :, 0, 0]).all()
    assert torch.isfinite(grad).all()
    ref_grad[2, :, 0, 0] = 0.0
    ref_grad[2, 0, 0, 0] = -w[2, 0, 0] / 1e-12
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    # through AttackLoss, whose workspaces are reused from one call to the next
    bound = AttackLoss("mask-sph", y, track="own")
    scale = None
    for _ in range(2):
        value, _, got = _objective_grad(bound, logits)
        scale = bound.grad_scale.view(-1, 1, 1, 1)
        labelled = (y != IGN).sum((1, 2)).to(logits.dtype).view(-1, 1, 1, 1)
        ref_x = logits.clone().requires_grad_(True)
        (want,) = torch.autograd.grad((plain(ref_x).unsqueeze(1) * scale / labelled).sum(), ref_x)
        want[2, :, 0, 0] = 0.0
        want[2, 0, 0, 0] = -(scale / labelled)[2, 0, 0, 0] / 1e-12
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert scale is not None
