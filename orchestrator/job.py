"""The main job's stages in order: data, Ray, backbone pretraining started (generated data only; it runs beside the
sweep, each trial waiting for its own backbone), sweep (train, with SEA scoring each trial as it ends), the SEA left
after training, MLflow summary; times each stage and splits the sweep's wall time into training, SEA and idle."""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from orchestrator.plan import Plan, format_plan
from orchestrator.redact import redact, say

# Per-epoch metrics that go to MLflow (Tune adds its own bookkeeping keys, which are left out).
EPOCH_METRICS = ("loss", "lr", "images_per_s", "epoch_s", "time_", "frac_", "select_")
# Tag of a trial's MLflow run that the scheduler (ASHA) stopped before its last epoch; its value says when.
TAG_STOPPED = "stopped_early"
# Tags of every trial's MLflow run: sweep.epochs_mode; with `checkpoints` also the epoch of the checkpoint the
# run scores, the trial that trained it and that trial's epochs (the learning-rate schedule's length).
TAG_EPOCHS_MODE, TAG_CHECKPOINT_EPOCH = "epochs_mode", "checkpoint_epoch"
TAG_TRAINED_BY, TAG_TRAINED_EPOCHS = "trained_by", "trained_epochs"
# How long an interrupted job waits for the SEA scoring in progress to stop before it exits (it is redone).
CANCEL_WAIT_S = 30.0
EXIT_INTERRUPTED = 130


class StageTimer:
    """Wall-clock seconds per stage, printed as each stage ends and summarised at the end."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.spans: dict[str, tuple[float, float]] = {}

    @contextmanager
    def stage(self, name: str):
        say(f"== stage {name} ...")
        started = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - started
            self.spans[name] = (self.spans.get(name, (started,))[0], time.time())
            say(f"== stage {name}: {self.seconds[name]:.1f}s")

    def summary(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())
        return f"Stage times: {parts}; total {total:.0f}s ({total / 60:.1f} min)"


def _covered(intervals: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The union of the intervals clipped to [start, end], as sorted disjoint intervals."""
    merged: list[list[float]] = []
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals):
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def wall_split(training: tuple[float, float], scoring: list[tuple[float, float]], end: float) -> dict[str, float]:
    """Seconds from the start of training to `end`: training alone, training beside SEA, SEA alone, and idle
    (neither: trial start-up between trials' ends and SEA's start, the wait for the last result)."""
    start = training[0]
    sea = _covered(scoring, start, end)
    both = _length(_covered([(max(a, training[0]), min(b, training[1])) for a, b in sea], start, end))
    train_s = training[1] - training[0]
    sea_s = _length(sea)
    total = end - start
    return {"training_only": train_s - both, "training_and_sea": both, "sea_only": sea_s - both,
            "idle": max(0.0, total - train_s - sea_s + both), "sweep": total}


def epoch_metrics(result: dict) -> dict:
    """The per-epoch metrics worth a chart (Tune's own bookkeeping keys are left out)."""
    return {k: v for k, v in result.items()
            if k.startswith(EPOCH_METRICS) and isinstance(v, (int, float)) and math.isfinite(v)}


