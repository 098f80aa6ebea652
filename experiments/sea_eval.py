"""SEA evaluation of one segmentation model (published PIR-AT weights or a checkpoint of this project) on a val set.

`--config experiments/configs/eval_<recipe>.yaml` then `key.path=value` overrides, e.g. `model.weights=...`.
The same command runs under `ray job submit`. Exit codes: 0 done, 2 bad input (config, weights, layout, classes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.config import ConfigError, load_config, parse_overrides, resolve_paths  # noqa: E402
from orchestrator.redact import redact  # noqa: E402
from orchestrator.tracking import resolve_tracking_uri  # noqa: E402

EXIT_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sea_eval.py", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides: key.path=value after the options, e.g. sea.eps=[4,8].")
    parser.add_argument("--config", required=True, help="YAML config, e.g. experiments/configs/eval_demo.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the plan (model, images, blocks, actors, attack iterations) and exit")
    parser.add_argument("--resume", action="store_true",
                        help="score only the blocks missing from eval.output; finished blocks are not rescored")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from orchestrator.sea_eval import EvalInputError, build_plan, format_plan, run

    try:
        config = resolve_paths(load_config(args.config, args.overrides), Path.cwd())
        tracking_uri = resolve_tracking_uri(config, override_given="tracking.uri" in parse_overrides(args.overrides))
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
