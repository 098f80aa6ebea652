"""ASHA on a real Tune sweep: a clearly worse trial is stopped before its last epoch, marked so in MLflow, and SEA
scores only the trials trained to their end."""

from __future__ import annotations

import subprocess

import pytest

from orchestrator.job import TAG_STOPPED

from .conftest import TINY_CONFIG
from .test_sweep import epochs_logged, mlflow_runs, sweep_command

EPOCHS = 4


@pytest.mark.slow
@pytest.mark.realpath
def test_asha_stops_the_worse_trial_and_sea_scores_only_completed_ones(tmp_path, repo_env):
    storage, db = tmp_path / "ray_results", tmp_path / "mlruns.db"
    # Clean training (steps 0, ε 0: the selection metric is the selection images' clean mIoU); the last trial's
    # learning rate leaves it at its random initialisation, and ASHA sees it after the three that learn.
    overrides = [
        f"data.shards={tmp_path}/shards", f"sweep.storage_path={storage}", f"tracking.uri=sqlite:///{db}",
        "data.synthetic.train_images=40", "data.select_images=8", f"train.epochs={EPOCHS}", "train.val_every=1",
        "train.attack.steps=0", "train.attack.eps=0", "train.lr=0.01",
        "sweep.params={train.lr: [0.02, 0.01, 0.005, 1.0e-9]}",
        "sweep.scheduler=asha", "sweep.asha_grace_epochs=1", "sweep.asha_reduction_factor=2",
    ]
    run = subprocess.run(sweep_command(*overrides), cwd=tmp_path, env=repo_env, capture_output=True, text=True,
                         timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    trained = epochs_logged(storage)
    _, parents, children = mlflow_runs(f"sqlite:///{db}")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_name = {c.info.run_name: c for c in children}
    assert len(by_name) == 4
    worse = next(name for name in by_name if name.startswith("t03_"))
    assert trained[worse][-1] < EPOCHS, trained  # stopped before its last epoch
    completed = set()
    for name, child in by_name.items():
        stopped = TAG_STOPPED in child.data.tags
        if stopped:
            assert child.info.status == "KILLED" and trained[name][-1] < EPOCHS
            assert child.data.tags[TAG_STOPPED] == f"asha after epoch {trained[name][-1]} of {EPOCHS}"
            assert not any(k.startswith(("sea_", "clean_")) for k in child.data.metrics)
            assert f"trial {name}: SEA on" not in output
            # its Train run's placement group is given back (left there, it starved the next trial's data tasks), by
            # Ray Train's own cleaner: the job's local Ray serves the state API that the cleaner needs
            assert (f"trial {name}: stopped early; released its Train workers' placement group (0.5 CPU, by Ray "
                    "Train's placement group cleaner)") in output
        else:
            completed.add(name)
            assert trained[name][-1] == EPOCHS and child.info.status == "FINISHED"
            assert "sea_miou_eps8" in child.data.metrics
    assert worse not in completed and any(name.startswith("t00_") for name in completed)


@pytest.mark.realpath
def test_asha_stops_a_trailing_trial_at_a_rung_but_never_at_the_last_epoch():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from orchestrator.config import load_config
    from orchestrator.plan import build_plan
    from orchestrator.sweep import _scheduler
    from trainables.report_keys import PROXY_METRIC

    plan = build_plan(load_config(TINY_CONFIG, overrides=[f"train.epochs={EPOCHS}", "sweep.scheduler=asha",
                                             "sweep.params={train.lr: [0.01, 1.0e-9]}"]), "sqlite:///unused.db")
    asha = _scheduler(plan)
    first, second, worse = (SimpleNamespace(trial_id=name) for name in ("first", "second", "worse"))
    for trial in (first, second, worse):
        asha.on_trial_add(None, trial)
    for epoch in range(1, EPOCHS + 1):
        # the last epoch too: ASHA must let a trial end by itself, which reports its best checkpoint
        assert asha.on_trial_result(None, first, {"epoch": epoch, PROXY_METRIC: 0.1 + 0.1 * epoch}) == \
            TrialScheduler.CONTINUE
        assert asha.on_trial_result(None, second, {"epoch": epoch, PROXY_METRIC: 0.2 + 0.1 * epoch}) == \
            TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, worse, {"epoch": 1, "loss": 2.0}) == TrialScheduler.CONTINUE  # no validation
    assert asha.on_trial_result(None, worse, {"epoch": 1, PROXY_METRIC: 0.05}) == TrialScheduler.STOP
