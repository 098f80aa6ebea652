"""What the job entry points share: their options (`--config`, `--dry-run`, `--resume`, overrides) and the config
and tracking URI they resolve from them, so both commands read a config the same way."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.config import Config, load_config, parse_overrides, resolve_paths
from orchestrator.tracking import resolve_tracking_uri

EXIT_INPUT = 2  # bad input: config, weights, layout, classes


def parse_job_args(argv: list[str] | None, *, prog: str, doc: str, config_help: str, dry_run_help: str,
                   resume_help: str, example: str, default_config: str | None = None) -> argparse.Namespace:
    """Parse `--config` (required unless `default_config`), `--dry-run`, `--resume` and key.path=value overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     epilog=f"Overrides: key.path=value after the options, e.g. {example}.")
    parser.add_argument("--config", required=default_config is None, default=default_config, help=config_help)
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser.parse_args(argv)


def load_job_config(args: argparse.Namespace) -> tuple[Config, str]:
    """The validated config (paths resolved against the working directory) and the MLflow tracking URI; raises
    ConfigError naming the file, the field and the value."""
    config = resolve_paths(load_config(args.config, args.overrides), Path.cwd())
    given = "tracking.uri" in parse_overrides(args.overrides)
    return config, resolve_tracking_uri(config, override_given=given)
