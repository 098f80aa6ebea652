"""SEA evaluation of one segmentation model (published PIR-AT weights or a checkpoint of this project) on a val set.

`--config experiments/configs/eval_<recipe>.yaml` then `key.path=value` overrides, e.g. `model.weights=...`.
The same command runs under `ray job submit`. Exit codes: 0 done, 2 bad input (config, weights, layout, classes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.cli import EXIT_INPUT, load_job_config, parse_job_args  # noqa: E402
from orchestrator.config import ConfigError  # noqa: E402
from orchestrator.redact import redact  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(
        argv, prog="sea_eval.py", doc=__doc__,
        config_help="YAML config, e.g. experiments/configs/eval_demo.yaml",
        dry_run_help="validate, print the plan (model, images, blocks, actors, attack iterations) and exit",
        resume_help="score only the blocks missing from eval.output; finished blocks are not rescored",
        example="sea.eps=[4,8]")
    from orchestrator.sea_eval import EvalInputError, build_plan, format_plan, run

    try:
        config, tracking_uri = load_job_config(args)
        if args.dry_run:
            print(format_plan(build_plan(config, tracking_uri, dry_run=True)))
            return 0
        run(config, tracking_uri, resume=args.resume)
    except (ConfigError, EvalInputError) as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "input error"
        print(redact(f"{kind}: {str(exc).splitlines()[0]}"), file=sys.stderr)
        return EXIT_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