@dataclass
class TrialScorer:
    """Settles trials in a driver thread, one at a time in the order they are handed: SEA on a trained trial's
    checkpoints, results to its MLflow run as soon as they exist; failed and early-stopped trials are marked.

    A trial whose SEA results are already in MLflow (a resumed job) is not scored again; one whose scoring was
    cut has none of them (or not all) and is scored again."""

    tracker: object
    runs: dict[str, str]
    checkpoint_runs: dict[str, list] = field(default_factory=dict)  # sweep.epochs_mode checkpoints: trial -> runs
    failures: list[str] = field(default_factory=list)
    scored: list[str] = field(default_factory=list)
    busy: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self):
        self.stop = threading.Event()
        self.trained = threading.Event()  # set once the sweep has returned
        self._queue: queue.Queue = queue.Queue()
        self._handed: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="sea-scorer", daemon=True)
        self._thread.start()

    def hand(self, outcome) -> None:
        """Queue a trial Tune has ended (once per trial name; later hands of the same trial are ignored)."""
        if outcome.name not in self._handed:
            self._handed.add(outcome.name)
            self._queue.put(outcome)

    def finish(self) -> None:
        """Wait until every handed trial is settled (KeyboardInterrupt still reaches the caller)."""
        self._queue.put(None)
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)

    def cancel(self, wait_s: float = CANCEL_WAIT_S) -> None:
        """Stop after the batch in hand; queued trials stay unscored (a resumed job scores them)."""
        self.stop.set()
        self._queue.put(None)
        self._thread.join(timeout=wait_s)

    def _loop(self) -> None:
        while True:
            outcome = self._queue.get()
            if outcome is None or self.stop.is_set():
                return
            started = time.time()
            try:
                self._settle(outcome)
            finally:
                self.busy.append((started, time.time()))

    def _settle(self, outcome) -> None:
        """One ended trial: its MLflow run(s) marked failed or stopped, or scored (one run per scored checkpoint
        with sweep.epochs_mode checkpoints, else the trial's run with its selected and last checkpoints)."""
        checkpoint_runs = self.checkpoint_runs.get(outcome.name) or []
        names = [r.name for r in checkpoint_runs] or [outcome.name]
        if outcome.error:
            self.failures.append(outcome.name)
            say(f"trial {outcome.name} failed: {outcome.error}")
            for name in names:
                self.tracker.mark_failed(self.runs[name], outcome.error)
            return
        if outcome.stopped_early:
            for name in names:
                mark_stopped(self.tracker, self.runs[name], outcome)
            return
        spread = self.training_over()
        if not checkpoint_runs:
            self._score(outcome.name, outcome.config, lambda run_id: _score_trial(self.tracker, run_id, outcome,
                                                                                   stop=self.stop, spread=spread))
            return
        kept = {int(e): uri for e, uri in json.loads(outcome.metrics.get("kept_checkpoints") or "{}").items()}
        for run in checkpoint_runs:
            self._score(run.name, run.config, lambda run_id, run=run: _score_checkpoint_run(
                self.tracker, run_id, run, kept[run.epoch], outcome, stop=self.stop, spread=spread), final=False)

    def training_over(self) -> bool:
        """Whether no trial is training any more (the sweep returned, or every trial named in checkpoint_runs has
        ended): SEA then has the cluster to itself and its pool starts an actor per batch (score_checkpoint)."""
        return self.trained.is_set() or (bool(self.checkpoint_runs) and self._handed >= set(self.checkpoint_runs))

    def _score(self, name: str, config, score, final: bool = True) -> None:
        """Score one MLflow run unless its SEA results are there already; a failure marks that run only."""
        from orchestrator.sea_pool import ScoringCancelled

        tracker, run_id, started = self.tracker, self.runs[name], time.time()
        if _already_scored(tracker, run_id, config, final=final):
            say(f"trial {name}: SEA results already in MLflow, not scored again")
            return
        try:
            score(run_id)
        except ScoringCancelled:
            say(f"trial {name}: SEA scoring cut by the interrupt; --resume scores it again")
            return
        except Exception as exc:  # one trial's scoring failing must not lose the other trials' results
            self.failures.append(name)
            message = f"SEA scoring failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}"
            say(f"trial {name}: {message}")
            tracker.mark_failed(run_id, message)
            return
        self.scored.append(name)
        tracker.end_trial(run_id)
        say(f"trial {name}: SEA results in MLflow ({time.time() - started:.0f}s of scoring)")


def mark_stopped(tracker, run_id: str, outcome) -> None:
    """End the MLflow run of a trial the scheduler stopped: KILLED, tag `stopped_early` naming its last epoch;
    it is not scored (only trials trained to their end are)."""
    epoch, last = outcome.metrics.get("epoch"), outcome.config.train.epochs
    say(f"trial {outcome.name}: stopped by the scheduler after epoch {epoch} of {last}; not scored")
    tracker.client.set_tag(run_id, TAG_STOPPED, f"{outcome.config.sweep.scheduler} after epoch {epoch} of {last}")
    tracker.end_trial(run_id, status="KILLED")


def run_job(plan: Plan, resume: bool = False) -> int:
    """Run every stage of the plan; returns the process exit code."""
    timer = StageTimer()
    print(format_plan(plan), flush=True)
    tracker, runs, backbones = _start(plan, timer, resume)
    scorer = TrialScorer(tracker, runs, {name: plan.runs_of(name) for name in plan.names})
    try:
        outcomes = _train(plan, timer, scorer, runs, resume, backbones)
        if outcomes is None:
            return _interrupted(plan, timer, scorer)
        scorer.trained.set()
        if backbones is not None:
            _pretrain_logged(backbones, tracker)
        with timer.stage("sea"):  # what SEA has left once the last trial has ended (all of it without overlap)
            for outcome in outcomes:
                if outcome.error or outcome.finished or outcome.stopped_early:
                    scorer.hand(outcome)
            scorer.finish()
    except KeyboardInterrupt:
        return _interrupted(plan, timer, scorer)
    _print_split(timer, scorer)
    return _close(plan, tracker, timer, scorer, len(outcomes))


