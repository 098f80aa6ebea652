"""SEA on a small trained net: worst case vs single attacks, greedy mIoU, combining results, bad input."""

import dataclasses
import pickle

import pytest
import torch

from orchestrator.config import REPO_ROOT, SeaConfig, load_config
from orchestrator.summary import sea_ensemble, summary_markdown
from tests.segtoy import NUM_CLASSES
from trainables.attacks import SEA_LOSSES, SeaResult, aggregate, apgd, sea
from trainables.losses import TRACKS
from trainables.metrics import intersection_union

EPS = 8 / 255
LOSSES = ("mce-bal", "mce", "js")


@pytest.fixture(scope="module")
def result(model, batch):
    """The paper's three losses, each tracking its own value (the ensemble before issue 13)."""
    x, y = batch
    return sea(model, x, y, eps=EPS, num_classes=NUM_CLASSES, n_iter=50, losses=LOSSES, seed=0,
               ids=torch.arange(8) * 10, return_adv=True, track="own")


@pytest.fixture(scope="module")
def default_result(model, batch):
    """The default ensemble and tracking."""
    x, y = batch
    return sea(model, x, y, eps=EPS, num_classes=NUM_CLASSES, n_iter=20, seed=0)


def test_worst_case_is_at_most_every_single_attack(result):
    scores = aggregate([result], NUM_CLASSES)
    assert set(scores) == {"clean", "worst", *LOSSES}
    for name, s in scores.items():
        print(f"{name:8s} " + "  ".join(f"{k} {v:.4f}" for k, v in s.items()))
    worst = scores["worst"]
    assert scores["clean"]["miou"] > 0.95 and worst["miou"] < 0.3
    for name in ("clean", *LOSSES):
        assert worst["aacc"] <= scores[name]["aacc"]
        assert worst["miou"] <= scores[name]["miou"]
    assert worst["miou_greedy"] <= worst["miou_by_acc"]
    assert worst["miou"] <= worst["miou_greedy"]


def test_result_counts_match_the_adversarial_images(model, batch, result):
    x, y = batch
    assert result.losses == LOSSES and len(result) == 8 and result.eps == EPS
    assert result.labelled.tolist() == (y != 255).sum((1, 2)).tolist()
    with torch.no_grad():
        for name in ("clean", *LOSSES):
            images = x if name == "clean" else result.adv[name]
            if name != "clean":
                assert float((images - x).abs().max()) <= EPS + 1e-6
                assert images.min() >= 0 and images.max() <= 1
            inter, union, correct, _ = intersection_union(model(images).argmax(1), y, NUM_CLASSES)
            assert torch.equal(result.inter[name], inter)
            assert torch.equal(result.union[name], union)
            assert torch.equal(result.correct[name], correct)
    assert set(result.seconds) == {"clean", *LOSSES}


def _slice(r: SeaResult, index) -> SeaResult:
    pick = {name: t[index] for name, t in r.inter.items()}
    return dataclasses.replace(
        r, area=r.area[index], labelled=r.labelled[index], inter=pick,
        union={name: t[index] for name, t in r.union.items()},
        correct={name: t[index] for name, t in r.correct.items()},
        ids=None if r.ids is None else r.ids[index], adv=None,
    )


def _flat(scores):
    return {(name, key): value for name, s in scores.items() for key, value in s.items()}


def test_results_from_many_actors_combine_in_any_order(result):
    whole = _flat(aggregate([result], NUM_CLASSES))
    parts = [_slice(result, torch.tensor(i)) for i in ([5, 1, 7], [0, 6], [3, 2, 4])]
    parts = [pickle.loads(pickle.dumps(p)) for p in parts]  # as if returned by remote actors
    assert _flat(aggregate(parts, NUM_CLASSES)) == pytest.approx(whole)
    assert _flat(aggregate(parts[::-1], NUM_CLASSES)) == pytest.approx(whole)


def _handmade(correct, inter, union, area, ids=None):
    t = torch.tensor
    return SeaResult(
        eps=EPS, losses=("a", "b"), num_classes=2, area=t(area), labelled=t(area).sum(1),
        inter={k: t(v) for k, v in inter.items()}, union={k: t(v) for k, v in union.items()},
        correct={k: t(v) for k, v in correct.items()}, ids=None if ids is None else t(ids),
    )


def test_greedy_miou_beats_picking_by_accuracy():
    # one image, 90 pixels of class 0 and 10 of class 1: attack a flips 20 background pixels (accuracy 80%),
    # attack b wipes out the small class (accuracy 90%) and so hurts mIoU more
    r = _handmade(
        correct={"clean": [100], "a": [80], "b": [90]},
        inter={"clean": [[90, 10]], "a": [[70, 10]], "b": [[90, 0]]},
        union={"clean": [[90, 10]], "a": [[90, 30]], "b": [[100, 10]]},
        area=[[90, 10]],
    )
    worst = aggregate([r], 2)["worst"]
    assert worst["aacc"] == pytest.approx(0.8)
    assert worst["miou_by_acc"] == pytest.approx((70 / 90 + 10 / 30) / 2)
    assert worst["miou_greedy"] == pytest.approx(0.45)
    assert worst["miou"] == pytest.approx(0.45)
    assert worst["macc"] == pytest.approx((70 / 90 + 1) / 2)


