"""Sweep wall time with SEA after all trials (sequential) against SEA as trials finish (overlap), in one run.

Both runs are the demo's sweep (experiments/configs/demo.yaml, the same seeds) run by experiments/pir_at_sweep.py,
each in its own Ray session, storage folder and MLflow database, on the same prepared shards. Printed: each run's
wall time (data, Ray start, sweep), its split (training alone, training beside SEA, SEA alone, idle: neither), the
overlapped/sequential ratio (target <= 0.85) and whether every trial's final metrics are identical in both
(times excluded). Exit code 1 when a target is missed.

    PYTHONPATH=. python experiments/benchmarks/sweep_overlap.py [--workdir DIR] [key.path=value ...]

Overrides apply to both runs (e.g. train.epochs=2 sea.iterations=5 for a smoke run; the figures in
docs/benchmarks.md are from the demo as it is). The sequential run goes first.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "pir_at_sweep.py"
TARGET_RATIO = 0.85
STAGE_LINE = "Stage seconds: "
TIMES = ("train_hours", "attack_hours", "final_train_hours", "final_attack_hours")


def run(mode: str, workdir: Path, shards: Path, overrides: list[str]) -> dict:
    """One run of the demo sweep; returns its wall seconds, its stage seconds and its trials' final metrics."""
    folder = workdir / mode
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlruns.db"
    command = [sys.executable, str(SCRIPT), f"data.shards={shards}", f"sweep.storage_path={folder / 'ray_results'}",
               f"tracking.uri=sqlite:///{db}", f"sea.overlap={'true' if mode == 'overlap' else 'false'}", *overrides]
    print(f"[{mode}] {' '.join(command[1:])}", flush=True)
    started = time.time()
    with open(folder / "log.txt", "w") as log:
        done = subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - started
    text = (folder / "log.txt").read_text()
    if done.returncode != 0:
        raise SystemExit(f"[{mode}] exit code {done.returncode}; see {folder / 'log.txt'}:\n{text[-3000:]}")
    stages = json.loads(next(line for line in text.splitlines() if line.startswith(STAGE_LINE))[len(STAGE_LINE):])
    return {"wall": wall, "stages": stages, "metrics": trial_metrics(f"sqlite:///{db}")}


def trial_metrics(uri: str) -> dict[str, dict[str, float]]:
    """Every trial's final metrics (scores, not times) by trial name."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("pir-at-demo")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.run_role = 'trial'")
    return {r.info.run_name: {k: v for k, v in r.data.metrics.items()
                              if k.startswith(("clean_", "sea_", "final_")) and k not in TIMES} for r in runs}


def compare(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> tuple[bool, float]:
    """Whether both runs logged the same metrics for the same trials, and the largest absolute difference."""
    same_keys = a.keys() == b.keys() and all(a[t].keys() == b[t].keys() for t in a)
    diffs = [abs(a[t][k] - b[t][k]) for t in a if t in b for k in a[t] if k in b[t]
             and not (math.isnan(a[t][k]) and math.isnan(b[t][k]))]
    largest = max(diffs, default=math.inf)
    return same_keys and largest == 0.0, largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where both runs keep their files (default: a temp folder)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sweep_overlap_")).resolve()
    shards = workdir / "shards"
    results = {mode: run(mode, workdir, shards, args.overrides) for mode in ("sequential", "overlap")}
    ratio = results["overlap"]["wall"] / results["sequential"]["wall"]
    identical, largest = compare(results["sequential"]["metrics"], results["overlap"]["metrics"])
    print("\n| run | wall (s) | data (s) | ray (s) | sweep (s) | training only | training + SEA | SEA only | idle |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, result in results.items():
        s = result["stages"]
        print(f"| {mode} | {result['wall']:.0f} | {s['data']:.0f} | {s['ray']:.0f} | {s['split_sweep']:.0f} | "
              f"{s['split_training_only']:.0f} | {s['split_training_and_sea']:.0f} | {s['split_sea_only']:.0f} | "
              f"{s['split_idle']:.0f} |")
    print(f"\noverlap / sequential wall time: {ratio:.3f} (target <= {TARGET_RATIO})")
    print(f"metrics identical in both runs: {identical} ({sum(len(m) for m in results['overlap']['metrics'].values())} "
          f"values over {len(results['overlap']['metrics'])} trials; largest difference {largest:g})")
    (workdir / "sweep_overlap.json").write_text(json.dumps(
        {"ratio": ratio, "identical": identical, "largest_difference": largest,
         **{mode: {"wall": r["wall"], "stages": r["stages"]} for mode, r in results.items()}}, indent=2))
    print(f"files: {workdir}")
    return 0 if ratio <= TARGET_RATIO and identical else 1


if __name__ == "__main__":
    sys.exit(main())
