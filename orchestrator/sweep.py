"""The Ray Tune sweep: each trial builds and fits a TorchTrainer (Train V2); metrics reach Tune and MLflow."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray.train
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.config import Config, to_dict, validate
from orchestrator.plan import Plan, trial_config
from orchestrator.train import build_trainer, checkpoint_uri, fit
from trainables.report_keys import PROXY_METRIC

TRIALS_DIR = "trials"
KEPT_DIR = "kept"  # a run's checkpoints kept for sweep.epochs_mode checkpoints, beside Ray Train's epoch_NNNN
TRIAL_DRIVER_MEMORY = 256 * 1024**2
TRIAL_STOP_GRACE_S = 10
STATE_API_TIMEOUT_S = 10.0  # how long the check whether Ray's state API answers may take
CLEANER_GRACE_S = 30.0  # what Ray Train's own cleaner (it polls every second) gets before the sweep removes a group
RELEASE_WAIT_S = 120.0  # how long a stopped trial's placement group may stay in use before it is left to the job's end


@dataclass
class TrialOutcome:
    """A finished trial as the driver sees it after Tune returns."""

    name: str
    overrides: dict[str, Any]
    config: Config
    metrics: dict[str, Any]
    error: str | None
    ended: bool = False  # Tune ended the trial (trained to the end, or stopped by the scheduler); not interrupted

    @property
    def finished(self) -> bool:
        """Trained to the end (it reported its best checkpoint); False for failed or interrupted trials."""
        return self.error is None and bool(self.metrics.get("trial_done"))

    @property
    def stopped_early(self) -> bool:
        """Stopped by the scheduler (ASHA) before its last epoch: ended without an error or a best checkpoint."""
        return self.ended and self.error is None and not self.metrics.get("trial_done")


def sweep_path(config: Config) -> str:
    """Where Tune keeps the sweep's state (for --resume): `sweep.storage_path/sweep.name`."""
    return f"{_absolute(config.sweep.storage_path).rstrip('/')}/{config.sweep.name}"


def trials_path(config: Config, run: str) -> str:
    """Where one start of the sweep keeps its trials' Ray Train runs. Each fresh start gets its own `run`
    folder, so running the same command again trains anew instead of restoring the last start's checkpoints;
    `--resume` restores the run name with Tune's state and continues those trials."""
    return f"{sweep_path(config)}/{TRIALS_DIR}/{run}"


