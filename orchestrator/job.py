"""The main job's stages in order: data, backbone, sweep (train + SEA), tracking summary."""

from __future__ import annotations

import sys

from orchestrator.plan import Plan, format_plan


class StageNotBuilt(RuntimeError):
    """A stage of the job that this version of the project does not implement yet."""


def run_job(plan: Plan, config_path: str, resume: bool = False) -> int:
    """Run every stage of the plan; returns the process exit code."""
    print(format_plan(plan), flush=True)
    print(f"stage 'data preparation' is not built yet; config {config_path} is valid. Nothing was run.",
          file=sys.stderr)
    return 3
