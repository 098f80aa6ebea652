"""Connecting to Ray: join the configured cluster or RAY_ADDRESS (as under `ray job submit`), else start one."""

from __future__ import annotations

import os

import ray
import ray.data

from orchestrator.config import REPO_ROOT, Config


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
    # The job prints its own progress per stage; Ray Data's live bars only garble a log file.
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    return f"{where}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
