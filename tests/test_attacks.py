"""Attacks on a small trained segmentation net: validity, APGD vs PGD, red-ε, determinism, early exit, bad input."""

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from tests.segtoy import NUM_CLASSES, make_batch
from trainables.attacks import AttackValidityError, apgd, check_valid, fgsm, ifgsm, least_likely, pgd
from trainables.attacks.apgd import _take, checkpoints, stage_plan
from trainables.attacks.pgd import ifgsm_steps
from trainables.losses import LOSS_NAMES
from trainables.metrics import confusion_matrix, scores

EPS = 8 / 255


def _scores(model, x, y):
    with torch.no_grad():
        return scores(confusion_matrix(model(x).argmax(1), y, NUM_CLASSES))


def _linf(a, b):
    return float((a - b).abs().max())


def test_trained_model_is_accurate_on_clean_images(model, batch):
    assert _scores(model, *batch)["miou"] > 0.95


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("red_eps", [True, False])
def test_apgd_returns_valid_points_that_lower_accuracy(model, batch, loss, red_eps):
    x, y = batch
    x_adv = apgd(model, x, y, eps=EPS, n_iter=8, loss=loss, red_eps=red_eps, seed=0)
    assert _linf(x_adv, x) <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert _scores(model, x_adv, y)["aacc"] < _scores(model, x, y)["aacc"] - 0.05


def test_pgd_family_returns_valid_points(model, batch):
    x, y = batch
    outputs = {
        "pgd": pgd(model, x, y, eps=EPS, steps=3, step_size=0.01, random_start=True, seed=1),
        "fgsm": fgsm(model, x, y, eps=EPS),
        "ifgsm": ifgsm(model, x, y, eps=EPS),
        "least_likely": least_likely(model, x, y, eps=EPS),
    }
    clean = _scores(model, x, y)["aacc"]
    for name, x_adv in outputs.items():
        assert _linf(x_adv, x) <= EPS + 1e-6, name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, name
        assert _scores(model, x_adv, y)["aacc"] < clean, name
    assert torch.equal(pgd(model, x, y, eps=EPS, steps=0, step_size=0.01), x)


def test_least_likely_pushes_pixels_towards_the_least_likely_class(model, batch):
    x, y = batch
    with torch.no_grad():
        logits = model(x)
        target = logits.argmin(1)
        before = (logits.argmax(1) == target).float().mean()
        ce_before = nn.functional.cross_entropy(logits, target)
        x_adv = least_likely(model, x, y, eps=EPS, steps=10)
        logits = model(x_adv)
        after = (logits.argmax(1) == target).float().mean()
        ce_after = nn.functional.cross_entropy(logits, target)
    assert before == 0 and after > 0.05
    assert ce_after < 0.7 * ce_before


def test_apgd_ce_lowers_miou_at_least_as_much_as_pgd_ce(model, batch):
    x, y = batch
    x_pgd = pgd(model, x, y, eps=EPS, steps=50, step_size=EPS / 4)
    x_apgd = apgd(model, x, y, eps=EPS, n_iter=50, loss="ce", seed=0)
    clean, by_pgd, by_apgd = (_scores(model, v, y)["miou"] for v in (x, x_pgd, x_apgd))
    print(f"mIoU clean {clean:.4f}  PGD-CE {by_pgd:.4f}  APGD-CE {by_apgd:.4f}")
    assert by_pgd < clean - 0.3
    assert by_apgd <= by_pgd


class _Recorder(nn.Module):
    """Wraps a model and records the batch size and ℓ∞ distance from the clean images of every forward."""

    def __init__(self, model, x):
        super().__init__()
        self.model, self.x, self.calls = model, x, []
        self.train(model.training)  # the attacks restore the wrapper's mode, hence the model's, afterwards

    def forward(self, x_in):
        n = x_in.shape[0]
        distance = float((x_in.detach() - self.x[:n]).abs().max()) if n == self.x.shape[0] else None
        self.calls.append((n, distance))
        return self.model(x_in)


def test_red_eps_explores_twice_eps_but_returns_points_within_eps(model, batch):
    x, y = batch
    recorder = _Recorder(model, x)
    x_adv = apgd(recorder, x, y, eps=EPS, n_iter=20, loss="mce", seed=3)
    seen = [d for _, d in recorder.calls if d is not None]
    assert max(seen) > 1.9 * EPS  # first stage works in the 2ε ball
    assert _linf(x_adv, x) <= EPS + 1e-6  # the result is in the ε ball, not 2ε
    assert _linf(x_adv, x) > 0.99 * EPS


