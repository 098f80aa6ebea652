"""sweep.epochs_mode: separate trials per epoch count, or one trial per group scored at its intermediate epochs."""

from __future__ import annotations

import subprocess

import pytest
import torch

from orchestrator.config import ConfigError, load_config, with_values
from orchestrator.job import TAG_CHECKPOINT_EPOCH, TAG_EPOCHS_MODE, TAG_TRAINED_BY, TAG_TRAINED_EPOCHS
from orchestrator.plan import build_plan, format_plan
from orchestrator.sweep import KEPT_DIR, KeepEpochs, kept_checkpoints

from .conftest import TINY_CONFIG
from .test_sweep import epochs_logged, mlflow_runs, sweep_command

PARAMS = {"train.epochs": [2, 4, 6], "train.attack.steps": [0, 2]}


def plan_of(mode: str, **values):
    config = with_values(load_config(TINY_CONFIG), {"sweep.params": PARAMS, "sweep.epochs_mode": mode, **values})
    return build_plan(config, "sqlite:///unused.db")


@pytest.mark.realpath
def test_checkpoints_mode_trains_each_group_once_to_its_longest_count():
    separate, checkpoints = plan_of("separate", **{"sweep.num_samples": 2}), plan_of("checkpoints",
                                                                                       **{"sweep.num_samples": 2})
    assert len(separate.trials) == 12 and separate.checkpoint_runs == []
    assert separate.training_epochs == 2 * 2 * (2 + 4 + 6)
    # one trial per (attack steps, repeat of the grid), each trained to 6 epochs; every original trial is a run
    assert len(checkpoints.trials) == 4 and {c.train.epochs for c in checkpoints.trial_configs} == {6}
    assert checkpoints.training_epochs == 4 * 6
    assert sorted(r.name for r in checkpoints.checkpoint_runs) == sorted(separate.names)
    for trial, config in zip(checkpoints.names, checkpoints.trial_configs, strict=True):
        runs = checkpoints.runs_of(trial)
        assert [r.epoch for r in runs] == [2, 4, 6] and runs[-1].name == trial
        assert {r.config.train.attack.steps for r in runs} == {config.train.attack.steps}
    text = format_plan(checkpoints)
    assert "sweep.epochs_mode checkpoints (the schedule of the longest run, scored at intermediate epochs)" in text
    assert "4 trial(s) train to their largest epoch count, 12 run(s) score their checkpoints; 24 training epochs " \
           "in all (separate: 48)" in text
    assert "sweep.epochs_mode separate" in format_plan(separate) and "48 training epochs in all" in \
        format_plan(separate)


@pytest.mark.realpath
def test_unknown_epochs_mode_and_the_old_asha_key_are_clear_errors():
    with pytest.raises(ConfigError, match=r"sweep.epochs_mode = 'restart': must be one of separate or checkpoints"):
        load_config(overrides=["sweep.epochs_mode=restart"])
    with pytest.raises(ConfigError, match=r"asha: renamed; use sweep.scheduler: asha \(or fifo\)"):
        load_config(overrides=["sweep.asha=true"])


@pytest.mark.realpath
def test_keep_epochs_copies_the_listed_epochs_checkpoints_out_of_retention(tmp_path):
    import ray.train

    run = tmp_path / "t00"
    for epoch in (1, 2, 3):
        folder = run / f"epoch_{epoch:04d}"
        folder.mkdir(parents=True)
        torch.save({"epoch": epoch}, folder / "state.pt")
        KeepEpochs([1, 3]).after_report(None, [{"epoch": epoch}], ray.train.Checkpoint(str(folder)))
    for epoch in (1, 2):  # what retention does to checkpoints it does not keep
        for file in (run / f"epoch_{epoch:04d}").iterdir():
            file.unlink()
        (run / f"epoch_{epoch:04d}").rmdir()
    kept = kept_checkpoints(ray.train.Checkpoint(str(run / "epoch_0003")), [1, 3])
    assert kept == {1: str(run / KEPT_DIR / "epoch_0001"), 3: str(run / KEPT_DIR / "epoch_0003")}
    assert torch.load(run / KEPT_DIR / "epoch_0001" / "state.pt")["epoch"] == 1
    assert not (run / KEPT_DIR / "epoch_0002").exists()


@pytest.mark.slow
@pytest.mark.realpath
def test_checkpoints_mode_sweep_scores_one_trials_intermediate_epoch_as_its_own_run(tmp_path, repo_env):
    storage, db = tmp_path / "ray_results", tmp_path / "mlruns.db"
    overrides = [f"data.shards={tmp_path}/shards", f"sweep.storage_path={storage}", f"tracking.uri=sqlite:///{db}",
                 "sweep.params={train.epochs: [1, 2]}", "sweep.epochs_mode=checkpoints", "train.keep_checkpoints=1",
                 "train.val_every=1"]
    run = subprocess.run(sweep_command(*overrides), cwd=tmp_path, env=repo_env, capture_output=True, text=True,
                         timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert epochs_logged(storage) == {"t01_epochs=2": [1, 2]}  # one trial trained, to the largest count
    _, parents, children = mlflow_runs(f"sqlite:///{db}")
    assert parents[0].info.status == "FINISHED"
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == ["t00_epochs=1", "t01_epochs=2"]
    for name, epoch in (("t00_epochs=1", 1), ("t01_epochs=2", 2)):
        child = by_name[name]
        assert child.info.status == "FINISHED" and "sea_miou_eps8" in child.data.metrics
        assert child.data.tags[TAG_EPOCHS_MODE] == "checkpoints"
        assert child.data.tags[TAG_CHECKPOINT_EPOCH] == str(epoch)
        assert child.data.tags[TAG_TRAINED_BY] == "t01_epochs=2" and child.data.tags[TAG_TRAINED_EPOCHS] == "2"
        assert child.data.tags["checkpoint_uri"].endswith(f"t01_epochs=2/{KEPT_DIR}/epoch_{epoch:04d}")
    assert "loss" in by_name["t01_epochs=2"].data.metrics and "loss" not in by_name["t00_epochs=1"].data.metrics
