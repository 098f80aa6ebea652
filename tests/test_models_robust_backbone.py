"""experiments/make_robust_backbone.py: a short PGD run writes a checkpoint that PIR initialisation loads exactly."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from orchestrator.redact import environment_snapshot
from tests.conftest import PYTHON, REPO
from trainables.models import build_model, read_checkpoint

SCRIPT = REPO / "experiments" / "make_robust_backbone.py"


def _run(args, env):
    return subprocess.run([PYTHON, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_short_robust_run_saves_a_loadable_cvst_checkpoint(tmp_path, repo_env):
    out = tmp_path / "robust_atto_cvst.pt"
    proc = _run(["--backbone", "convnext_atto", "--stem", "cvst", "--out", str(out), "--steps", "5",
                 "--batch-size", "8", "--threads", "1"], repo_env)
    assert proc.returncode == 0, proc.stderr
    assert "step 5/5" in proc.stdout and "saved" in proc.stdout
    summary = json.loads((tmp_path / "robust_atto_cvst.pt.json").read_text())
    assert summary["steps"] == 5 and summary["eps_255"] == 4.0 and 0 <= summary["pgd10_accuracy"] <= 1

    checkpoint = read_checkpoint(str(out))
    state = checkpoint["state_dict"]
    assert {"normalize.mean", "normalize.std", "model.stem.stem.0.weight", "model.head.fc.weight"} <= set(state)
    model = build_model("upernet", "convnext_atto", 4, "cvst", backbone_weights=str(out), decoder_width=16)
    backbone = model.backbone.state_dict()
    body = {k: v for k, v in state.items() if k.startswith("model.") and not k.startswith("model.head.")}
    # the classifier is the whole timm body; the per-stage output norms (norm0..3) belong to segmentation only
    assert set(body) == {k for k in backbone if k.startswith("model.")}
    assert all(torch.equal(backbone[k], v) for k, v in body.items())
    stage_norms = {k: v for k, v in backbone.items() if not k.startswith("model.")}
    assert sorted(stage_norms) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert all(torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v))
               for k, v in stage_norms.items())
    assert model.init_report["layout"] == "state_dict/normalize+model."


@pytest.mark.slow
def test_robust_run_writes_to_s3_in_the_ddp_layout(s3_bucket, repo_env):
    env = {**repo_env, **{k: v for k, v in environment_snapshot().items() if k.startswith("AWS_")}}
    uri = f"{s3_bucket}/backbones/atto.pt"
    proc = _run(["--out", uri, "--layout", "module", "--steps", "2", "--batch-size", "4", "--threads", "1"], env)
    assert proc.returncode == 0, proc.stderr
    model = build_model("upernet", "convnext_atto", 4, backbone_weights=uri, decoder_width=16)
    assert model.init_report["layout"] == "module." and model.init_report["missing"] == 0
    state = read_checkpoint(uri)
    assert torch.equal(model.backbone.state_dict()["model.stem.0.weight"], state["module.stem.0.weight"])


def test_bad_options_are_named(tmp_path, repo_env):
    proc = _run(["--backbone", "vit_small_patch16_224", "--stem", "cvst", "--out", str(tmp_path / "x.pt")], repo_env)
    assert proc.returncode == 2
    assert "--stem cvst: the CvSt stem exists for ConvNeXt backbones only" in proc.stderr
    assert not (tmp_path / "x.pt").exists()
