"""The claim table and plot: SEA mIoU against epochs per init, mean and spread over seeds, from fabricated rows
and through a real SQLite MLflow store (SweepTracker.finish logs the artefacts on the parent run)."""

from __future__ import annotations

import csv
import io
import math
import random
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.claim import claim_csv, claim_markdown, claim_plot, claim_table, shows_claim
from orchestrator.config import load_config, with_values
from orchestrator.plots import save_png
from orchestrator.tracking import SweepTracker

from .conftest import REPO

DEMO = REPO / "experiments" / "configs" / "demo.yaml"
EPS = (4.0, 8.0)
CONSTANT = {"attack_steps": "2", "eps": "4.0", "backbone": "convnext_atto", "dataset": "voc_aug",
            "decoder": "upernet", "protocol": "reference"}

# (init, epochs) -> per score, the values of seeds 0, 1, 2.
SCORES = {
    ("pir", "2"): {"clean_miou": [0.60, 0.62, 0.64], "sea_miou_eps4": [0.30, 0.40, 0.50],
                   "sea_miou_eps8": [0.10, 0.20, 0.60]},
    ("pir", "16"): {"clean_miou": [0.70, 0.72, 0.74], "sea_miou_eps4": [0.45, 0.50, 0.55],
                    "sea_miou_eps8": [0.20, 0.25, 0.30]},
    ("random", "2"): {"clean_miou": [0.40, 0.50, 0.60], "sea_miou_eps4": [0.05, 0.10, 0.15],
                      "sea_miou_eps8": [0.00, 0.01, 0.02]},
    ("random", "16"): {"clean_miou": [0.55, 0.55, 0.55], "sea_miou_eps4": [0.20, 0.20, 0.20],
                       "sea_miou_eps8": [0.04, 0.06, 0.08]},
}
# (init, epochs, score) -> (mean, sample std, min, max), worked out by hand.
EXPECTED = {
    ("pir", "2", "clean_miou"): (0.62, 0.02, 0.60, 0.64),
    ("pir", "2", "sea_miou_eps4"): (0.40, 0.10, 0.30, 0.50),
    ("pir", "2", "sea_miou_eps8"): (0.30, math.sqrt(0.07), 0.10, 0.60),
    ("pir", "16", "clean_miou"): (0.72, 0.02, 0.70, 0.74),
    ("pir", "16", "sea_miou_eps4"): (0.50, 0.05, 0.45, 0.55),
    ("pir", "16", "sea_miou_eps8"): (0.25, 0.05, 0.20, 0.30),
    ("random", "2", "clean_miou"): (0.50, 0.10, 0.40, 0.60),
    ("random", "2", "sea_miou_eps4"): (0.10, 0.05, 0.05, 0.15),
    ("random", "2", "sea_miou_eps8"): (0.01, 0.01, 0.00, 0.02),
    ("random", "16", "clean_miou"): (0.55, 0.0, 0.55, 0.55),
    ("random", "16", "sea_miou_eps4"): (0.20, 0.0, 0.20, 0.20),
    ("random", "16", "sea_miou_eps8"): (0.06, 0.02, 0.04, 0.08),
}


def fabricated_rows() -> list[dict]:
    """Summary rows as `SweepTracker.summary_rows` gives them: 2 inits × 2 epochs × 3 seeds, a FAILED trial and
    a FINISHED one without a result (both to be left out), in shuffled order."""
    rows = []
    for (init, epochs), scores in SCORES.items():
        for seed in range(3):
            row = {"trial_name": f"init={init},epochs={epochs},seed={seed}", "run_id": f"r{len(rows)}",
                   "status": "FINISHED", **CONSTANT, "init": init, "epochs": epochs, "seed": str(seed)}
            row.update({score: values[seed] for score, values in scores.items()})
            row["sea_miou_greedy_eps4"] = row["sea_miou_eps4"] + 0.01
            rows.append(row)
    rows.append({"trial_name": "failed", "run_id": "rf", "status": "FAILED", **CONSTANT, "init": "pir",
                 "epochs": "2", "seed": "3", "clean_miou": 0.99, "sea_miou_eps4": 0.99, "sea_miou_eps8": 0.99})
    rows.append({"trial_name": "no result", "run_id": "rn", "status": "FINISHED", **CONSTANT, "init": "pir",
                 "epochs": "2", "seed": "4"})
    random.Random(0).shuffle(rows)
    return rows