def test_same_seed_same_result(model, batch):
    x, y = batch
    a = apgd(model, x, y, eps=EPS, n_iter=12, loss="js", seed=5)
    b = apgd(model, x, y, eps=EPS, n_iter=12, loss="js", seed=5)
    c = apgd(model, x, y, eps=EPS, n_iter=12, loss="js", seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(11)
    d = apgd(model, x, y, eps=EPS, n_iter=12, loss="js")
    torch.manual_seed(11)
    e = apgd(model, x, y, eps=EPS, n_iter=12, loss="js")
    assert torch.equal(d, e)


def test_attacks_restore_the_model_mode(model, batch):
    x, y = batch
    model.train()
    try:
        apgd(model, x, y, eps=EPS, n_iter=2, loss="ce", seed=0)
        pgd(model, x, y, eps=EPS, steps=1, step_size=0.01)
        assert model.training
    finally:
        model.eval()
    apgd(model, x, y, eps=EPS, n_iter=2, loss="ce", seed=0)
    assert not model.training


class _AlwaysBackground(nn.Module):
    """Predicts class 0 everywhere whatever the input (a huge bias), with a gradient path to the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)
        with torch.no_grad():
            self.conv.bias.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0]))

    def forward(self, x):
        return self.conv(x)


def test_images_at_zero_accuracy_leave_the_batch():
    x = torch.rand(4, 3, 8, 8)
    y = torch.zeros(4, 8, 8, dtype=torch.long)
    y[1] = 2  # never predicted: 0% accuracy from the first iteration
    y[3] = 255  # nothing labelled: nothing to attack
    recorder = _Recorder(_AlwaysBackground(), x)
    apgd(recorder, x, y, eps=EPS, n_iter=10, loss="ce", red_eps=False, seed=0)
    sizes = [n for n, _ in recorder.calls]
    assert sizes == [4] + [2] * 9
    recorder.calls.clear()
    apgd(recorder, x[[1, 3]], y[[1, 3]], eps=EPS, n_iter=10, loss="ce", red_eps=True, seed=0)
    assert [n for n, _ in recorder.calls] == [2, 2, 2]  # every stage ends after its first iteration


def test_best_point_updates_copy_images_exactly():
    g = torch.Generator().manual_seed(0)
    into = torch.rand(5, 3, 7, 9, generator=g)
    source = torch.rand(5, 3, 7, 9, generator=g) * 1e-3 + torch.tensor([0.0, 1.0, 1e-8, 0.5, 1.0]).view(-1, 1, 1, 1)
    mask = torch.tensor([True, False, True, True, False])
    want = torch.where(mask.view(-1, 1, 1, 1), source, into)
    _take(into, source, mask)
    assert torch.equal(into, want)


def test_schedules():
    assert stage_plan(300, True) == [(2.0, 90), (1.5, 90), (1.0, 120)]
    assert stage_plan(50, True) == [(2.0, 15), (1.5, 15), (1.0, 20)]
    assert stage_plan(1, True) == [(1.0, 1)]
    assert stage_plan(7, False) == [(1.0, 7)]
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == []
    assert [ifgsm_steps(e / 255) for e in (0.25, 1, 2, 4, 8, 16)] == [1, 1, 2, 5, 10, 20]


def test_check_valid_rejects_points_outside_the_ball_or_the_box():
    x = torch.full((1, 3, 4, 4), 0.5)
    check_valid(x + EPS, x, EPS)
    with pytest.raises(AttackValidityError, match="exceeds eps"):
        check_valid(x + EPS + 1e-4, x, EPS)
    bad = x.clone()
    bad[0, 0, 0, 0] = 1.01
    with pytest.raises(AttackValidityError, match=r"outside \[0, 1\]"):
        check_valid(bad, x, 0.6)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"eps": -1 / 255}, "negative"),
        ({"eps": 8.0}, "trainables.units.to_unit"),
        ({"n_iter": 0}, "n_iter = 0; must be an integer >= 1"),
        ({"n_iter": 2.5}, "n_iter = 2.5"),
        ({"loss": "dice"}, "valid losses: ce, mce, mce-bal, js, segpgd, cospgd, mask-sph"),
        pytest.param({"track": "best"}, "apgd: unknown track 'best'; valid: ce, own", marks=pytest.mark.realpath),
    ],
)
def test_apgd_rejects_bad_settings(model, batch, kwargs, error):
    x, y = batch
    settings = {"eps": EPS, "n_iter": 2, "loss": "ce", **kwargs}
    with pytest.raises(ValueError, match=error):
        apgd(model, x, y, **settings)


def test_attacks_reject_bad_images_and_labels(model, batch):
    x, y = batch
    bad_labels = y.clone()
    bad_labels[0, 0, 0] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"label values \[4\] are outside \[0, 4\)"):
        apgd(model, x, bad_labels, eps=EPS, n_iter=2, loss="ce")
    negative = y.clone()
    negative[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"label values \[-1\]"):
        pgd(model, x, negative, eps=EPS, steps=2, step_size=0.01)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        apgd(model, x * 255, y, eps=EPS, n_iter=2, loss="ce")
    with pytest.raises(ValueError, match="labels must be N×H×W"):
        apgd(model, x, y[:, :10], eps=EPS, n_iter=2, loss="ce")
    with pytest.raises(ValueError, match="steps = -1"):
        pgd(model, x, y, eps=EPS, steps=-1, step_size=0.01)
    with pytest.raises(ValueError, match="step_size"):
        pgd(model, x, y, eps=EPS, steps=1, step_size=0)


# -- mixed precision, memory format and tracking (issue 13) ------------------------------------------------------

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(precision):
    """The region PirAt runs its attack in for train.precision (CPU autocast takes both reduced dtypes)."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


@pytest.fixture(scope="module")
def crops():
    """Two 473×473 images: the VOC crop size, where a pixel-averaged loss gives per-pixel gradients of ~4e-6."""
    return make_batch(2, seed=3, size=473)


@pytest.mark.realpath
@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_pgd_step_moves_the_free_pixels_by_the_full_step(model, crops, precision):
    x, y = crops
    step = 2 / 255
    with _autocast(precision):
        x_adv = pgd(model, x, y, eps=EPS, steps=1, step_size=step)
    free = (x - step >= 0) & (x + step <= 1)  # neither [0, 1] nor the ε-ball clips a step here
    moved = ((x_adv - x).abs() >= step * (1 - 1e-4)) & free
    share = float(moved.sum()) / float(free.sum())
    print(f"{precision}: {100 * share:.3f}% of {int(free.sum())} free entries moved by the full step")
    assert share >= 0.99


@pytest.mark.realpath
@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_pgd_lowers_accuracy_under_every_precision(model, crops, precision):
    x, y = crops
    with _autocast(precision):
        x_adv = pgd(model, x, y, eps=EPS, steps=2, step_size=4 / 255)
    clean, attacked = (_scores(model, v, y)["aacc"] for v in (x, x_adv))
    print(f"{precision}: aAcc clean {clean:.4f}, after 2-step PGD at 8/255 {attacked:.4f}")
    assert clean > 0.99
    assert attacked < clean - 0.25


class _Layouts(nn.Module):
    """Wraps a model and records whether each input it receives is stored channels-last."""

    def __init__(self, model):
        super().__init__()
        self.model, self.channels_last = model, []
        self.train(model.training)  # the attacks restore the wrapper's mode, hence the model's, afterwards

    def forward(self, x_in):
        self.channels_last.append(x_in.is_contiguous(memory_format=torch.channels_last))
        return self.model(x_in)


@pytest.mark.realpath
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_attack_iterate_keeps_the_channels_last_layout(model, batch, precision):
    x, y = batch
    x = x.contiguous(memory_format=torch.channels_last)
    wrapped = _Layouts(model.to(memory_format=torch.channels_last))
    try:
        with _autocast(precision):
            x_pgd = pgd(wrapped, x, y, eps=EPS, steps=3, step_size=0.01, random_start=True, seed=0)
            x_apgd = apgd(wrapped, x, y, eps=EPS, n_iter=30, loss="mce", seed=0)  # red-ε stages and restarts
    finally:
        model.to(memory_format=torch.contiguous_format)
    assert len(wrapped.channels_last) == 33
    assert all(wrapped.channels_last)
    assert x_pgd.is_contiguous(memory_format=torch.channels_last)
    assert x_apgd.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.realpath
@pytest.mark.parametrize("loss", ["mce", "mce-bal"])
def test_ce_tracking_is_at_least_as_strong_as_tracking_the_masked_loss(model, batch, loss):
    x, y = batch
    runs = {track: apgd(model, x, y, eps=EPS, n_iter=20, loss=loss, seed=0, track=track) for track in ("own", "ce")}
    own, ce = (_scores(model, runs[track], y) for track in ("own", "ce"))
    print(f"{loss}: mIoU own {own['miou']:.4f} ce {ce['miou']:.4f}; aAcc own {own['aacc']:.4f} ce {ce['aacc']:.4f}")
    assert ce["miou"] <= own["miou"]
    assert ce["aacc"] <= own["aacc"]