def new_run_name() -> str:
    """A sortable, unique name for a fresh start of a sweep (UTC time and a random suffix)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


class KeepEpochs(UserCallback):
    """Controller-side Train callback: the checkpoint of each listed epoch is copied to `kept/epoch_NNNN` in the
    run's folder when it is reported (the latest checkpoint is never deleted before the next report), so that
    checkpoint retention (train.keep_checkpoints, ranked on the selection images) cannot remove it."""

    def __init__(self, epochs: list[int]):
        self.epochs = set(epochs)

    def after_report(self, run_context, metrics, checkpoint):
        epoch = metrics[0].get("epoch") if metrics else None
        if checkpoint is None or epoch not in self.epochs:
            return
        import pyarrow.fs

        target = kept_path(checkpoint.path, int(epoch))
        checkpoint.filesystem.create_dir(target)
        pyarrow.fs.copy_files(checkpoint.path, target, source_filesystem=checkpoint.filesystem,
                              destination_filesystem=checkpoint.filesystem)


def kept_path(checkpoint_path: str, epoch: int) -> str:
    """Where KeepEpochs keeps the checkpoint of `epoch` of the run holding `checkpoint_path`."""
    return f"{checkpoint_path.rstrip('/').rsplit('/', 1)[0]}/{KEPT_DIR}/epoch_{epoch:04d}"


def kept_checkpoints(final: Any, epochs: list[int]) -> dict[int, str]:
    """The kept checkpoints (epoch -> URI) of a run whose last checkpoint is `final`; a resumed run keeps the
    copies its earlier start made."""
    found = {}
    for epoch in epochs:
        path = kept_path(final.path, epoch)
        if final.filesystem.get_file_info(path).type.name == "Directory":
            found[epoch] = checkpoint_uri(ray.train.Checkpoint(path, filesystem=final.filesystem))
    return found


def run_trial(tune_config: dict[str, Any], backbones: dict[str, Any] | None = None) -> None:
    """A Tune trial: fit one TorchTrainer with this trial's config, then report its best checkpoint (and, with
    sweep.epochs_mode checkpoints, the checkpoints kept at the epochs its runs score). `backbones` maps the
    pretrain checkpoints still being made to their Ray tasks: the trial waits for its own first."""
    trial = tune_config["trial"]
    config = trial_config(validate(trial["base"]), trial["overrides"])
    pending = (backbones or {}).get(config.model.backbone_weights)
    if pending is not None:
        waited = time.time()
        ray.get(pending)  # a failed pretraining fails this trial with its error
        print(f"trial {trial['name']}: backbone {config.model.backbone_weights} ready "
              f"(waited {time.time() - waited:.0f}s)", flush=True)
    keep = list(trial.get("keep_epochs") or [])
    started = time.time()
    trainer = build_trainer(
        config,
        name=trial["name"],
        storage_path=trials_path(config, trial["run"]),
        callbacks=[TuneReportCallback(), *([KeepEpochs(keep)] if keep else [])],
    )
    outcome = fit(trainer)
    kept = kept_checkpoints(outcome.final_checkpoint, keep) if keep else {}
    if len(kept) != len(keep):
        raise RuntimeError(f"trial {trial['name']}: checkpoints of epochs {sorted(set(keep) - set(kept))} were not "
                           "kept (sweep.epochs_mode checkpoints)")
    history = outcome.history
    attack_seconds = sum(float(row.get("time_attack_s", 0.0)) for row in history)
    tune.report({
        **{k: v for k, v in outcome.best_metrics.items() if isinstance(v, (int, float, str))},
        "best_checkpoint": checkpoint_uri(outcome.best_checkpoint),
        "best_epoch": outcome.best_metrics.get("epoch"),
        "final_checkpoint": checkpoint_uri(outcome.final_checkpoint),
        "final_epoch": outcome.final_metrics.get("epoch"),
        "train_hours": (time.time() - started) / 3600.0,
        "attack_hours": attack_seconds / 3600.0,
        "kept_checkpoints": json.dumps({str(e): uri for e, uri in kept.items()}),
        "trial_done": True,
    })


class EpochsToMlflow(tune.Callback):
    """Driver-side Tune callback: each epoch a trial reports goes to its MLflow child run (step = epoch).

    Tune pickles its callbacks with the sweep state, so this holds only the tracking URI and the run ids;
    the MLflow client is made on first use (also after `--resume` restores the callback)."""

    def __init__(self, tracking_uri: str, run_ids: dict[str, str], keep: Callable[[dict], dict]):
        self.tracking_uri = tracking_uri
        self.run_ids = dict(run_ids)
        self.keep = keep
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow import MlflowClient

        from orchestrator.tracking import log_epoch_metrics

        if "epoch" not in result or result.get("trial_done"):
            return
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        run_id = self.run_ids[trial.config["trial"]["name"]]
        log_epoch_metrics(self._client, run_id, int(result["epoch"]), self.keep(result))


# The driver-side listener of trials as Tune ends them (see `on_trial_end`); a module global, because Tune
# restores its callbacks from the sweep state on --resume and they cannot carry a reference to this process.
_listeners: list[Callable[[str, dict[str, Any]], None]] = []


@contextmanager
def on_trial_end(listener: Callable[[str, dict[str, Any]], None]) -> Iterator[None]:
    """While inside, `listener(trial name, last result)` is called in the driver as each trial ends (trained to
    its end or stopped by the scheduler), and at the first step of a resumed sweep for trials that had ended."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class TrialsEnded(tune.Callback):
    """Driver-side Tune callback: tells the `on_trial_end` listeners about every trial Tune has ended, once per
    process (a resumed sweep hands its earlier ended trials again; the listeners decide what is left to do)."""

    def __init__(self):
        self._handed: set[str] = set()

    def __getstate__(self):
        return {**self.__dict__, "_handed": set()}

    def _hand(self, trial) -> None:
        name = trial.config["trial"]["name"]
        if name in self._handed:
            return
        self._handed.add(name)
        for listener in list(_listeners):
            listener(name, dict(trial.last_result or {}))

    def on_step_begin(self, iteration, trials, **info):
        for trial in trials:
            if trial.status == "TERMINATED":
                self._hand(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._hand(trial)


class ReleaseStoppedTrials(tune.Callback):
    """Driver-side Tune callback: gives back the CPUs (GPUs) of a trial the scheduler stopped early.

    Tune stops such a trial by killing its actor, which takes its TrainController and workers with it; but the
    workers' placement group, created by the controller, lives as long as the job (Ray frees a placement group
    when its creator and its creator's job are both gone). Left there, it holds its resources until the sweep
    ends, and on a small cluster the next trials' data tasks wait for a CPU forever. Ray Train's own placement
    group cleaner removes it when it can reach the state API (a cluster with a dashboard, as the job's local Ray):
    this callback then leaves it to that cleaner and says when it is gone; it removes the group itself (once
    nothing runs in it) only without the state API, or when the cleaner has not within CLEANER_GRACE_S. The worker
    reports its placement group with every epoch. `join` waits for the releases still under way."""

    def __init__(self):
        self.threads: list[threading.Thread] = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = dict(trial.last_result or {})
        group = result.get("placement_group")
        if group and not result.get("trial_done"):
            name = trial.config["trial"]["name"]
            thread = threading.Thread(target=release_placement_group, args=(group, name), daemon=True,
                                      name=f"release-{name}")
            thread.start()
            self.threads.append(thread)

    def join(self, timeout_s: float = RELEASE_WAIT_S) -> None:
        deadline = time.time() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.time()))


