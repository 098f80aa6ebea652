"""The panoptic seed's baseline attacks and the NLM defence, reachable from a config (`sea.extra_attacks`,
`sea.extra_in_worst`, `sea.defense`): validated, run by the SEA actor's batch scoring, kept apart from SEA's
worst case unless asked, the defended model scored beside the bare one, and logged and planned by name.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from orchestrator.config import EXTRA_ATTACKS, SEA_DEFENSES, ConfigError, load_config
from orchestrator.plan import build_plan, format_plan
from orchestrator.scores import final_metrics, score_group
from orchestrator.sea_pool import combine, image_key, score_batch
from orchestrator.summary import summary_markdown
from orchestrator.tracking import SweepTracker
from tests.conftest import REPO
from tests.segtoy import NUM_CLASSES, make_batch
from trainables.attacks import ScoreAt, aggregate, fgsm, ifgsm, least_likely, sea
from trainables.attacks.baselines import BASELINES, baselines, merge_results
from trainables.defense import DEFENSES, NLMDefended, nlm_denoise
from trainables.metrics import intersection_union

pytestmark = pytest.mark.realpath

DEMO = REPO / "tests" / "tiny.yaml"
CPU = torch.device("cpu")
EPS = 4.0  # 1/255 units, as the config
ALL = ["fgsm", "ifgsm", "least-likely"]
# two APGD iterations of Mask-CE: weak enough that the baselines beat it on some images (checked below)
BASE = {"eps": [EPS], "iterations": 2, "losses": ["mce"], "seed": 0, "track": "ce"}


@pytest.fixture(scope="module")
def tensors():
    x, y = make_batch(4, seed=5, size=32)
    return {"image": x, "label": y, "id": [f"2007_00000{i}" for i in range(4)]}


def _counts(model, x, y):
    with torch.no_grad():
        inter, union, correct, _ = intersection_union(model(x).argmax(1), y, NUM_CLASSES)
    return inter, union, correct


def _equal_counts(result, name, counts) -> bool:
    return all(torch.equal(getattr(result, k)[name], c) for k, c in zip(("inter", "union", "correct"), counts,
                                                                        strict=True))


# ---------------------------------------------------------------------------------------------
# Config


def test_config_keys_default_empty_accept_one_name_or_a_list():
    sea_config = load_config(DEMO).sea
    assert sea_config.extra_attacks == [] and sea_config.defense == [] and sea_config.extra_in_worst is False
    config = load_config(DEMO, ["sea.extra_attacks=[fgsm, least-likely]", "sea.defense=nlm-bpda",
                                "sea.extra_in_worst=true"])
    assert config.sea.extra_attacks == ["fgsm", "least-likely"] and config.sea.defense == ["nlm-bpda"]
    assert load_config(DEMO, ["sea.defense=null", "sea.extra_attacks=ifgsm"]).sea.extra_attacks == ["ifgsm"]
    assert load_config(DEMO, ["sea.defense=[nlm, nlm-bpda]"]).sea.defense == ["nlm", "nlm-bpda"]
    # the names the config accepts are exactly those the attack and defence modules run
    assert tuple(BASELINES) == EXTRA_ATTACKS and set(DEFENSES) - {None} == set(SEA_DEFENSES)


@pytest.mark.parametrize("override, message", [
    ("sea.defense=median", "sea.defense = 'median': 'median' is not a defence; valid: nlm, nlm-bpda"),
    ("sea.defense=[nlm, nlm]", "sea.defense = ['nlm', 'nlm']: lists a defence twice"),
    ("sea.extra_attacks=[fgsm, pgd]",
     "sea.extra_attacks = ['fgsm', 'pgd']: 'pgd' is not an extra attack; valid: fgsm, ifgsm, least-likely"),
    ("sea.extra_attacks=3", "sea.extra_attacks = 3: must be null, one of fgsm, ifgsm, least-likely, or a list"),
    ("sea.extra_in_worst=true", "sea: extra_in_worst = true needs attacks in extra_attacks (it is empty)"),
    ("sea.extra_in_worst=maybe", "sea.extra_in_worst = 'maybe': must be true or false"),
    ("sea.extra_attack=[fgsm]", "sea.extra_attack: unknown key"),
    ("sea.defense_iterations=0", "sea.defense_iterations = 0: must be >= 1"),
])
def test_bad_values_are_one_line_errors_naming_key_value_and_what_is_valid(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(DEMO, [override])
    text = str(error.value)
    assert message in text and "\n" not in text


def test_plan_lists_the_extra_attacks_and_defences():
    plain = format_plan(build_plan(load_config(DEMO), "sqlite:///x.db"))
    assert "  extra attacks: none" in plain and "  defence: none" in plain
    config = load_config(DEMO, ["sea.extra_attacks=[fgsm, ifgsm]", "sea.defense=[nlm, nlm-bpda]", "sea.iterations=20"])
    text = format_plan(build_plan(config, "sqlite:///x.db"))
    assert "extra attacks: fgsm, ifgsm at every eps on the SEA images" in text
    assert "scored apart, not in SEA's worst case" in text
    assert "defence nlm: " in text and "(non-adaptive); logged as defense_nlm_*" in text
    assert "defence nlm-bpda: " in text and "with BPDA (SEA: 20 iterations); logged as defense_nlm-bpda_*" in text
    fewer = format_plan(build_plan(load_config(DEMO, ["sea.defense=nlm-bpda", "sea.defense_iterations=5"]), "x"))
    assert "with BPDA (SEA: 5 iterations)" in fewer
    asked = format_plan(build_plan(with_worst := load_config(DEMO, ["sea.extra_attacks=[ifgsm]",
                                                                    "sea.extra_in_worst=true"]), "x"))
    assert with_worst.sea.extra_in_worst and "also in SEA's worst case (sea.extra_in_worst)" in asked


# ---------------------------------------------------------------------------------------------
# The SEA actor's batch scoring


def test_score_batch_keeps_the_extra_attacks_apart_from_the_worst_case_unless_asked(model, tensors):
    x, y = tensors["image"], tensors["label"]
    plain = score_batch(model, tensors, BASE, NUM_CLASSES, device=CPU)
    apart = score_batch(model, tensors, {**BASE, "extra_attacks": ALL}, NUM_CLASSES, device=CPU)
    asked = score_batch(model, tensors, {**BASE, "extra_attacks": ALL, "extra_in_worst": True}, NUM_CLASSES,
                        device=CPU)
    assert set(plain[0]) == {"sea"} and set(apart[0]) == set(asked[0]) == {"sea", "extra"}

    # SEA's result is the one sea() gives, with or without the extra attacks beside it
    keys = [image_key(i) for i in tensors["id"]]
    direct = sea(model, x, y, eps=EPS / 255, num_classes=NUM_CLASSES, n_iter=2, losses=("mce",), ids=keys, seed=0)
    for result in (plain[0]["sea"], apart[0]["sea"]):
        assert result.losses == ("mce",)
        for name in ("clean", "mce"):
            assert _equal_counts(result, name, (direct.inter[name], direct.union[name], direct.correct[name]))

    # the extra attacks' own result: each attack's point (run here by hand) scored on the bare model
    extra = apart[0]["extra"]
    assert extra.losses == tuple(ALL) and extra.defense is None and extra.adv is None
    eps = EPS / 255
    points = {"fgsm": fgsm(model, x, y, eps=eps), "ifgsm": ifgsm(model, x, y, eps=eps),
              "least-likely": least_likely(model, x, y, eps=eps)}
    for name, point in points.items():
        assert _equal_counts(extra, name, _counts(model, point, y)), name
    assert _equal_counts(extra, "clean", _counts(model, x, y))

    worst_plain = aggregate([plain[0]["sea"]], NUM_CLASSES)["worst"]
    assert aggregate([apart[0]["sea"]], NUM_CLASSES)["worst"] == worst_plain  # not asked: unchanged
    # asked: the worst case takes, per image, the lowest accuracy over clean, SEA and the extra attacks
    merged = asked[0]["sea"]
    assert merged.losses == ("mce", *ALL)
    correct = torch.stack([direct.correct["clean"], direct.correct["mce"], *(extra.correct[n] for n in ALL)])
    worst_asked = aggregate([merged], NUM_CLASSES)["worst"]
    assert worst_asked["aacc"] == pytest.approx(float(correct.min(0).values.sum()) / float(direct.labelled.sum()))
    print(f"\nworst-case aAcc {worst_plain['aacc']:.4f} (SEA alone), {worst_asked['aacc']:.4f} (with "
          f"{', '.join(ALL)}); mIoU {worst_plain['miou']:.4f} -> {worst_asked['miou']:.4f}")
    assert worst_asked["aacc"] < worst_plain["aacc"] - 0.01  # the baselines beat 2-step Mask-CE on some images
    assert worst_asked["miou"] < worst_plain["miou"]


def test_score_batch_scores_the_defended_model_beside_the_bare_one(model, tensors):
    x, y = tensors["image"], tensors["label"]
    settings = {**BASE, "extra_attacks": ["fgsm"], "defense": ["nlm", "nlm-bpda"], "defense_iterations": 1}
    groups = score_batch(model, tensors, settings, NUM_CLASSES, device=CPU)[0]
    assert set(groups) == {"sea", "extra", "defense_nlm_sea", "defense_nlm_extra", "defense_nlm-bpda_sea",
                           "defense_nlm-bpda_extra"}
    # the undefended numbers are those of a run without a defence
    bare = score_batch(model, tensors, {**BASE, "extra_attacks": ["fgsm"]}, NUM_CLASSES, device=CPU)[0]
    for group in ("sea", "extra"):
        assert groups[group].defense is None
        for name in ("clean", *bare[group].losses):
            assert _equal_counts(groups[group], name,
                                 (bare[group].inter[name], bare[group].union[name], bare[group].correct[name]))
    eps = EPS / 255
    defended_clean = _counts(model, nlm_denoise(x), y)
    assert not torch.equal(defended_clean[2], _counts(model, x, y)[2])  # the filter changes the predictions
    for d in ("nlm", "nlm-bpda"):
        for kind in ("sea", "extra"):
            result = groups[f"defense_{d}_{kind}"]
            assert result.defense == d and _equal_counts(result, "clean", defended_clean)
    # non-adaptive: the bare model's FGSM point, scored through the filter; BPDA: FGSM through the filter
    bare_point = fgsm(model, x, y, eps=eps)
    assert _equal_counts(groups["defense_nlm_extra"], "fgsm", _counts(model, nlm_denoise(bare_point), y))
    bpda_point = fgsm(NLMDefended(model).eval(), x, y, eps=eps)
    assert not torch.equal(bpda_point, bare_point)
    assert _equal_counts(groups["defense_nlm-bpda_extra"], "fgsm", _counts(model, nlm_denoise(bpda_point), y))
    # SEA through the filter: BPDA attacks anew (defense_iterations of APGD), the non-adaptive group scores
    # the points SEA found on the bare model
    keys = [image_key(i) for i in tensors["id"]]
    bpda = sea(model, x, y, eps=eps, num_classes=NUM_CLASSES, n_iter=1, losses=("mce",), ids=keys, seed=0,
               defense="nlm-bpda")
    assert _equal_counts(groups["defense_nlm-bpda_sea"], "mce", (bpda.inter["mce"], bpda.union["mce"],
                                                                 bpda.correct["mce"]))
    found = sea(model, x, y, eps=eps, num_classes=NUM_CLASSES, n_iter=2, losses=("mce",), ids=keys, seed=0,
                return_adv=True).adv["mce"]
    assert _equal_counts(groups["defense_nlm_sea"], "mce", _counts(model, nlm_denoise(found), y))
    scores = {g: aggregate([r], NUM_CLASSES) for g, r in groups.items()}
    print("\n" + "\n".join(f"{g}: " + ", ".join(f"{n} {v['aacc']:.3f}" for n, v in s.items()) for g, s in
                           scores.items()))
    assert scores["defense_nlm_sea"]["clean"]["aacc"] < scores["sea"]["clean"]["aacc"]


def test_baselines_score_at_the_original_label_size_and_merge_only_matching_results(model, tensors):
    x, y = tensors["image"], tensors["label"]
    n, _, h, w = x.shape
    whole = ScoreAt(y, torch.tensor([[h, w]] * n), torch.tensor([[h, w]] * n))  # the labels are the original size
    eps = EPS / 255
    plain = baselines(model, x, y, eps=eps, num_classes=NUM_CLASSES, attacks=["ifgsm"])
    at_size = baselines(model, x, y, eps=eps, num_classes=NUM_CLASSES, attacks=["ifgsm"], score_at=whole)
    for name in ("clean", "ifgsm"):
        assert _equal_counts(at_size, name, (plain.inter[name], plain.union[name], plain.correct[name]))
    other = sea(model, x, y, eps=eps, num_classes=NUM_CLASSES, n_iter=2, losses=("mce",), seed=0)
    assert merge_results(other, plain).losses == ("mce", "ifgsm")
    with pytest.raises(ValueError, match="both results hold \\['ifgsm'\\]"):
        merge_results(plain, at_size)
    defended = baselines(model, x, y, eps=eps, num_classes=NUM_CLASSES, attacks=["fgsm"], defense="nlm")
    with pytest.raises(ValueError, match="differ in eps, classes or defense"):
        merge_results(other, defended)
    with pytest.raises(ValueError, match="attack 'pgd' is unknown; valid: fgsm, ifgsm, least-likely"):
        baselines(model, x, y, eps=eps, num_classes=NUM_CLASSES, attacks=["pgd"])


# ---------------------------------------------------------------------------------------------
# From the actors' batches to MLflow


def _two_batches(model, tensors, settings):
    """score_batch on the batch split in two, keyed as the driver keys the actors' rows."""
    results = {}
    for part in (slice(0, 2), slice(2, 4)):
        rows = {"image": tensors["image"][part], "label": tensors["label"][part], "id": tensors["id"][part]}
        for eps, groups in zip(settings["eps"], score_batch(model, rows, settings, NUM_CLASSES, device=CPU),
                               strict=True):
            results[(float(eps), ",".join(rows["id"]))] = groups
    return results


