"""Connecting to Ray: join the configured cluster or RAY_ADDRESS (as under `ray job submit`), else start one."""

from __future__ import annotations

import os

import ray
import ray.data

from orchestrator.config import REPO_ROOT, Config


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
        # A local Ray: workers import this checkout, whatever their working directory.
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=True)
        where = "started a local Ray"
    quiet_data()
    resources = ray.cluster_resources()
    return f"{where}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