def state_api_reachable(timeout_s: float = STATE_API_TIMEOUT_S) -> bool:
    """Whether the state API of the cluster this driver is connected to answers (its dashboard serves it): Ray
    Train's placement group cleaner needs it to see that a trial's controller has died. Without a dashboard, Ray's
    state client tries 127.0.0.1:8265, where another Ray on the machine may answer, so the answer must name this
    driver's node."""
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    context = ray.get_runtime_context()
    node = context.get_node_id()
    try:
        nodes = list_nodes(address=context.gcs_address, filters=[("node_id", "=", node)], timeout=timeout_s,
                           raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError):
        return False
    return any(n.node_id == node for n in nodes)


def release_placement_group(group: str, trial: str, wait_s: float = RELEASE_WAIT_S,
                            cleaner_grace_s: float | None = None) -> bool:
    """Wait (up to `wait_s`) until placement group `group` (hex id) is removed; True once it is. Ray Train's placement
    group cleaner removes it when its controller dies, if it can reach the state API; it is removed here once none
    of its resources is in use (its actors have died) when the state API is out of reach, or when the cleaner has
    not removed it within `cleaner_grace_s` (default CLEANER_GRACE_S, 0 without the state API)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if cleaner_grace_s is None:
        cleaner_grace_s = CLEANER_GRACE_S if state_api_reachable() else 0.0
    handle = PlacementGroup(PlacementGroupID.from_hex(group))
    started = time.time()
    suffix = f"_group_{group}"
    while time.time() < started + wait_s:
        table = placement_group_table(handle)
        cpus = sum(bundle.get("CPU", 0.0) for bundle in (table.get("bundles") or {}).values())
        released = f"trial {trial}: stopped early; released its Train workers' placement group ({cpus:g} CPU"
        if table.get("state") == "REMOVED":
            print(f"{released}, by Ray Train's placement group cleaner)", flush=True)
            return True
        total, free = ray.cluster_resources(), ray.available_resources()
        held = {k: v for k, v in total.items() if k.endswith(suffix) and not k.startswith("bundle_group")}
        idle = table.get("state") == "CREATED" and all(free.get(k, 0.0) >= v for k, v in held.items())
        if idle and time.time() >= started + cleaner_grace_s:
            remove_placement_group(handle)
            late = f"; Ray Train's cleaner had not within {cleaner_grace_s:g}s" if cleaner_grace_s else ""
            print(f"{released}{late})", flush=True)
            return True
        time.sleep(0.5)
    print(f"trial {trial}: stopped early, but its Train workers' placement group {group} was still in use after "
          f"{wait_s:.0f}s; it is released when the sweep ends", flush=True)
    return False


def _scheduler(plan: Plan):
    """The trial scheduler `sweep.scheduler` names (None: FIFO). ASHA acts on the selection metric (the robust
    proxy on the held-out selection images); epochs without a validation report no proxy and are passed over."""
    sweep = plan.config.sweep
    if sweep.scheduler == "fifo":
        return None
    # Tune rejects a result without the scheduler's metric unless told that epochs may lack it (val_every > 1).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # ASHA must not stop a trial for reaching (or at) its last epoch: Tune would then abort the trial before it
    # reports its best checkpoint, and it would count as stopped early. So its rungs end below the last epoch
    # (max_t = last - 1) and a trial past max_t goes on (stop_last_trials off).
    last = max(c.train.epochs for c in plan.trial_configs)
    return tune.schedulers.ASHAScheduler(
        time_attr="epoch", metric=PROXY_METRIC, mode="max", grace_period=sweep.asha_grace_epochs,
        reduction_factor=sweep.asha_reduction_factor, max_t=max(sweep.asha_grace_epochs, last - 1),
        stop_last_trials=False,
    )


def _tuner(plan: Plan, callbacks: list[tune.Callback], resume: bool, backbones: dict[str, Any]) -> tune.Tuner:
    config = plan.config
    # On Ctrl+C Tune asks running trials to stop, but a trial blocked in TorchTrainer.fit() only notices at
    # its end; Tune's default wait before it removes such a trial is 600 s.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(TRIAL_STOP_GRACE_S))
    # The trial function only drives its TorchTrainer, whose workers reserve their own CPUs and GPUs. Even a
    # fraction of a CPU here would leave less than a whole one for a data task and stall the pipeline on a
    # small machine, so the trial reserves a little memory instead (Tune needs a non-empty request).
    trainable = tune.with_resources(tune.with_parameters(run_trial, backbones=backbones),
                                    tune.PlacementGroupFactory([{"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}]))
    path = sweep_path(config)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no sweep state at {path} (sweep.storage_path/sweep.name)")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, restart_errored=False,
                                  param_space=None)
    base = to_dict(config)
    run = new_run_name()
    print(f"sweep {config.sweep.name}: trials of this start under {trials_path(config, run)}", flush=True)
    trials = [{"base": base, "overrides": o, "name": n, "run": run, "keep_epochs": [r.epoch for r in plan.runs_of(n)]}
              for o, n in zip(plan.trials, plan.names, strict=True)]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(
            scheduler=_scheduler(plan), max_concurrent_trials=config.sweep.max_concurrent_trials,
            trial_name_creator=lambda t: t.config["trial"]["name"],
            # The next trial runs in the process of the last one (its imports done) unless a scheduler may stop a
            # trial mid-fit: Tune would keep that process for reuse while its trainer still runs.
            reuse_actors=config.sweep.scheduler == "fifo",
            trial_dirname_creator=lambda t: t.config["trial"]["name"],
        ),
        run_config=tune.RunConfig(name=config.sweep.name, storage_path=_absolute(config.sweep.storage_path),
                                  callbacks=callbacks, verbose=1),
    )


def _ended_before(config: Config) -> list[str]:
    """Trials a saved sweep state records as ended (TERMINATED). The state is saved before an interrupt stops the
    running trials, so it holds them as running; Tune's results after an interrupt call every trial terminated."""
    path = sweep_path(config)
    if not tune.Tuner.can_restore(path):
        return []
    from ray.tune import ExperimentAnalysis

    return [t.config["trial"]["name"] for t in ExperimentAnalysis(path).trials if t.status == "TERMINATED"]


