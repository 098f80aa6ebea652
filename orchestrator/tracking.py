"""MLflow tracking: where runs go (URI resolution) and what each run records (the scores' names:
`orchestrator.scores`; the summary table: `orchestrator.summary`).

One parent run per sweep, one child run per trial (tag `mlflow.parentRunId`). Every score is logged
as a fraction in [0, 1] (never percent); ε in metric names is in units of 1/255 written by
`trainables.units.eps_label` (`sea_miou_eps4`, `sea_mce-bal_miou_eps0.5`). SEA's worst-case mIoU is logged
twice: `sea_miou_eps{E}` is the strongest valid number, `sea_miou_greedy_eps{E}` the paper's greedy walk,
the one comparable with its tables (under `eval.protocol: reference`). MLflow accepts '-' and
'.' in metric names, so loss names are used as they are. Nothing secret is logged: URIs lose their
user/password and credential query parameters, and values of secret-named keys become `***`.
The extra attacks (`sea.extra_attacks`) are logged apart as `extra_{attack}_{score}_eps{E}`, a defended model
(`sea.defense`) under the prefix `defense_{d}_`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import Config, flatten, to_dict
from orchestrator.redact import REDACTED, RedactingClient, is_secret_key, redact, redact_tree
from orchestrator.scores import as_number, final_metrics, metric_key
from orchestrator.summary import is_final, metric_order, sea_ensemble, summary_csv, summary_markdown
from trainables.units import eps_label

DEFAULT_DB = "mlruns.db"

# Tags that identify this project's runs (a resumed sweep finds its parent and children by them).
TAG_ROLE = "run_role"
TAG_SWEEP = "sweep_name"
TAG_STORAGE = "sweep_storage_path"
TAG_TRIAL = "trial_name"
TAG_PARENT = "mlflow.parentRunId"
TAG_FAILURE = "failure"
TAG_OVERRIDES = "trial_overrides"
ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"

# Short param names a trial gets on top of the flattened config (for the MLflow UI's columns).
SHORT_PARAMS = {
    "attack_steps": "train.attack.steps",
    "eps": "train.attack.eps",
    "epochs": "train.epochs",
    "backbone": "model.backbone",
    "init": "model.init",
    "seed": "train.seed",
    "dataset": "data.dataset",
    "decoder": "model.decoder",
    "protocol": "eval.protocol",
}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value; the full config is in config.yaml
MAX_TAG_CHARS = 8000
BATCH = 100  # params/tags per log_batch request (MLflow's limit)


def resolve_tracking_uri(config: Config, override_given: bool, cwd: str | Path | None = None) -> str:
    """An explicit `tracking.uri=` override wins; else MLFLOW_TRACKING_URI; else the config file;
    else a SQLite database `mlruns.db` in the working directory (MLflow 3 refuses a plain folder)."""
    if override_given and config.tracking.uri:
        return config.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if config.tracking.uri:
        return config.tracking.uri
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / DEFAULT_DB}"


# ---------------------------------------------------------------------------------------------
# Secrets


def param_value(key: str, value: Any) -> str:
    """A config value as an MLflow param string: redacted, lists/mappings as JSON, cut at MLflow's limit."""
    if is_secret_key(key) and value is not None:
        return REDACTED
    value = redact_tree(value)
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if len(text) > MAX_PARAM_CHARS:
        marker = "...(truncated; see config.yaml)"
        text = text[: MAX_PARAM_CHARS - len(marker)] + marker
    return text


def config_params(config: Config) -> dict[str, str]:
    """The flattened config (`train.attack.steps` -> '2') as redacted param strings."""
    return {key: param_value(key, value) for key, value in flatten(to_dict(config)).items()}


def config_yaml(config: Config) -> str:
    """The resolved config as YAML, with secrets redacted (the `config.yaml` artifact)."""
    return yaml.safe_dump(redact_tree(to_dict(config)), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Metric helpers


def _now_ms() -> int:
    return int(time.time() * 1000)


def _warn(message: str) -> None:
    print(redact(f"tracking: {message}"), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The tracker


def log_epoch_metrics(client, run_id: str, epoch: int, metrics: Mapping[str, Any]) -> None:
    """Log one epoch's numeric metrics at step = epoch (strings, bools, None and dicts are skipped)."""
    from mlflow.entities import Metric

    stamp = _now_ms()
    entries = [Metric(metric_key(k), number, stamp, int(epoch))
               for k, v in metrics.items() if (number := as_number(v)) is not None]
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start:start + 1000])