def test_claim_table_aggregates_over_seeds_and_leaves_out_unfinished_trials():
    table = claim_table(fabricated_rows(), EPS)
    assert [(e["params"]["init"], e["params"]["epochs"]) for e in table] == [
        ("pir", "2"), ("pir", "16"), ("random", "2"), ("random", "16")]  # epochs sorted as numbers
    for entry in table:
        params = entry["params"]
        assert "seed" not in params
        assert {k: params[k] for k in CONSTANT} == CONSTANT
        assert entry["seeds"] == 3
        for score in ("clean_miou", "sea_miou_eps4", "sea_miou_eps8"):
            mean, std, low, high = EXPECTED[(params["init"], params["epochs"], score)]
            stats = entry[score]
            assert stats["mean"] == pytest.approx(mean, abs=1e-12), (params, score)
            assert stats["std"] == pytest.approx(std, abs=1e-12), (params, score)
            assert (stats["min"], stats["max"]) == (pytest.approx(low), pytest.approx(high))
        assert "sea_miou_greedy_eps4" not in entry
    assert shows_claim(table)


def test_one_seed_has_no_spread_and_missing_seeds_count_as_one_each():
    rows = [{"status": "FINISHED", "init": "pir", "epochs": "4", "clean_miou": 0.5, "sea_miou_eps4": 0.25},
            {"status": "FINISHED", "init": "clean", "epochs": "4", "clean_miou": 0.6, "sea_miou_eps4": 0.125}]
    table = claim_table(rows, [4])
    assert [e["params"]["init"] for e in table] == ["clean", "pir"]
    assert [e["seeds"] for e in table] == [1, 1]
    assert table[1]["sea_miou_eps4"] == {"mean": 0.25, "std": None, "min": 0.25, "max": 0.25}
    markdown = claim_markdown(table, [4])
    assert "| pir | 4 | 1 | 0.5000 | 0.2500 |" in markdown and "±" not in markdown.splitlines()[2]
    two = claim_table([rows[0], dict(rows[0], clean_miou=0.7, sea_miou_eps4=0.75)], [4])
    assert len(two) == 1 and two[0]["seeds"] == 2
    assert two[0]["sea_miou_eps4"]["mean"] == pytest.approx(0.5)
    assert two[0]["sea_miou_eps4"]["std"] == pytest.approx(math.sqrt(0.125))


def test_claim_is_shown_only_when_init_epochs_or_seeds_vary():
    base = {"status": "FINISHED", **CONSTANT, "init": "pir", "epochs": "4", "clean_miou": 0.5, "sea_miou_eps4": 0.2}
    assert not shows_claim(claim_table([base], [4]))
    assert not shows_claim(claim_table([base, dict(base, attack_steps="0")], [4]))  # another setting, one seed
    assert not shows_claim(claim_table([base, dict(base, status="FAILED", init="clean")], [4]))
    assert shows_claim(claim_table([base, dict(base, init="clean")], [4]))
    assert shows_claim(claim_table([base, dict(base, epochs="8")], [4]))
    assert shows_claim(claim_table([base, dict(base, seed="1")], [4]))


def test_claim_markdown_and_csv():
    table = claim_table(fabricated_rows(), EPS)
    markdown = claim_markdown(table, EPS)
    lines = markdown.splitlines()
    assert lines[0] == "| init | epochs | seeds | clean mIoU | SEA mIoU ε=4/255 | SEA mIoU ε=8/255 |"
    assert lines[2] == "| pir | 2 | 3 | 0.6200 ± 0.0200 | 0.4000 ± 0.1000 | 0.3000 ± 0.2646 |"
    assert lines[5] == "| random | 16 | 3 | 0.5500 ± 0.0000 | 0.2000 ± 0.0000 | 0.0600 ± 0.0200 |"
    assert "Same in every group: attack_steps=2, eps=4.0, backbone=convnext_atto" in markdown
    assert "ddof = 1" in markdown

    parsed = list(csv.DictReader(io.StringIO(claim_csv(table))))
    assert len(parsed) == 4
    first = parsed[0]
    assert (first["init"], first["epochs"], first["seeds"], first["backbone"]) == ("pir", "2", "3", "convnext_atto")
    assert float(first["sea_miou_eps8_mean"]) == pytest.approx(0.3)
    assert float(first["sea_miou_eps8_std"]) == pytest.approx(math.sqrt(0.07))
    assert (float(first["sea_miou_eps8_min"]), float(first["sea_miou_eps8_max"])) == (0.1, 0.6)
    assert list(first)[-12:-8] == ["clean_miou_mean", "clean_miou_std", "clean_miou_min", "clean_miou_max"]