def run_sweep(plan: Plan, *, resume: bool = False, callbacks: list[tune.Callback] = (),
              backbones: dict[str, Any] | None = None) -> list[TrialOutcome]:
    """Run (or resume) every trial of the plan; returns each trial's final metrics or error. Trials ended by Tune
    are handed to the `on_trial_end` listeners as they end (the callback `TrialsEnded` is added here).
    `backbones`: pretrain checkpoint URI -> the Ray task making it, which the trials loading it wait for."""
    ended: set[str] = set(_ended_before(plan.config) if resume else ())
    with on_trial_end(lambda name, result: ended.add(name)):
        release = ReleaseStoppedTrials()
        results = _tuner(plan, [*callbacks, TrialsEnded(), release], resume, backbones or {}).fit()
        release.join()
    by_name = {n: (o, c) for n, o, c in zip(plan.names, plan.trials, plan.trial_configs, strict=True)}
    outcomes = []
    for result in results:
        name = result.config["trial"]["name"]
        overrides, config = by_name[name]
        error = None
        if result.error is not None:
            error = str(result.error).strip().splitlines()[-1] if str(result.error).strip() else repr(result.error)
        outcomes.append(TrialOutcome(name, overrides, config, dict(result.metrics or {}), error,
                                     ended=name in ended))
    order = {name: i for i, name in enumerate(plan.names)}
    return sorted(outcomes, key=lambda o: order[o.name])