def _pretrain_logged(backbones, tracker) -> None:
    """The pretrain stage's MLflow run, once every backbone task has ended; a backbone that could not be made is
    said here (the trials that load it failed with its error)."""
    try:
        backbones.finish(tracker)
    except RuntimeError as exc:
        say(str(exc))


def _start(plan: Plan, timer: StageTimer, resume: bool):
    """Data and Ray stages, the pretrain tasks started (generated data only), then the sweep's MLflow runs (a
    resumed job reuses them); returns (tracker, runs, backbones or None)."""
    from orchestrator.cluster import connect
    from orchestrator.data_stage import prepare_data
    from orchestrator.pretrain import needed, start_backbones
    from orchestrator.tracking import SweepTracker

    with timer.stage("data"):
        prepare_data(plan.config)
    with timer.stage("ray"):
        say(connect(plan.config))
    tracker = SweepTracker(plan.tracking_uri, plan.config, resume=resume)
    backbones = None
    if needed(plan.trial_configs):
        with timer.stage("pretrain"):  # starting (or reusing) them; their training runs beside the sweep
            backbones = start_backbones(plan.trial_configs)
    mode = plan.config.sweep.epochs_mode
    if not plan.checkpoint_runs:
        runs = {name: tracker.trial_run(name, trial_config, overrides)
                for name, trial_config, overrides in zip(plan.names, plan.trial_configs, plan.trials, strict=True)}
        for run_id in runs.values():
            tracker.client.set_tag(run_id, TAG_EPOCHS_MODE, mode)
        return tracker, runs, backbones
    runs = {}
    for run in plan.checkpoint_runs:
        runs[run.name] = tracker.trial_run(run.name, run.config, run.overrides)
        trained = next(c.train.epochs for n, c in zip(plan.names, plan.trial_configs, strict=True) if n == run.trial)
        for key, value in ((TAG_EPOCHS_MODE, mode), (TAG_CHECKPOINT_EPOCH, run.epoch), (TAG_TRAINED_BY, run.trial),
                           (TAG_TRAINED_EPOCHS, trained)):
            tracker.client.set_tag(runs[run.name], key, str(value))
    return tracker, runs, backbones


def _train(plan: Plan, timer: StageTimer, scorer: TrialScorer, runs: dict[str, str], resume: bool, backbones=None):
    """The Tune sweep; with `sea.overlap` each trial goes to the scorer the moment Tune ends it, so SEA runs beside
    the next trials' training. Returns the trials' outcomes, or None when the sweep was interrupted."""
    from orchestrator.sweep import EpochsToMlflow, TrialOutcome, on_trial_end, run_sweep

    by_name = {n: (o, c) for n, o, c in zip(plan.names, plan.trials, plan.trial_configs, strict=True)}

    def ended(name: str, result: dict) -> None:
        overrides, config = by_name[name]
        scorer.hand(TrialOutcome(name, overrides, config, result, None, ended=True))

    callbacks = [EpochsToMlflow(plan.tracking_uri, runs, keep=epoch_metrics)]
    refs = backbones.refs() if backbones is not None else {}
    with timer.stage("train"):
        if plan.config.sea.overlap:
            with on_trial_end(ended):
                outcomes = run_sweep(plan, resume=resume, callbacks=callbacks, backbones=refs)
        else:
            outcomes = run_sweep(plan, resume=resume, callbacks=callbacks, backbones=refs)
    if any(not o.finished and not o.error and not o.stopped_early for o in outcomes):
        return None  # Tune stops on SIGINT after saving its state
    return outcomes


def _interrupted(plan: Plan, timer: StageTimer, scorer: TrialScorer) -> int:
    """Stop the scoring in progress (a resumed job redoes it) and say how to continue."""
    from orchestrator.sweep import sweep_path

    scorer.cancel()
    say(f"sweep interrupted before every trial was trained and scored; its state is saved under "
        f"{redact(sweep_path(plan.config))} (trials scored so far keep their SEA results in MLflow). "
        "Continue by running the same command with --resume.")
    print(timer.summary(), flush=True)
    return EXIT_INTERRUPTED