class SweepTracker:
    """Records a sweep in MLflow through explicit run ids (no global active run): a parent run for the
    sweep, a child run per trial, their params, metrics, plots and a summary table.

    With `resume=True` the latest parent run of the same sweep name and storage path that is not
    FINISHED is reused (and so are its children, by trial name) instead of starting new runs.
    """

    def __init__(self, tracking_uri: str, config: Config, *, resume: bool = False):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.config = config
        self.resume = resume
        self.client = RedactingClient(MlflowClient(tracking_uri=tracking_uri))
        self._lock = threading.RLock()
        self._children: dict[str, str] = {}
        self.experiment_id = self._experiment()
        self.parent_run_id = self._parent()
        self._log_params(self.parent_run_id, config_params(config))
        self.client.log_text(self.parent_run_id, config_yaml(config), "config.yaml")

    # -- setup ------------------------------------------------------------------------------------

    def _experiment(self) -> str:
        name = self.config.tracking.experiment
        wanted = self.config.tracking.artifact_location
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            print(f"tracking: creating MLflow experiment {name!r} at {redact(self.tracking_uri)}"
                  + (f" (artifacts: {redact(wanted)})" if wanted else ""), flush=True)
            try:
                return self.client.create_experiment(name, artifact_location=wanted)
            except Exception:  # another driver created it meanwhile; anything else re-raises below
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(
                f"tracking.experiment = {name!r}: this experiment is deleted in {redact(self.tracking_uri)}; "
                "restore it (mlflow experiments restore) or choose another tracking.experiment"
            )
        if wanted and experiment.artifact_location.rstrip("/") != wanted.rstrip("/"):
            _warn(f"experiment {name!r} already stores artifacts at {redact(experiment.artifact_location)}; "
                  f"tracking.artifact_location = {redact(wanted)} only applies to a new experiment")
        return experiment.experiment_id

    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _parent(self) -> str:
        sweep = self.config.sweep
        storage = redact(sweep.storage_path)
        if self.resume:
            for run in self._search(f"tags.{TAG_ROLE} = '{ROLE_SWEEP}'"):
                tags = run.data.tags
                if (tags.get(TAG_SWEEP) == sweep.name and tags.get(TAG_STORAGE) == storage
                        and run.info.status != "FINISHED"):
                    run_id = run.info.run_id
                    print(redact(f"tracking: resuming MLflow parent run {run_id} ({run.info.status}) of sweep "
                                 f"{sweep.name!r}"), flush=True)
                    if run.info.status != "RUNNING":
                        self.client.update_run(run_id, status="RUNNING")
                    for child in self._search(f"tags.{TAG_PARENT} = '{run_id}'"):
                        name = child.data.tags.get(TAG_TRIAL)
                        if name is not None and name not in self._children:
                            self._children[name] = child.info.run_id
                    return run_id
            _warn(f"resume: no unfinished MLflow parent run of sweep {sweep.name!r} (storage {storage}); "
                  "starting a new one")
        tags = {TAG_ROLE: ROLE_SWEEP, TAG_SWEEP: sweep.name, TAG_STORAGE: storage}
        run = self.client.create_run(self.experiment_id, run_name=sweep.name, tags=tags)
        print(redact(f"tracking: MLflow parent run {run.info.run_id} for sweep {sweep.name!r}"), flush=True)
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Log params in batches; on a resumed run, existing params are kept and differing ones reported."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        fresh = {}
        for key, value in params.items():
            if key not in existing:
                fresh[key] = value
            elif existing[key] != value:
                _warn(f"run {run_id}: param {key} was logged as {existing[key]!r}, now {value!r}; "
                      "MLflow params cannot change, the first value is kept")
        items = list(fresh.items())
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + BATCH]])

    # -- trials -----------------------------------------------------------------------------------

    def trial_run(self, trial_name: str, trial_config: Config, overrides: Mapping[str, Any]) -> str:
        """The child run of a trial (created once; with resume, the existing child of that name): its
        params are the flattened trial config plus short names (attack_steps, eps, epochs, backbone,
        init, dataset, decoder); artifact `config.yaml` is the resolved trial config."""
        with self._lock:
            run_id = self._children.get(trial_name)
            if run_id is None:
                tags = {TAG_PARENT: self.parent_run_id, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: trial_name,
                        TAG_SWEEP: self.config.sweep.name,
                        TAG_OVERRIDES: redact(json.dumps(redact_tree(dict(overrides)), sort_keys=True, default=str))}
                run_id = self.client.create_run(self.experiment_id, run_name=trial_name, tags=tags).info.run_id
                self._children[trial_name] = run_id
                print(redact(f"tracking: MLflow run {run_id} for trial {trial_name!r}"), flush=True)
            else:
                run = self.client.get_run(run_id)
                if run.info.status in ("FAILED", "KILLED"):
                    self.client.update_run(run_id, status="RUNNING")
                    if TAG_FAILURE in run.data.tags:
                        self.client.delete_tag(run_id, TAG_FAILURE)
        flat = flatten(to_dict(trial_config))
        params = config_params(trial_config)
        params.update({short: param_value(path, flat[path]) for short, path in SHORT_PARAMS.items()})
        self._log_params(run_id, params)
        self.client.log_text(run_id, config_yaml(trial_config), "config.yaml")
        return run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Per-epoch metrics at step = epoch; non-numeric values (strings, bools, None, dicts) are skipped."""
        log_epoch_metrics(self.client, run_id, epoch, metrics)

    def log_result(self, run_id: str, *, clean: Mapping[str, Any], sea: Mapping[float, Mapping[str, Any]],
                   train_hours: float, attack_hours: float, checkpoint_uri: str,
                   prefix: str = "", groups: Mapping[str, Mapping[float, Mapping[str, Any]]] | None = None,
                   ) -> dict[str, float]:
        """Final metrics (fractions in [0, 1], step 0): clean_{miou,aacc,...}; per SEA ε (1/255 units)
        sea_{miou,aacc,macc}_eps{E} (the worst case; sea_miou_eps{E} the strongest valid mIoU),
        sea_miou_greedy_eps{E} (the paper's greedy worst case), sea_{loss}_{score}_eps{E} per loss and
        sea_clean_{score}_eps{E} (clean on the SEA images); from `groups` (sea.extra_attacks, sea.defense)
        extra_{attack}_{score}_eps{E}, and per defence d defense_{d}_clean_{score}, defense_{d}_sea_... as sea_...
        and defense_{d}_extra_{attack}_{score}_eps{E}; train_hours, attack_hours. Artifacts:
        `checkpoint.txt` (the redacted checkpoint URI) and `sea_miou_vs_eps.png`. Returns the metrics.
        With a prefix (`final_`: the last epoch's checkpoint beside the selected one) every name carries it
        and only the metrics and a `{prefix}checkpoint_uri` tag are logged."""
        from mlflow.entities import Metric, RunTag

        from orchestrator.plots import sea_curve

        metrics = {prefix + k: v for k, v in final_metrics(clean, sea, train_hours, attack_hours, groups).items()}
        stamp = _now_ms()
        location = redact(str(checkpoint_uri))
        self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                              tags=[RunTag(f"{prefix}checkpoint_uri", location[:MAX_TAG_CHARS])])
        if prefix:
            return metrics
        self.client.log_text(run_id, location + "\n", "checkpoint.txt")
        if sea:
            title = f"SEA: {self.client.get_run(run_id).info.run_name}"
            figure = sea_curve(sea, clean_miou=metrics.get("clean_miou"), title=title)
            self.client.log_figure(run_id, figure, "sea_miou_vs_eps.png")
        return metrics

    def log_examples(self, run_id: str, images, labels, clean_pred, adv_pred, *, palette=None,
                     eps: float | None = None, class_names: Sequence[str] | None = None) -> str:
        """A PNG grid image / ground truth / clean prediction / adversarial prediction, one row per image.

        images: N×3×H×W floats in [0, 1] (un-normalised) or N×H×W×3 uint8; labels and predictions:
        N×H×W integer class indices with 255 = ignore. The palette defaults to data.classes.VOC_PALETTE.
        Returns the artifact path (`examples_eps{E}.png`, or `examples.png` without ε)."""
        from data.classes import VOC_PALETTE
        from orchestrator.plots import example_grid

        figure = example_grid(_numpy(images), _numpy(labels), _numpy(clean_pred), _numpy(adv_pred),
                              palette=VOC_PALETTE if palette is None else palette, eps=eps,
                              class_names=class_names)
        name = f"examples_eps{eps_label(eps)}.png" if eps is not None else "examples.png"
        self.client.log_figure(run_id, figure, name)
        return name

    def end_trial(self, run_id: str, status: str = "FINISHED") -> None:
        """End a child run (FINISHED, or KILLED for a trial stopped early without a result)."""
        self.client.set_terminated(run_id, status=status)

    def mark_failed(self, run_id: str, message: str) -> None:
        """End a child run as FAILED with tag `failure` carrying the (redacted) message."""
        self.client.set_tag(run_id, TAG_FAILURE, redact(str(message))[-MAX_TAG_CHARS:])
        self.client.set_terminated(run_id, status="FAILED")

    # -- the end ----------------------------------------------------------------------------------

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per child run in MLflow (oldest first): name, status, short params, final metrics."""
        rows = []
        for run in reversed(self._search(f"tags.{TAG_PARENT} = '{self.parent_run_id}'")):
            params, metrics = run.data.params, run.data.metrics
            row: dict[str, Any] = {"trial_name": run.data.tags.get(TAG_TRIAL, run.info.run_name),
                                   "run_id": run.info.run_id, "status": run.info.status}
            for short in SHORT_PARAMS:
                row[short] = params.get(short)
            for key in sorted(metrics, key=metric_order):
                if is_final(key):
                    row[key] = metrics[key]
            rows.append(row)
        return rows

    def finish(self, rows: Sequence[Mapping[str, Any]] | None = None, status: str = "FINISHED") -> list[dict]:
        """Close the sweep: children still RUNNING end FINISHED when they have a result (clean_miou),
        else KILLED; writes `summary.csv`, `summary.md` and `sea_miou_per_trial.png` on the parent from
        the child runs in MLflow (a resumed sweep's earlier trials included); extra `rows` (keyed by
        `trial_name`) add columns or trials; with several inits, epochs or seeds also `claim.md`, `claim.csv`
        and `sea_miou_vs_epochs.png` (`orchestrator.claim`); sets the parent's status. Returns the summary rows."""
        from orchestrator.claim import log_claim
        from orchestrator.plots import sweep_curves

        for run in self._search(f"tags.{TAG_PARENT} = '{self.parent_run_id}'"):
            if run.info.status == "RUNNING":
                done = "clean_miou" in run.data.metrics
                if not done:
                    self.client.set_tag(run.info.run_id, TAG_FAILURE, "ended by the sweep's finish without a result")
                self.client.set_terminated(run.info.run_id, status="FINISHED" if done else "KILLED")
        table = self.summary_rows()
        by_name = {row["trial_name"]: row for row in table}
        for extra in rows or []:
            name = extra.get("trial_name")
            clean = {k: (redact(v) if isinstance(v, str) else v) for k, v in extra.items()}
            if name in by_name:
                by_name[name].update({k: v for k, v in clean.items() if v is not None})
            else:
                table.append(dict(clean))
        self.client.log_text(self.parent_run_id, summary_csv(table), "summary.csv")
        self.client.log_text(self.parent_run_id, summary_markdown(table, sea_ensemble(self.config)), "summary.md")
        eps = sorted({float(k.rsplit("_eps", 1)[1]) for row in table for k in row
                      if k.startswith("sea_miou_eps")})
        if table:
            self.client.log_figure(self.parent_run_id, sweep_curves(table, eps), "sea_miou_per_trial.png")
        log_claim(self.client, self.parent_run_id, table, eps)
        self.client.set_terminated(self.parent_run_id, status=status)
        print(f"tracking: sweep {redact(repr(self.config.sweep.name))} {status}: {len(table)} trial(s) in MLflow run "
              f"{self.parent_run_id}", flush=True)
        return table


def _numpy(array):
    detach = getattr(array, "detach", None)
    if callable(detach):
        array = detach().cpu().numpy()
    import numpy as np

    return np.asarray(array)
