"""PIR-AT sweep: train robust segmentation models with Ray Train/Tune, score them with SEA, log to MLflow.

Run with no arguments for the demo (generated data, tiny model), or `--config` a recipe;
`key.path=value` overrides follow the options, e.g. `train.epochs=3`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.cli import EXIT_INPUT, load_job_config, parse_job_args  # noqa: E402
from orchestrator.config import DEFAULT_CONFIG, ConfigError  # noqa: E402
from orchestrator.plan import build_plan, format_plan  # noqa: E402
from orchestrator.redact import redact  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(
        argv, prog="pir_at_sweep.py", doc=__doc__, default_config=str(DEFAULT_CONFIG),
        config_help="YAML config (default: experiments/configs/demo.yaml)",
        dry_run_help="validate, print the resolved plan (trials, resources, storage, tracking, SEA) and exit",
        resume_help="restore an interrupted sweep from its storage path; finished trials are not redone",
        example="train.epochs=3 sea.eps=[2,4]")
    try:
        config, tracking_uri = load_job_config(args)
        plan = build_plan(config, tracking_uri)
    except ConfigError as exc:
        print(redact(f"config error: {exc}"), file=sys.stderr)
        return EXIT_INPUT
    if args.dry_run:
        print(format_plan(plan))
        return 0
    from orchestrator.job import run_job

    return run_job(plan, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