def _print_split(timer: StageTimer, scorer: TrialScorer) -> None:
    """The stage times and the sweep's wall time split (training alone, beside SEA, SEA alone, idle), also as
    one JSON line for the benchmark."""
    stages = dict(timer.seconds)
    split = wall_split(timer.spans["train"], scorer.busy, timer.spans["sea"][1])
    print(timer.summary(), flush=True)
    print("Sweep wall time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f}s" for k, v in split.items()), flush=True)
    print("Stage seconds: " + json.dumps({**{k: round(v, 2) for k, v in stages.items()},
                                          **{f"split_{k}": round(v, 2) for k, v in split.items()},
                                          "sea_busy": round(_length(scorer.busy), 2)}), flush=True)


def _close(plan: Plan, tracker, timer: StageTimer, scorer: TrialScorer, trials: int) -> int:
    """The sweep's MLflow summary and the exit code (1 when a trial failed in training or scoring)."""
    from orchestrator.claim import claim_markdown, claim_table, shows_claim
    from orchestrator.summary import sea_ensemble, summary_markdown

    rows = tracker.finish(status="FAILED" if scorer.failures else "FINISHED")
    print("\nSummary\n" + summary_markdown(rows, sea_ensemble(plan.config)), flush=True)
    claim = claim_table(rows, plan.config.sea.eps)
    if shows_claim(claim):
        print("\nAggregated over seeds\n" + claim_markdown(claim, plan.config.sea.eps), flush=True)
    print(f"Open the MLflow UI on these runs:\n  mlflow ui --backend-store-uri {redact(plan.tracking_uri)}", flush=True)
    if scorer.failures:
        say(f"{len(scorer.failures)} of {trials} trial(s) failed; see the messages above and the runs' "
            "'failure' tags")
        return 1
    return 0


def _score_trial(tracker, run_id: str, outcome, stop: threading.Event | None = None, spread: bool = False) -> None:
    """SEA on the checkpoint selected on the held-out selection images and, as `final_*`, on the last epoch's
    (scored once when they are the same checkpoint); both go to the trial's MLflow run."""
    from orchestrator.sea_pool import score_checkpoint

    metrics, scored = outcome.metrics, {}
    for prefix, key, epoch in (("", "best_checkpoint", "best_epoch"), ("final_", "final_checkpoint", "final_epoch")):
        checkpoint = metrics[key]
        if checkpoint not in scored:
            say(f"trial {outcome.name}: SEA on {redact(checkpoint)} ({key.split('_')[0]} epoch {metrics.get(epoch)})")
            scored[checkpoint] = score_checkpoint(outcome.config, checkpoint, label=outcome.name, stop=stop,
                                                  spread=spread)
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


def _score_checkpoint_run(tracker, run_id: str, run, checkpoint: str, trial, stop=None, spread: bool = False) -> None:
    """SEA on the checkpoint a sweep.epochs_mode checkpoints run scores (its trial's, kept at the run's epoch);
    train_hours is the trial's share up to that epoch."""
    from orchestrator.sea_pool import score_checkpoint

    say(f"trial {run.name}: SEA on {redact(checkpoint)} (epoch {run.epoch} of trial {run.trial})")
    sea = score_checkpoint(run.config, checkpoint, label=run.name, stop=stop, spread=spread)
    share = run.epoch / trial.config.train.epochs
    tracker.log_result(run_id, clean=next(iter(sea.by_eps.values()))["clean"], sea=sea.by_eps, groups=sea.groups,
                       train_hours=float(trial.metrics.get("train_hours", 0.0)) * share,
                       attack_hours=sea.seconds / 3600.0, checkpoint_uri=checkpoint)
    if sea.examples is not None:
        ex = sea.examples
        tracker.log_examples(run_id, ex["image"], ex["label"], ex["clean_pred"], ex["adv_pred"], eps=ex["eps"])


def _already_scored(tracker, run_id: str, config, final: bool = True) -> bool:
    """Whether the run holds SEA's worst case at every ε (and, with `final`, the last epoch's checkpoint's too)."""
    from trainables.units import eps_label

    metrics = tracker.client.get_run(run_id).data.metrics
    prefixes = ("", "final_") if final else ("",)
    return all(f"{prefix}sea_miou_eps{eps_label(e)}" in metrics for e in config.sea.eps for prefix in prefixes)
