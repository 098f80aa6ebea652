"""The main job scores each trial as it finishes, beside the next trial's training, and --resume keeps its results."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from .test_sweep import epochs_logged, mlflow_runs, sweep_command


@pytest.mark.slow
@pytest.mark.realpath
def test_trial_scored_beside_next_training_is_not_rescored_on_resume(tmp_path, repo_env):
    storage, db = tmp_path / "ray_results", tmp_path / "mlruns.db"
    overrides = [f"data.shards={tmp_path}/shards", f"sweep.storage_path={storage}", f"tracking.uri=sqlite:///{db}",
                 "train.epochs=2"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(sweep_command(*overrides), cwd=tmp_path, env=repo_env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None \
                and not re.search(r"trial t00_\S+: SEA results in MLflow", log.read_text()):
            time.sleep(0.2)
        seen = log.read_text()
        assert proc.poll() is None, seen[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    # t00 was scored and in MLflow while t01 trained (its trial had started and not completed)
    assert re.search(r"Trial t01_\S+ started", seen) and not re.search(r"Trial t01_\S+ completed", seen), seen[-3000:]
    assert proc.returncode == 130, log.read_text()[-3000:]
    _, _, children = mlflow_runs(f"sqlite:///{db}")
    by_name = {c.info.run_name: c for c in children}
    t00 = next(name for name in by_name if name.startswith("t00_"))
    t01 = next(name for name in by_name if name.startswith("t01_"))
    assert by_name[t00].info.status == "FINISHED" and "sea_miou_eps8" in by_name[t00].data.metrics
    assert "sea_miou_eps8" not in by_name[t01].data.metrics
    scored_t00 = by_name[t00].data.metrics["sea_miou_eps8"]

    resumed = subprocess.run(sweep_command(*overrides, "--resume"), cwd=tmp_path, env=repo_env,
                             capture_output=True, text=True, timeout=600)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert f"trial {t00}: SEA results already in MLflow, not scored again" in output
    assert f"trial {t00}: SEA on" not in output and f"trial {t01}: SEA on" in output
    assert epochs_logged(storage)[t01][-1] == 2
    _, parents, children = mlflow_runs(f"sqlite:///{db}")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_name = {c.info.run_name: c for c in children}
    assert by_name[t00].data.metrics["sea_miou_eps8"] == scored_t00
    for child in children:
        assert child.info.status == "FINISHED" and "final_sea_miou_eps8" in child.data.metrics
    assert "Sweep wall time: training only" in output
