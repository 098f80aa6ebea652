"""Connecting to Ray: join the configured cluster or RAY_ADDRESS (as under `ray job submit`), else start one."""

from __future__ import annotations

import os

import ray
import ray.data

from orchestrator.config import REPO_ROOT, Config

PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def quiet_data() -> None:
    """Turn off Ray Data's live progress bars in this process (datasets made here carry the setting):
    the job prints its own progress per stage, and redrawn bars only garble logs."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def connect(config: Config) -> str:
    """Initialise Ray once for this driver; returns a one-line description of where it runs."""
    if ray.is_initialized():
        return "Ray already initialised in this process"
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        where = f"joined the Ray cluster at {address}"
    else:
        # A local Ray: workers import this checkout, whatever their working directory. Its one node goes when
        # this process goes, so Ray Train's preemption watcher (an actor per trial, draining workers of a node
        # about to be reclaimed) has nothing to watch. The dashboard serves the state API, which Ray Train's
        # placement group cleaner queries every second (and warns each time it cannot).
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {"PYTHONPATH": path, PREEMPTION_WATCHER: "0"}
        context = ray.init(include_dashboard=True, runtime_env={"env_vars": env}, log_to_driver=True)
        where = "started a local Ray"
        if context.dashboard_url:
            where += f" (dashboard http://{context.dashboard_url})"
    quiet_data()
    resources = ray.cluster_resources()
    return f"{where}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