def test_claim_plot_has_one_line_per_init_per_eps(tmp_path):
    table = claim_table(fabricated_rows(), EPS)
    figure = claim_plot(table, EPS)
    assert len(figure.axes) == len(EPS)
    for axes, eps in zip(figure.axes, EPS, strict=True):
        assert axes.get_xscale() == "log"
        assert list(axes.get_xticks()) == [2.0, 16.0]
        assert "epochs" in axes.get_xlabel() and "mIoU" in axes.get_ylabel()
        assert f"{eps:g}/255" in axes.get_title()
        assert [line.get_label() for line in axes.lines] == ["init=pir", "init=random"]
        key = f"sea_miou_eps{eps:g}"
        for line in axes.lines:
            init = line.get_label().split("=")[1]
            assert list(line.get_xdata()) == [2.0, 16.0]
            expected = [EXPECTED[(init, epochs, key)][0] for epochs in ("2", "16")]
            assert list(line.get_ydata()) == pytest.approx(expected)
        assert len(axes.collections) == 2  # the min–max bands
    assert save_png(figure, tmp_path / "claim.png").stat().st_size > 1000


def _sea(worst: dict[float, float]) -> dict[float, dict]:
    return {e: {"clean": {"miou": 0.7}, "worst": {"miou": v, "miou_greedy": v, "aacc": 0.5, "macc": 0.5}}
            for e, v in worst.items()}


def _parent_artifacts(client: MlflowClient, tracker: SweepTracker) -> set[str]:
    return {info.path for info in client.list_artifacts(tracker.parent_run_id)}


@pytest.fixture
def demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(DEMO, ["sweep.params={}", f"sweep.storage_path={tmp_path}/ray", "sea.eps=[4, 8]",
                                "model.init_weights={pir: https://example.com/pir.pt}"])
    return f"sqlite:///{tmp_path}/mlruns.db", config


def test_finish_logs_the_claim_on_the_parent_run(demo, tmp_path):
    uri, config = demo
    tracker = SweepTracker(uri, config)
    sea4 = {("pir", 2): [0.3, 0.5], ("pir", 8): [0.6, 0.7], ("random", 2): [0.1, 0.2], ("random", 8): [0.3, 0.3]}
    for (init, epochs), values in sea4.items():
        for seed, value in enumerate(values):
            overrides = {"model.init": init, "train.epochs": epochs, "train.seed": seed}
            run_id = tracker.trial_run(f"{init}-{epochs}-{seed}", with_values(config, overrides), overrides)
            tracker.log_result(run_id, clean={"miou": 0.8}, sea=_sea({4.0: value, 8.0: value / 2}), train_hours=0.1,
                               attack_hours=0.1, checkpoint_uri=f"/ckpt/{init}-{epochs}-{seed}")
            tracker.end_trial(run_id)
    failed = tracker.trial_run("failed", with_values(config, {"model.init": "pir"}), {})
    tracker.mark_failed(failed, "boom")
    tracker.finish()

    client = MlflowClient(tracking_uri=uri)
    assert {"claim.md", "claim.csv", "sea_miou_vs_epochs.png", "summary.csv"} <= _parent_artifacts(client, tracker)
    local = Path(client.download_artifacts(tracker.parent_run_id, "", str(tmp_path / "parent")))
    parsed = list(csv.DictReader(io.StringIO((local / "claim.csv").read_text())))
    got = {(r["init"], r["epochs"]): (int(r["seeds"]), float(r["sea_miou_eps4_mean"]), float(r["sea_miou_eps8_mean"]))
           for r in parsed}
    assert list(got) == [("pir", "2"), ("pir", "8"), ("random", "2"), ("random", "8")]
    for (init, epochs), values in sea4.items():
        n, mean4, mean8 = got[(init, str(epochs))]
        assert n == 2
        assert mean4 == pytest.approx(sum(values) / 2) and mean8 == pytest.approx(sum(values) / 4)
    assert float(parsed[0]["sea_miou_eps4_std"]) == pytest.approx(math.sqrt(0.02))
    assert "| pir | 2 | 2 | 0.8000 ± 0.0000 | 0.4000 ± 0.1414 | 0.2000 ± 0.0707 |" in (local / "claim.md").read_text()
    assert (local / "sea_miou_vs_epochs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finish_writes_no_claim_when_only_other_settings_vary(demo):
    uri, config = demo
    tracker = SweepTracker(uri, config)
    for steps in (0, 2):
        overrides = {"train.attack.steps": steps}
        run_id = tracker.trial_run(f"steps={steps}", with_values(config, overrides), overrides)
        tracker.log_result(run_id, clean={"miou": 0.8}, sea=_sea({4.0: 0.2, 8.0: 0.1}), train_hours=0.1,
                           attack_hours=0.1, checkpoint_uri="/ckpt")
        tracker.end_trial(run_id)
    tracker.finish()
    found = _parent_artifacts(MlflowClient(tracking_uri=uri), tracker)
    assert "summary.md" in found
    assert not found & {"claim.md", "claim.csv", "sea_miou_vs_epochs.png"}
