"""The pretrain stage: backbones per init resolved from the config, trained once as Ray tasks, cached by their
settings, logged to MLflow, and loaded through the PIR path in the published layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from data.synthetic import object_images, render_sample
from orchestrator.config import ConfigError, load_config, resolve_paths, with_values
from orchestrator.pretrain import FILES, ensure_backbones, needed, pretrain_key, pretrain_uri, resolve_backbone

from .conftest import REPO

DEMO = REPO / "experiments" / "configs" / "demo.yaml"


def demo(tmp_path, **values):
    base = resolve_paths(load_config(DEMO), REPO)
    return with_values(base, {"sweep.storage_path": str(tmp_path / "storage"), **values})


def test_each_init_resolves_to_its_own_checkpoint(tmp_path):
    pir, clean = demo(tmp_path), demo(tmp_path, **{"model.init": "clean"})
    folder = str(tmp_path / "storage" / "pretrain" / pretrain_key(pir))
    assert resolve_backbone(pir).model.backbone_weights == f"{folder}/{FILES['pir']}"
    assert resolve_backbone(clean).model.backbone_weights == f"{folder}/{FILES['clean']}"
    random = demo(tmp_path, **{"model.init": "random"})
    assert resolve_backbone(random).model.backbone_weights is None
    named = demo(tmp_path, **{"model.backbone_weights": "/w/robust.pt"})
    assert resolve_backbone(named).model.backbone_weights == "/w/robust.pt"
    by_init = demo(tmp_path, **{"model.init": "clean", "model.init_weights": {"pir": "/w/r.pt", "clean": "/w/c.pt"}})
    assert resolve_backbone(by_init).model.backbone_weights == "/w/c.pt"
    assert needed([resolve_backbone(c) for c in (pir, clean, random, named)]).keys() == {
        f"{folder}/{FILES['pir']}", f"{folder}/{FILES['clean']}"}


def test_the_cache_key_follows_what_the_weights_depend_on(tmp_path):
    key = pretrain_key(demo(tmp_path))
    assert pretrain_key(demo(tmp_path, **{"data.synthetic.train_images": 40, "train.epochs": 3})) == key
    assert pretrain_key(demo(tmp_path, **{"pretrain.steps": 10})) != key
    assert pretrain_key(demo(tmp_path, **{"data.synthetic.style": "colour"})) != key
    assert pretrain_key(demo(tmp_path, **{"model.stem": "cvst"})) != key


@pytest.mark.parametrize(("values", "message"), [
    ({"pretrain": None}, "model.init 'pir' needs a backbone checkpoint"),
    ({"data.synthetic": None, "data.root": "/data/VOC2012"}, "pretrain makes backbones for generated data"),
    ({"pretrain.classes": 2}, "pretrain.classes = 2: must cover the generated data's 3 object classes"),
    ({"pretrain.image_size": 48}, "must be a multiple of 32"),
])
def test_bad_pretrain_settings_are_named(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        demo(tmp_path, **values)


def test_object_images_show_the_segmentation_classes_objects():
    images, labels = object_images(np.random.default_rng(0), 64, 3, 64)
    assert images.shape == (64, 64, 64, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    again, _ = object_images(np.random.default_rng(0), 64, 3, 64)
    assert np.array_equal(images, again)
    # texture style: objects are mostly grey (class colour is a faint tint), unlike the colour style
    image, label = render_sample(np.random.default_rng(3), 96, 128, 4, "texture")
    inside = image[label > 0].astype(float)
    colourful, _ = render_sample(np.random.default_rng(3), 96, 128, 4, "colour")
    saturation = np.ptp(inside, axis=1).mean()
    assert saturation < 0.5 * np.ptp(colourful[label > 0].astype(float), axis=1).mean()


@pytest.mark.slow
def test_pretrain_stage_trains_once_logs_to_mlflow_and_loads_through_the_pir_path(tmp_path, ray_session, capfd):
    from orchestrator.tracking import SweepTracker
    from trainables.models import build_from_config, read_checkpoint

    tiny = {"pretrain.steps": 3, "pretrain.batch_size": 4, "pretrain.image_size": 32, "pretrain.classes": 3,
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    configs = [resolve_backbone(demo(tmp_path, **tiny, **{"model.init": init})) for init in ("pir", "clean")]
    tracker = SweepTracker(configs[0].tracking.uri, configs[0])
    first = ensure_backbones(configs, tracker)
    assert sorted(s["init"] for s in first) == ["clean", "pir"]
    assert all(0.0 <= s["clean_accuracy"] <= 1.0 and 0.0 <= s["pgd_accuracy"] <= 1.0 for s in first)
    folder = pretrain_uri(configs[0])
    files = {init: os.path.join(folder, name) for init, name in FILES.items()}
    stamps = {init: os.stat(path).st_mtime_ns for init, path in files.items()}
    assert "pretrain: training 2 backbone(s)" in capfd.readouterr().err

    second = ensure_backbones(configs, tracker)  # cached: nothing trained, the same files
    err = capfd.readouterr().err
    assert err.count("pretrain: reusing") == 2 and "training" not in err
    assert {init: os.stat(path).st_mtime_ns for init, path in files.items()} == stamps
    assert sorted(first, key=lambda s: s["init"]) == sorted(second, key=lambda s: s["init"])

    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.pretrain_hash = '{folder[-12:]}'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    for summary in first:
        assert metrics[f"{summary['init']}_clean_accuracy"] == pytest.approx(summary["clean_accuracy"])
        assert metrics[f"{summary['init']}_pgd_accuracy"] == pytest.approx(summary["pgd_accuracy"])

    for config in configs:  # the PIR path: the published {'state_dict': normalize.* + model.*} layout, exactly
        state = read_checkpoint(config.model.backbone_weights)["state_dict"]
        model = build_from_config(config.model, 4)
        assert model.init_report["layout"] == "state_dict/normalize+model."
        assert model.init_report["init"] == config.model.init and model.init_report["missing"] == 0
        backbone = model.backbone.state_dict()
        body = {k: v for k, v in state.items() if k.startswith("model.") and not k.startswith("model.head.")}
        assert body and all(torch.equal(backbone[k], v) for k, v in body.items())
    robust, clean = (read_checkpoint(c.model.backbone_weights)["state_dict"] for c in configs)
    assert not torch.equal(robust["model.stem.0.weight"], clean["model.stem.0.weight"])


@pytest.mark.slow
def test_init_and_seed_sweeps_reach_the_workers_and_the_claim_is_logged(tmp_path, repo_env):
    import csv
    import json
    import subprocess

    from .test_sweep import mlflow_runs, sweep_command

    storage, db = tmp_path / "ray_results", tmp_path / "mlruns.db"
    proc = subprocess.run(sweep_command(f"data.shards={tmp_path}/shards", f"sweep.storage_path={storage}",
                                        f"tracking.uri=sqlite:///{db}",
                                        "sweep.params={model.init: [clean, pir], train.seed: [0, 1]}"),
                          cwd=tmp_path, env=repo_env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "pretrain: training 2 backbone(s)" in proc.stderr and "Aggregated over seeds" in proc.stdout

    reported = {}  # what each Ray Train worker says it trained from, per trial (its epochs.jsonl)
    for log in (storage / "demo" / "trials").glob("*/*/epochs.jsonl"):
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        reported[log.parent.name] = {(row["init"], os.path.basename(row["init_uri"]), row["seed"]) for row in rows}
    assert reported == {
        "t00_init=clean_seed=0": {("clean", "clean.pt", 0)}, "t01_init=clean_seed=1": {("clean", "clean.pt", 1)},
        "t02_init=pir_seed=0": {("pir", "robust.pt", 0)}, "t03_init=pir_seed=1": {("pir", "robust.pt", 1)},
    }

    client, parents, children = mlflow_runs(f"sqlite:///{db}")
    assert {(c.data.params["init"], c.data.params["seed"]) for c in children} == {
        ("clean", "0"), ("clean", "1"), ("pir", "0"), ("pir", "1")}
    parent = parents[0].info.run_id
    assert {"claim.md", "claim.csv", "sea_miou_vs_epochs.png"} <= {a.path for a in client.list_artifacts(parent)}
    table = list(csv.DictReader(open(client.download_artifacts(parent, "claim.csv", str(tmp_path)))))
    assert [(row["init"], row["seeds"]) for row in table] == [("clean", "2"), ("pir", "2")]
    for row in table:
        means = [float(c.data.metrics["sea_miou_eps8"]) for c in children if c.data.params["init"] == row["init"]]
        assert float(row["sea_miou_eps8_mean"]) == pytest.approx(sum(means) / 2)
    pretrain_runs = [r for r in client.search_runs([parents[0].info.experiment_id])
                     if r.data.tags.get("pretrain_hash")]
    assert len(pretrain_runs) == 1 and {"pir_pgd_accuracy", "clean_pgd_accuracy"} <= set(pretrain_runs[0].data.metrics)


def test_a_failed_pretraining_fails_the_trials_that_wait_on_it_and_is_named(tmp_path, ray_session, capfd,
                                                                             monkeypatch):
    """The trials start while the backbones are made: each waits on its own task; a task's error reaches the
    trials loading that backbone and the job's log, and the other backbone is still logged to MLflow."""
    import ray

    import orchestrator.pretrain as pretrain
    from orchestrator.sweep import run_trial
    from orchestrator.tracking import SweepTracker

    settings = pretrain.settings(demo(tmp_path))

    def fake_train_one(config_dict, init, threads, device):  # a Ray task: captures plain values only
        if init == "pir":
            raise ValueError("robust pretraining diverged (made up)")
        return {"init": init, "uri": f"{config_dict['sweep']['storage_path']}/made-up/clean.pt", "eps_255": 0.0,
                "eval_eps_255": 4.0, "clean_accuracy": 0.9, "pgd_accuracy": 0.1, "chance": 0.125, "seconds": 1.0,
                "key": "abc123abc123", "settings": settings}

    monkeypatch.setattr(pretrain, "_train_one", fake_train_one)
    configs = [resolve_backbone(demo(tmp_path, **{"model.init": init, "tracking.uri": f"sqlite:///{tmp_path}/m.db"}))
               for init in ("pir", "clean")]
    tracker = SweepTracker(configs[0].tracking.uri, configs[0])
    backbones = pretrain.start_backbones(configs)
    refs = backbones.refs()
    assert set(refs) == {c.model.backbone_weights for c in configs}
    pir_uri = configs[0].model.backbone_weights
    trial = {"base": configs[0].model_dump(mode="json"), "overrides": {}, "name": "t00_init=pir", "run": "r"}
    with pytest.raises(ray.exceptions.RayTaskError, match="robust pretraining diverged"):
        run_trial({"trial": trial}, backbones=refs)  # waits on its backbone's task, fails with its error
    with pytest.raises(RuntimeError, match=f"pretrain: {pir_uri}: .*robust pretraining diverged"):
        backbones.finish(tracker)
    err = capfd.readouterr().err
    assert f"pretrain: {pir_uri} failed: " in err and "pretrain: wrote " in err
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.pretrain_hash = 'abc123abc123'")
    assert len(runs) == 1 and runs[0].data.metrics["clean_clean_accuracy"] == pytest.approx(0.9)