def test_same_seed_same_result(model, batch):
    x, y = batch
    runs = [sea(model, x[:3], y[:3], eps=EPS, num_classes=NUM_CLASSES, n_iter=6, losses=("mce", "js"), seed=4)
            for _ in range(2)]
    for name in ("clean", "mce", "js"):
        assert torch.equal(runs[0].inter[name], runs[1].inter[name])
        assert torch.equal(runs[0].union[name], runs[1].union[name])


def test_aggregate_rejects_results_that_do_not_belong_together(result):
    other = dataclasses.replace(result, losses=("mce",))
    with pytest.raises(ValueError, match="differ in losses, eps, defense or track"):
        aggregate([result, other], NUM_CLASSES)
    with pytest.raises(ValueError, match=r"\(.*, ce\) vs \(.*, own\)"):
        aggregate([result, dataclasses.replace(result, track="ce")], NUM_CLASSES)
    with pytest.raises(ValueError, match="duplicate image ids"):
        aggregate([result, result], NUM_CLASSES)
    with pytest.raises(ValueError, match="some results carry image ids"):
        aggregate([result, dataclasses.replace(result, ids=None)], NUM_CLASSES)
    with pytest.raises(ValueError, match="aggregate was asked for 5"):
        aggregate([result], 5)
    with pytest.raises(ValueError, match="no results"):
        aggregate([], NUM_CLASSES)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"eps": -0.1}, "negative"),
        ({"n_iter": 0}, "n_iter = 0"),
        ({"losses": ("mce", "focal")}, "unknown attack loss 'focal'; valid losses: ce, mce, mce-bal"),
        ({"losses": ("mce", "mce")}, "lists a loss twice"),
        ({"losses": ()}, "non-empty"),
        ({"num_classes": 3}, r"label values \[3\] are outside \[0, 3\)"),
        ({"defense": "jpeg"}, "defense = 'jpeg'; valid: None, 'nlm', 'nlm-bpda'"),
        ({"ids": [1, 2]}, "ids must be 4 integers"),
        pytest.param({"track": "best"}, "sea: unknown track 'best'; valid: ce, own", marks=pytest.mark.realpath),
    ],
)
def test_sea_rejects_bad_input(model, batch, kwargs, error):
    x, y = batch
    settings = {"eps": EPS, "num_classes": NUM_CLASSES, "n_iter": 2, **kwargs}
    with pytest.raises(ValueError, match=error):
        sea(model, x[:4], y[:4], **settings)


def test_sea_rejects_images_outside_the_unit_range(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        sea(model, x[:2] - 0.5, y[:2], eps=EPS, num_classes=NUM_CLASSES, n_iter=2)


@pytest.mark.realpath
def test_default_ensemble_is_the_reference_codes_four_losses_and_mce_bal_tracked_by_ce(default_result):
    assert {"mce", "segpgd", "js", "mask-sph"} < set(SEA_LOSSES) and "mce-bal" in SEA_LOSSES
    config = SeaConfig()
    assert config.losses == list(SEA_LOSSES) and config.track == "ce"
    assert set(SeaConfig.model_fields["track"].annotation.__args__) == set(TRACKS)
    assert default_result.losses == SEA_LOSSES and default_result.track == "ce"
    scores = aggregate([default_result], NUM_CLASSES)
    worst = scores["worst"]
    print("  ".join(f"{name} {s['miou']:.4f}" for name, s in scores.items()))
    assert scores["clean"]["miou"] > 0.95 and worst["miou"] < 0.3
    for name in ("clean", *SEA_LOSSES):
        assert worst["aacc"] <= scores[name]["aacc"]
        assert worst["miou"] <= scores[name]["miou"]
    assert worst["miou"] <= min(worst["miou_greedy"], worst["miou_by_acc"])
    recipes = sorted((REPO_ROOT / "experiments" / "configs").glob("*.yaml"))
    assert len(recipes) == 13  # 7 training configs (demo and pir_claim included), 6 evaluation recipes (eval_*)
    for path in recipes:  # the paper's recipes name the ensemble; the demo takes the default
        recipe = load_config(path).sea
        assert (recipe.losses, recipe.track) == (list(SEA_LOSSES), "ce"), path.name


@pytest.mark.realpath
def test_sea_runs_each_loss_with_the_tracking_asked_for(model, batch):
    x, y = batch[0][:3], batch[1][:3]
    runs = {track: sea(model, x, y, eps=EPS, num_classes=NUM_CLASSES, n_iter=10, losses=("js", "mce"), seed=2,
                       return_adv=True, track=track) for track in TRACKS}
    for track, r in runs.items():
        assert r.track == track
        for j, name in enumerate(("js", "mce")):
            alone = apgd(model, x, y, eps=EPS, n_iter=10, loss=name, seed=2 + j, track=track)
            assert torch.equal(r.adv[name], alone), (track, name)
    assert not torch.equal(runs["ce"].adv["mce"], runs["own"].adv["mce"])


@pytest.mark.realpath
def test_summary_names_the_ensemble_that_ran():
    config = load_config(REPO_ROOT / "experiments" / "configs" / "demo.yaml", ["sea.losses=[mce,js]", "sea.track=own",
                                                                                   "sea.iterations=20"])
    text = summary_markdown([{"trial_name": "a", "sea_miou_eps8": 0.25}], sea_ensemble(config))
    assert "SEA ensemble: APGD with red-ε, 20 iterations for each of mce, js; step sizes and restarts tracked by " \
           "each loss itself." in text
    default = sea_ensemble(load_config(REPO_ROOT / "experiments" / "configs" / "demo.yaml"))
    assert "mce-bal, mce, js, segpgd, mask-sph" in default and "per-image cross-entropy" in default
