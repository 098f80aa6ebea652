"""SEA scoring as trials finish (orchestrator.job.TrialScorer): beside training, resumable, its wall-time split."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from orchestrator.config import load_config, with_values
from orchestrator.job import TAG_STOPPED, TrialScorer, wall_split
from orchestrator.sea_pool import ScoringCancelled, SeaOutcome
from orchestrator.sweep import TrialOutcome

from .conftest import TINY_CONFIG

CONFIG = with_values(load_config(TINY_CONFIG), {"sea.eps": [4, 8]})
SCORES = {"miou": 0.5, "aacc": 0.75, "macc": 0.5}


class FakeTracker:
    """What TrialScorer needs of SweepTracker, in memory: metrics, tags and run status per run id."""

    def __init__(self):
        self.metrics: dict[str, dict[str, float]] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.status: dict[str, str] = {}
        self.client = SimpleNamespace(
            get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(metrics=dict(self.metrics.get(run_id, {})))),
            set_tag=lambda run_id, key, value: self.tags.setdefault(run_id, {}).__setitem__(key, value),
        )

    def log_result(self, run_id, *, clean, sea, prefix="", **_):
        for eps, scores in sea.items():
            self.metrics.setdefault(run_id, {})[f"{prefix}sea_miou_eps{eps:g}"] = scores["worst"]["miou"]

    def log_examples(self, *args, **kwargs):
        pass

    def end_trial(self, run_id, status="FINISHED"):
        self.status[run_id] = status

    def mark_failed(self, run_id, message):
        self.tags.setdefault(run_id, {})["failure"] = message
        self.status[run_id] = "FAILED"


def outcome(name: str, **metrics) -> TrialOutcome:
    done = {"trial_done": True, "best_checkpoint": f"/ckpt/{name}/best", "best_epoch": 2,
            "final_checkpoint": f"/ckpt/{name}/final", "final_epoch": 3}
    return TrialOutcome(name, {}, CONFIG, {**done, **metrics}, None, ended=True)


def sea_outcome() -> SeaOutcome:
    return SeaOutcome({float(e): {"clean": dict(SCORES), "worst": dict(SCORES)} for e in CONFIG.sea.eps}, 16, 0.1)


@pytest.fixture
def scoring(monkeypatch):
    """score_checkpoint replaced by a recorder: each call appends the checkpoint, then waits for `gate`
    (set by default), or until `stop` is set (then ScoringCancelled, as the pool does between batches)."""
    calls: list[str] = []
    gate, started = threading.Event(), threading.Event()
    gate.set()

    def fake(config, checkpoint, *, label="", stop=None, **_):
        calls.append(checkpoint)
        started.set()
        while not gate.wait(0.01):
            if stop is not None and stop.is_set():
                raise ScoringCancelled(f"cancelled {label}")
        return sea_outcome()

    monkeypatch.setattr("orchestrator.sea_pool.score_checkpoint", fake)
    return SimpleNamespace(calls=calls, gate=gate, started=started)


@pytest.mark.realpath
def test_a_handed_trial_is_scored_in_the_background_and_logged_before_the_sweep_ends(scoring):
    tracker = FakeTracker()
    scorer = TrialScorer(tracker, {"t00": "r0", "t01": "r1"})
    scoring.gate.clear()
    handed = time.time()
    scorer.hand(outcome("t00"))
    assert time.time() - handed < 0.5  # the driver (Tune's loop) goes on at once
    assert scoring.started.wait(5)  # scoring runs while the "training" of the next trial goes on here
    assert tracker.status == {}
    scoring.gate.set()
    deadline = time.time() + 5
    while "r0" not in tracker.status and time.time() < deadline:
        time.sleep(0.01)
    assert tracker.status == {"r0": "FINISHED"}  # in MLflow before the sweep ended (finish() not called yet)
    assert tracker.metrics["r0"] == {"sea_miou_eps4": 0.5, "sea_miou_eps8": 0.5,
                                     "final_sea_miou_eps4": 0.5, "final_sea_miou_eps8": 0.5}
    scorer.hand(outcome("t00"))  # Tune's end of sweep hands it again: ignored
    scorer.hand(outcome("t01"))
    scorer.finish()
    assert scoring.calls == ["/ckpt/t00/best", "/ckpt/t00/final", "/ckpt/t01/best", "/ckpt/t01/final"]
    assert scorer.scored == ["t00", "t01"] and scorer.failures == []
    assert len(scorer.busy) == 2 and all(b > a for a, b in scorer.busy)


@pytest.mark.realpath
def test_cut_scoring_is_scored_again_on_resume_and_finished_scoring_is_not(scoring):
    tracker = FakeTracker()
    runs = {"t00": "r0", "t01": "r1"}
    first = TrialScorer(tracker, runs)
    first.hand(outcome("t00"))
    first.finish()
    scoring.gate.clear()
    first = TrialScorer(tracker, runs)
    first.hand(outcome("t01"))
    assert scoring.started.wait(5)
    scoring.started.clear()
    first.cancel(wait_s=5)  # the interrupt: t01's scoring is cut
    assert not first._thread.is_alive()
    assert "r1" not in tracker.status and "r1" not in tracker.metrics and first.failures == []
    calls_before = len(scoring.calls)

    scoring.gate.set()
    resumed = TrialScorer(tracker, runs)  # --resume hands every ended trial again
    resumed.hand(outcome("t00"))
    resumed.hand(outcome("t01"))
    resumed.finish()
    assert resumed.scored == ["t01"]  # t00's results were in MLflow: not scored again
    assert scoring.calls[calls_before:] == ["/ckpt/t01/best", "/ckpt/t01/final"]
    assert tracker.status == {"r0": "FINISHED", "r1": "FINISHED"}

    # a run with the selected checkpoint's results but not the last epoch's (cut between the two) is scored again
    del tracker.metrics["r1"]["final_sea_miou_eps8"]
    again = TrialScorer(tracker, runs)
    again.hand(outcome("t01"))
    again.finish()
    assert again.scored == ["t01"]


@pytest.mark.realpath
def test_stopped_and_failed_trials_are_marked_not_scored(scoring):
    tracker = FakeTracker()
    scorer = TrialScorer(tracker, {"t00": "r0", "t01": "r1"})
    stopped = TrialOutcome("t00", {}, CONFIG, {"epoch": 2}, None, ended=True)
    assert stopped.stopped_early and not stopped.finished
    scorer.hand(stopped)
    scorer.hand(TrialOutcome("t01", {}, CONFIG, {}, "TrialFailed: diverged", ended=True))
    scorer.finish()
    assert scoring.calls == []
    assert tracker.status == {"r0": "KILLED", "r1": "FAILED"}
    assert tracker.tags["r0"][TAG_STOPPED] == f"fifo after epoch 2 of {CONFIG.train.epochs}"
    assert scorer.failures == ["t01"]


@pytest.mark.realpath
def test_wall_split_counts_training_sea_overlap_and_idle():
    # training 0-100 s; SEA 60-80 (beside training) and 100-130 (after it) and 125-140 (overlapping itself);
    # the sweep ends at 150 s: 10 s idle.
    split = wall_split((0.0, 100.0), [(60.0, 80.0), (100.0, 130.0), (125.0, 140.0)], 150.0)
    assert split == pytest.approx({"training_only": 80.0, "training_and_sea": 20.0, "sea_only": 40.0, "idle": 10.0,
                                   "sweep": 150.0})


def test_only_scoring_with_no_trial_left_training_spreads_the_pool(monkeypatch):
    """Beside training a trial is scored in the background by a pool that grows from sea.min_actors; once the last
    trial has ended (or the sweep has returned), by an actor per batch (sea_pool.score_checkpoint's `spread`)."""
    seen: list[tuple[str, bool]] = []

    def fake(config, checkpoint, *, label="", stop=None, spread=False, **_):
        seen.append((label, spread))
        return sea_outcome()

    monkeypatch.setattr("orchestrator.sea_pool.score_checkpoint", fake)
    scorer = TrialScorer(FakeTracker(), {"t00": "r0", "t01": "r1"}, {"t00": [], "t01": []})
    assert not scorer.training_over()
    scorer.hand(outcome("t00"))
    deadline = time.time() + 30
    while not scorer.busy and time.time() < deadline:  # t00 settled while t01 still trains
        time.sleep(0.01)
    assert not scorer.training_over()
    scorer.hand(outcome("t01"))
    assert scorer.training_over()
    scorer.finish()
    assert seen == [("t00", False), ("t00", False), ("t01", True), ("t01", True)]  # best and final checkpoints
    seen.clear()
    unnamed = TrialScorer(FakeTracker(), {"t00": "r0"})  # trial names unknown: over once the sweep returned
    assert not unnamed.training_over()
    unnamed.trained.set()
    unnamed.hand(outcome("t00"))
    unnamed.finish()
    assert seen == [("t00", True), ("t00", True)]


def test_a_growing_pool_is_never_larger_than_its_batches_can_feed():
    from orchestrator.sea_pool import IN_FLIGHT, pool_strategy

    sea = with_values(load_config(TINY_CONFIG), {"sea.min_actors": 1, "sea.max_actors": 4}).sea
    assert IN_FLIGHT == 2
    # the demo's 2 batches both wait on the first actor: a second would get none
    assert pool_strategy(sea, 2, spread=False, room=0) == {"min_size": 1, "max_size": 1,
                                                           "max_tasks_in_flight_per_actor": 2}
    assert pool_strategy(sea, 5, spread=False, room=0)["max_size"] == 3
    assert pool_strategy(sea, 182, spread=False, room=0)["max_size"] == 4  # VOC val at batch 8: sea.max_actors
    # spread: an actor per batch, within sea.max_actors and the cluster's room; never below sea.min_actors
    assert pool_strategy(sea, 2, spread=True, room=3) == {"min_size": 2, "max_size": 2,
                                                          "max_tasks_in_flight_per_actor": 1}
    assert pool_strategy(sea, 9, spread=True, room=3)["max_size"] == 3
    assert pool_strategy(sea, 9, spread=True, room=0)["max_size"] == 1
