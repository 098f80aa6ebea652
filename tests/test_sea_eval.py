"""experiments/sea_eval.py end to end on generated data with a published-layout checkpoint: MLflow run, per-image
Parquet that re-aggregates to the logged numbers, the summary table, a killed driver resumed, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.redact import environment_snapshot
from tests.test_published_layout import ATTO, published_state

pytestmark = pytest.mark.realpath
REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(REPO / "experiments" / "sea_eval.py")]
VOC_CLASSES = 21


def _config(tmp_path: Path, weights: str, output: str, **sea) -> Path:
    config = {
        "data": {"dataset": "voc_aug", "shards": str(tmp_path / "shards"), "crop_size": 32, "val_size": 48,
                 "shard_rows": 4, "select_images": 2,
                 "synthetic": {"seed": 0, "train_images": 6, "val_images": 8, "num_classes": 3, "height": 40,
                               "width": 56}},
        "model": {"decoder": "upernet", "backbone": "convnext_atto", "stem": "cvst", "decoder_width": 32,
                  "weights": weights},
        "sea": {"eps": [4, 8], "iterations": 2, "losses": ["mce", "js"], "batch_size": 2, "max_actors": 1,
                "cpus_per_actor": 1, **sea},
        "eval": {"name": "t", "label": "UPerNet-atto", "block_images": 2, "output": output},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "experiment": "eval-test"},
    }
    path = tmp_path / f"eval-{Path(output).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    return {**environment_snapshot(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "",
            "MLFLOW_TRACKING_URI": ""}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "published.pth"
    torch.save(published_state(ATTO, VOC_CLASSES), path)
    return str(path)


def _run(config: Path, *extra: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "--config", str(config), *extra], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=config.parent)


def _model_runs(tmp_path: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("eval-test")
    return client, client.search_runs([experiment.experiment_id], "tags.sea_eval = 'model'",
                                      order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_cli_scores_logs_and_resumes_after_a_killed_driver(tmp_path, weights):
    import numpy as np
    import pyarrow.parquet as pq

    full = _run(_config(tmp_path, weights, str(tmp_path / "full")))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "| Model | Dataset | Clean | Adv.(4/255) | Adv.(8/255) |" in full.stdout
    assert "| UPerNet-atto | voc |" in full.stdout
    client, runs = _model_runs(tmp_path)
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    for key in ("clean_miou", "clean_aacc", "sea_miou_eps4", "sea_aacc_eps8", "mce_miou_eps4", "js_aacc_eps8"):
        assert key in metrics, key
    assert runs[0].data.tags.get("mlflow.parentRunId")
    folder = client.download_artifacts(runs[0].info.run_id, "", str(tmp_path / "artifacts"))
    assert {"per_image.parquet", "per_class_iou.csv", "summary.md", "sea_vs_eps.png",
            "adversarial_examples.png"} <= set(os.listdir(folder))
    rows = pq.read_table(os.path.join(folder, "per_image.parquet")).to_pylist()
    assert len(rows) == 8 * 2 and {r["eps"] for r in rows} == {4.0, 8.0}
    at4 = [r for r in rows if r["eps"] == 4.0]
    for name, key in (("clean", "clean_miou"), ("mce", "mce_miou_eps4")):
        inter = np.sum([r[f"inter_{name}"] for r in at4], axis=0)
        union = np.sum([r[f"union_{name}"] for r in at4], axis=0)
        assert np.mean(inter[union > 0] / union[union > 0]) == pytest.approx(metrics[key], abs=1e-9)
    assert sum(r["correct_clean"] for r in at4) / sum(r["labelled"] for r in at4) == pytest.approx(
        metrics["clean_aacc"], abs=1e-9)
    worst = sum(min(r["correct_clean"], r["correct_mce"], r["correct_js"]) for r in at4)
    assert worst / sum(r["labelled"] for r in at4) == pytest.approx(metrics["sea_aacc_eps4"], abs=1e-9)

    # The driver killed after its first block, then --resume: the stored blocks are not rescored.
    config = _config(tmp_path, weights, str(tmp_path / "killed"))
    blocks = tmp_path / "killed" / "blocks"
    process = subprocess.Popen([*CLI, "--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env(), cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (blocks.exists() and any(p.suffix == ".pt" for p in blocks.iterdir())):
            assert process.poll() is None, "the job ended before writing a block"
            assert time.time() < deadline, "no block written within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Ray's worker processes outlive the driver for a moment: the block in flight may still land. Wait until
    # the stored blocks are stable, then resume must score exactly the others.
    stored: dict[str, bytes] = {}
    for _ in range(60):
        now = {p.name: p.read_bytes() for p in blocks.iterdir() if p.suffix == ".pt"}
        if now and now.keys() == stored.keys():
            break
        stored = now
        time.sleep(3)
    assert 1 <= len(stored) < 4
    resumed = _run(config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"blocks scored now: {4 - len(stored)}, already stored: {len(stored)}" in resumed.stderr
    assert all((blocks / name).read_bytes() == data for name, data in stored.items())
    _, runs = _model_runs(tmp_path)
    again = runs[-1].data.metrics
    for key, value in metrics.items():
        if key not in ("eval_hours",):
            assert again[key] == pytest.approx(value, abs=1e-12), key


def _main(config: Path, *extra: str) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sea_eval_cli", REPO / "experiments" / "sea_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--config", str(config), *extra])


@pytest.fixture
def _quiet_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)


def test_dry_run_prints_the_plan_without_starting_anything(tmp_path, weights, capsys, _quiet_env):
    assert _main(_config(tmp_path, weights, str(tmp_path / "dry")), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "layout published, input normalisation none" in out
    assert "actors: 1" in out and "losses mce, js; 2 iterations each" in out
    assert not (tmp_path / "dry").exists() and not (tmp_path / "shards").exists()


def test_bad_inputs_exit_2_with_one_line(tmp_path, weights, capsys, _quiet_env):
    import re

    wrong = dict(published_state(ATTO, VOC_CLASSES))
    del wrong["backbone.norm3.bias"]
    torch.save(wrong, tmp_path / "wrong_layout.pth")
    torch.save(published_state(ATTO, 151), tmp_path / "ade_classes.pth")
    cases = {
        str(tmp_path / "missing.pth"): r"model.weights .*missing.pth: not found",
        str(tmp_path / "wrong_layout.pth"): r"matches no supported model .*1 missing: backbone.norm3.bias",
        str(tmp_path / "ade_classes.pth"): r"checkpoint has 151 classes, data.dataset voc has 21",
    }
    for path, message in cases.items():
        assert _main(_config(tmp_path, path, str(tmp_path / "bad"))) == 2, path
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("input error: "), lines
        assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "bad").exists() and not (tmp_path / "shards").exists()


def test_weights_given_as_an_mlflow_run_id_stay_a_run_id(tmp_path):
    from orchestrator.config import load_config, resolve_paths

    demo = REPO / "experiments" / "configs" / "eval_demo.yaml"
    for value in ("0123456789abcdef0123456789abcdef", "runs:/0123456789abcdef0123456789abcdef"):
        assert resolve_paths(load_config(demo, [f"model.weights={value}"]), tmp_path).model.weights == value
    relative = resolve_paths(load_config(demo, ["model.weights=ckpt/state.pt"]), tmp_path).model.weights
    assert relative == str(tmp_path / "ckpt" / "state.pt")


@pytest.mark.parametrize("recipe", sorted((REPO / "experiments" / "configs").glob("eval_*.yaml")), ids=lambda p: p.stem)
def test_every_eval_recipe_dry_runs_and_names_its_placeholder(recipe, capsys, _quiet_env):
    weights = [] if recipe.stem != "eval_demo" else ["model.weights=/nonexistent/state.pt"]
    assert _main(recipe, "--dry-run", *weights) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "layout NOT FOUND: edit the PLACEHOLDER" in out and "SEA: eps 4/255, 8/255" in out


def test_the_five_published_models_have_recipes():
    names = {p.stem for p in (REPO / "experiments" / "configs").glob("eval_*.yaml")}
    assert names == {"eval_demo", "eval_voc_convnext_t", "eval_voc_convnext_s", "eval_ade20k_convnext_t",
                     "eval_ade20k_convnext_s", "eval_ade20k_segmenter_vit_s"}


def test_eval_demo_scores_as_the_demo_sweep():
    """eval_demo.yaml re-scores a demo trial: its SEA settings (and so its random starts) must be the demo's."""
    from orchestrator.config import load_config

    configs = REPO / "experiments" / "configs"
    demo = load_config(configs / "demo.yaml")
    standalone = load_config(configs / "eval_demo.yaml", ["model.weights=/nonexistent/state.pt"])
    for key in ("eps", "iterations", "losses", "track", "seed", "images", "batch_size"):
        assert getattr(standalone.sea, key) == getattr(demo.sea, key), key
    assert standalone.eval.protocol == demo.eval.protocol
    assert standalone.data.synthetic == demo.data.synthetic
