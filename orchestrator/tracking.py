"""MLflow tracking: where runs go (URI resolution) and what each run records."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.config import Config

DEFAULT_DB = "mlruns.db"


def resolve_tracking_uri(config: Config, override_given: bool, cwd: str | Path | None = None) -> str:
    """An explicit `tracking.uri=` override wins; else MLFLOW_TRACKING_URI; else the config file;
    else a SQLite database `mlruns.db` in the working directory (MLflow 3 refuses a plain folder)."""
    if override_given and config.tracking.uri:
        return config.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if config.tracking.uri:
        return config.tracking.uri
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / DEFAULT_DB}"
