"""PIR-AT sweep: train robust segmentation models with Ray Train/Tune, score them with SEA, log to MLflow.

Run with no arguments for the demo (generated data, tiny model), or `--config` a recipe;
`key.path=value` overrides follow the options, e.g. `train.epochs=3`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.config import DEFAULT_CONFIG, ConfigError, load_config, parse_overrides, resolve_paths  # noqa: E402
from orchestrator.plan import build_plan, format_plan  # noqa: E402
from orchestrator.redact import redact  # noqa: E402
from orchestrator.tracking import resolve_tracking_uri  # noqa: E402

EXIT_CONFIG = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pir_at_sweep.py",
        description=__doc__.split("\n\n")[0],
        epilog="Overrides: key.path=value after the options, e.g. train.epochs=3 sea.eps=[2,4].",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: experiments/configs/demo.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the resolved plan (trials, resources, storage, tracking, SEA) and exit")
    parser.add_argument("--resume", action="store_true",
                        help="restore an interrupted sweep from its storage path; finished trials are not redone")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = resolve_paths(load_config(args.config, args.overrides), Path.cwd())
        override_keys = parse_overrides(args.overrides)
        tracking_uri = resolve_tracking_uri(config, override_given="tracking.uri" in override_keys)
        plan = build_plan(config, tracking_uri)
    except ConfigError as exc:
        print(redact(f"config error: {exc}"), file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print(format_plan(plan))
        return 0
    from orchestrator.job import run_job

    return run_job(plan, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
