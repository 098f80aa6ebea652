"""The config schema: every recipe validates, and each kind of bad input exits 2 naming the key."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config, with_values
from orchestrator.plan import build_plan, expand_trials
from orchestrator.tracking import resolve_tracking_uri

from .conftest import PYTHON, REPO

# The sweep's configs; eval_*.yaml are experiments/sea_eval.py's (tests/test_sea_eval.py).
CONFIGS = sorted(p for p in (REPO / "experiments" / "configs").glob("*.yaml") if not p.name.startswith("eval_"))
SCRIPT = REPO / "experiments" / "pir_at_sweep.py"


def run_cli(*args: str, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_every_training_config_is_present():
    names = {p.name for p in CONFIGS}
    assert names == {
        "demo.yaml", "pir_claim.yaml", "voc_convnext_t.yaml", "voc_convnext_s.yaml", "ade20k_convnext_t.yaml",
        "ade20k_convnext_s.yaml", "ade20k_segmenter_vit_s.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dry_run_exits_zero(path: Path, repo_env):
    result = run_cli("--config", str(path), "--dry-run", env=repo_env)
    assert result.returncode == 0, result.stderr
    assert "trial 0" in result.stdout and "ScalingConfig(" in result.stdout
    assert "Tracking URI:" in result.stdout and "SEA: eps" in result.stdout
    if path.stem not in ("demo", "pir_claim"):  # recipe placeholders are reported, not fatal (generated data has none)
        assert "not found" in result.stdout


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem not in ("demo", "pir_claim")], ids=lambda p: p.stem)
def test_a_recipe_sweeps_init_over_the_published_robust_and_clean_backbones(path: Path):
    from orchestrator.plan import check_paths

    config = load_config(path, ['sweep.params={"model.init": ["clean", "pir"]}'])
    loaded = {c.model.init: c.model.backbone_weights for c in build_plan(config, "sqlite:///x.db").trial_configs}
    assert loaded == {"clean": config.model.init_weights["clean"], "pir": config.model.init_weights["pir"]}
    assert loaded["clean"] != loaded["pir"]
    assert [w for w in check_paths(config) if w.startswith("model.init_weights.clean ") and "not found" in w]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


DEMO = (REPO / "experiments" / "configs" / "demo.yaml").read_text()


@pytest.mark.parametrize(
    "config_text, overrides, expected",
    [
        (re.sub(r"^  epochs:", "  epochz:", DEMO, flags=re.M), [], "train.epochz: unknown key"),
        (re.sub(r"^    eps: .*$", "    eps: -1", DEMO, flags=re.M), [],
         "train.attack.eps = -1: must be >= 0 (units of 1/255)"),
        (DEMO, ["train.epochs=0"], "train.epochs = 0: must be >= 1"),
        (DEMO, ["train.epochs=three"], "train.epochs = 'three': must be an integer"),
        (DEMO, ["train.attack.eps=abc"], "train.attack.eps = 'abc': must be a number (units of 1/255)"),
        (DEMO, ["model.decoder=fcn"], "model.decoder = 'fcn': must be one of upernet or segmenter"),
        (DEMO, ["sea.eps=[0]"], "sea.eps = [0]"),
        (DEMO, ["sea.losses=[ce,bogus]"], "sea.losses.1 = 'bogus': must be one of"),
        (DEMO, ["sweep.params={train.epochs: [0, 2]}"], "train.epochs = 0: must be >= 1"),
        (DEMO, ["nonsense"], "expected key.path=value"),
    ],
    ids=["misspelled-key", "negative-eps", "epochs-zero-override", "non-numeric-epochs", "non-numeric-eps",
         "unknown-decoder", "zero-sea-eps", "unknown-loss", "bad-sweep-value", "malformed-override"],
)
def test_bad_input_exits_2_naming_the_key(tmp_path, repo_env, config_text, overrides, expected):
    path = write(tmp_path, config_text)
    result = run_cli("--config", str(path), "--dry-run", *overrides, env=repo_env)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_missing_config_file(tmp_path, repo_env):
    result = run_cli("--config", str(tmp_path / "nope.yaml"), "--dry-run", env=repo_env)
    assert result.returncode == 2 and "file not found" in result.stderr


def test_help(repo_env):
    result = run_cli("--help", env=repo_env)
    assert result.returncode == 0
    for flag in ("--config", "--dry-run", "--resume", "key.path=value"):
        assert flag in result.stdout


def test_overrides_apply_and_grid_expands():
    config = load_config(REPO / "experiments/configs/demo.yaml", ["train.epochs=5", "sea.eps=[0.5, 4]"])
    assert config.train.epochs == 5 and config.sea.eps == [0.5, 4.0]
    trials = expand_trials(config)
    steps, inits = config.sweep.params["train.attack.steps"], config.sweep.params["model.init"]
    assert len(trials) == len(steps) * len(inits) == 4
    assert {(t["train.attack.steps"], t["model.init"]) for t in trials} == {(s, i) for s in steps for i in inits}
    trial = with_values(config, trials[0])
    assert trial.train.attack.steps == trials[0]["train.attack.steps"]
    assert trial.model.init == trials[0]["model.init"]


def test_random_search_is_seeded():
    overrides = ["sweep.search=random", "sweep.num_samples=6", "sweep.params={train.attack.steps: [0, 1, 2, 3]}"]
    a = expand_trials(load_config(REPO / "experiments/configs/demo.yaml", overrides))
    b = expand_trials(load_config(REPO / "experiments/configs/demo.yaml", overrides))
    assert a == b and len(a) == 6


def test_batch_must_split_across_workers():
    with pytest.raises(ConfigError, match="must divide evenly across cluster.workers"):
        load_config(REPO / "experiments/configs/demo.yaml", ["cluster.workers=3"])


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    demo = REPO / "experiments/configs/demo.yaml"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(demo)
    assert resolve_tracking_uri(config, False, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    from_file = load_config(demo, ["tracking.uri=http://127.0.0.1:5000"])
    assert resolve_tracking_uri(from_file, override_given=False) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(from_file, override_given=False) == "sqlite:///env.db"
    assert resolve_tracking_uri(from_file, override_given=True) == "http://127.0.0.1:5000"


def test_dry_run_scaling_for_eight_gpu_workers(repo_env):
    result = run_cli("--config", "experiments/configs/voc_convnext_t.yaml", "--dry-run",
                     "cluster.workers=8", "cluster.gpus_per_worker=1", env=repo_env)
    assert result.returncode == 0, result.stderr
    assert "ScalingConfig(num_workers=8, use_gpu=True" in result.stdout
    assert "'GPU': 1.0" in result.stdout
    assert "global batch 16 = 8 worker(s) x per-worker batch 2" in result.stdout


def test_plan_validates_every_trial():
    config = load_config(REPO / "experiments/configs/demo.yaml")
    plan = build_plan(config, "sqlite:///x.db")
    assert len(plan.trial_configs) == 4
