"""The main job's stages in order: data, Ray, sweep (train), SEA scoring, MLflow summary; times each stage."""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager

from orchestrator.plan import Plan, format_plan
from orchestrator.redact import redact

# Per-epoch metrics that go to MLflow (Tune adds its own bookkeeping keys, which are left out).
EPOCH_METRICS = ("loss", "lr", "images_per_s", "epoch_s", "time_", "frac_", "select_")


def say(message: str) -> None:
    print(redact(message), file=sys.stderr, flush=True)


class StageTimer:
    """Wall-clock seconds per stage, printed as each stage ends and summarised at the end."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        say(f"== stage {name} ...")
        started = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - started
            say(f"== stage {name}: {self.seconds[name]:.1f}s")

    def summary(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())
        return f"Stage times: {parts}; total {total:.0f}s ({total / 60:.1f} min)"


def epoch_metrics(result: dict) -> dict:
    """The per-epoch metrics worth a chart (Tune's own bookkeeping keys are left out)."""
    return {k: v for k, v in result.items()
            if k.startswith(EPOCH_METRICS) and isinstance(v, (int, float)) and math.isfinite(v)}


def run_job(plan: Plan, resume: bool = False) -> int:
    """Run every stage of the plan; returns the process exit code."""
    from orchestrator.cluster import connect
    from orchestrator.data_stage import prepare_data
    from orchestrator.summary import sea_ensemble, summary_markdown
    from orchestrator.sweep import EpochsToMlflow, run_sweep, sweep_path
    from orchestrator.tracking import SweepTracker, redact

    config = plan.config
    timer = StageTimer()
    print(format_plan(plan), flush=True)
    with timer.stage("data"):
        prepare_data(config)
    with timer.stage("ray"):
        say(connect(config))
    tracker = SweepTracker(plan.tracking_uri, config, resume=resume)
    runs = {name: tracker.trial_run(name, trial_config, overrides)
            for name, trial_config, overrides in zip(plan.names, plan.trial_configs, plan.trials, strict=True)}
    with timer.stage("train"):
        outcomes = run_sweep(plan, resume=resume,
                             callbacks=[EpochsToMlflow(plan.tracking_uri, runs, keep=epoch_metrics)])
    unfinished = [o.name for o in outcomes if not o.finished and not o.error]
    if unfinished:  # Tune stops on SIGINT after saving its state; nothing is scored or closed then
        say(f"sweep interrupted before {', '.join(unfinished)} finished; its state is saved under "
            f"{redact(sweep_path(config))}. Continue by running the same command with --resume.")
        print(timer.summary(), flush=True)
        return 130
    failures = 0
    with timer.stage("sea"):
        for outcome in outcomes:
            run_id = runs[outcome.name]
            if outcome.error:
                failures += 1
                say(f"trial {outcome.name} failed: {outcome.error}")
                tracker.mark_failed(run_id, outcome.error)
                continue
            if _already_scored(tracker, run_id, outcome.config):
                say(f"trial {outcome.name}: SEA results already in MLflow, not scored again")
                continue
            try:
                _score_trial(tracker, run_id, outcome)
            except Exception as exc:  # one trial's scoring failing must not lose the other trials' results
                failures += 1
                message = f"SEA scoring failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}"
                say(f"trial {outcome.name}: {message}")
                tracker.mark_failed(run_id, message)
                continue
            tracker.end_trial(run_id)
    rows = tracker.finish(status="FAILED" if failures else "FINISHED")
    print("\nSummary\n" + summary_markdown(rows, sea_ensemble(config)), flush=True)
    print(timer.summary(), flush=True)
    print(f"Open the MLflow UI on these runs:\n  mlflow ui --backend-store-uri {redact(plan.tracking_uri)}", flush=True)
    if failures:
        say(f"{failures} of {len(outcomes)} trial(s) failed; see the messages above and the runs' 'failure' tags")
        return 1
    return 0


def _score_trial(tracker, run_id: str, outcome) -> None:
    """SEA on the checkpoint selected on the held-out selection images and, as `final_*`, on the last epoch's
    (scored once when they are the same checkpoint); both go to the trial's MLflow run."""
    from orchestrator.sea_pool import score_checkpoint
    from orchestrator.tracking import redact

    metrics, scored = outcome.metrics, {}
    for prefix, key, epoch in (("", "best_checkpoint", "best_epoch"), ("final_", "final_checkpoint", "final_epoch")):
        checkpoint = metrics[key]
        if checkpoint not in scored:
            say(f"trial {outcome.name}: SEA on {redact(checkpoint)} ({key.split('_')[0]} epoch {metrics.get(epoch)})")
            scored[checkpoint] = score_checkpoint(outcome.config, checkpoint, label=outcome.name)
        sea = scored[checkpoint]
        first = next(iter(sea.by_eps.values()))
        tracker.log_result(
            run_id, clean=first["clean"], sea=sea.by_eps, prefix=prefix, groups=sea.groups,
            train_hours=float(metrics.get("train_hours", 0.0)),
            attack_hours=float(metrics.get("attack_hours", 0.0)) + sum(o.seconds for o in scored.values()) / 3600.0,
            checkpoint_uri=checkpoint,
        )
        if not prefix and sea.examples is not None:
            ex = sea.examples
            tracker.log_examples(run_id, ex["image"], ex["label"], ex["clean_pred"], ex["adv_pred"], eps=ex["eps"])


def _already_scored(tracker, run_id: str, config) -> bool:
    from trainables.units import eps_label

    metrics = tracker.client.get_run(run_id).data.metrics
    return all(f"{prefix}sea_miou_eps{eps_label(e)}" in metrics for e in config.sea.eps for prefix in ("", "final_"))