def test_groups_are_combined_logged_and_summarised_by_name(model, tensors, tmp_path, monkeypatch):
    settings = {**BASE, "extra_attacks": ["fgsm", "ifgsm"], "extra_in_worst": True, "defense": ["nlm-bpda"]}
    groups = combine(_two_batches(model, tensors, settings), NUM_CLASSES, ("fgsm", "ifgsm"))
    assert set(groups) == {"sea", "extra", "defense_nlm-bpda_sea", "defense_nlm-bpda_extra"}
    sea_scores = groups.pop("sea")
    assert set(sea_scores[EPS]) == {"clean", "mce", "worst"}  # the extra attacks' single scores live in "extra"
    assert set(groups["extra"][EPS]) == {"clean", "fgsm", "ifgsm", "worst"}
    worst = sea_scores[EPS]["worst"]
    assert worst["aacc"] <= min(groups["extra"][EPS][a]["aacc"] for a in ("fgsm", "ifgsm"))

    metrics = final_metrics(sea_scores[EPS]["clean"], sea_scores, 1.0, 0.5, groups)
    assert metrics["sea_aacc_eps4"] == worst["aacc"] and "sea_fgsm_miou_eps4" not in metrics
    assert metrics["extra_fgsm_miou_eps4"] == groups["extra"][EPS]["fgsm"]["miou"]
    assert metrics["extra_ifgsm_aacc_eps4"] == groups["extra"][EPS]["ifgsm"]["aacc"]
    assert not any(k.startswith(("extra_clean", "extra_worst", "extra_miou")) for k in metrics)
    defended = groups["defense_nlm-bpda_sea"][EPS]
    assert metrics["defense_nlm-bpda_clean_miou"] == defended["clean"]["miou"]
    assert metrics["defense_nlm-bpda_sea_miou_eps4"] == defended["worst"]["miou"]
    assert metrics["defense_nlm-bpda_sea_mce_aacc_eps4"] == defended["mce"]["aacc"]
    assert metrics["defense_nlm-bpda_extra_fgsm_miou_eps4"] == groups["defense_nlm-bpda_extra"][EPS]["fgsm"]["miou"]
    assert metrics["clean_miou"] != metrics["defense_nlm-bpda_clean_miou"]  # the bare numbers are not replaced
    assert score_group("extra", "nlm") == "defense_nlm_extra" and score_group("sea") == "sea"
    with pytest.raises(ValueError, match="score group 'worst'"):
        final_metrics({}, sea_scores, 1.0, 0.5, {"worst": {}})

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = load_config(DEMO, ["sweep.params={}", f"sweep.storage_path={tmp_path}/ray",
                                "sea.extra_attacks=[fgsm, ifgsm]", "sea.defense=nlm-bpda"])
    tracker = SweepTracker(uri, config)
    run_id = tracker.trial_run("only", config, {})
    tracker.log_result(run_id, clean=sea_scores[EPS]["clean"], sea=sea_scores, groups=groups, train_hours=1.0,
                       attack_hours=0.5, checkpoint_uri="/tmp/checkpoint")
    tracker.end_trial(run_id)
    tracker.finish()
    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id).data.metrics
    for key in ("extra_fgsm_miou_eps4", "defense_nlm-bpda_clean_miou", "defense_nlm-bpda_sea_miou_eps4",
                "defense_nlm-bpda_extra_ifgsm_aacc_eps4", "sea_miou_eps4"):
        assert logged[key] == pytest.approx(metrics[key]), key
    local = Path(client.download_artifacts(tracker.parent_run_id, "", str(tmp_path / "parent")))
    header = next(csv.reader(io.StringIO((local / "summary.csv").read_text())))
    order = [k for k in header if k.startswith(("sea_miou_eps", "extra_", "defense_")) or k == "train_hours"]
    assert order.index("sea_miou_eps4") < order.index("extra_fgsm_miou_eps4") < order.index(
        "defense_nlm-bpda_clean_miou") < order.index("defense_nlm-bpda_sea_miou_eps4") < order.index(
        "defense_nlm-bpda_extra_fgsm_miou_eps4") < order.index("train_hours")
    markdown = (local / "summary.md").read_text()
    columns = [c.strip() for c in markdown.splitlines()[0].strip("| ").split("|")]
    assert {"extra_fgsm_miou_eps4", "extra_ifgsm_miou_eps4", "defense_nlm-bpda_clean_miou",
            "defense_nlm-bpda_sea_miou_eps4"} <= set(columns)
    assert "extra_{attack}_*: the extra attacks (fgsm, ifgsm), run at every ε" in markdown
    assert "defense_{d}_* (nlm-bpda): the model behind the non-local-means filter" in markdown
    assert "extra attacks" not in summary_markdown([{"trial_name": "t", "sea_miou_eps4": 0.1}])
