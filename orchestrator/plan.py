"""The resolved plan of a sweep: its trials, resources, storage and SEA settings (what --dry-run prints)."""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

from data.shards import is_local
from orchestrator.config import PROTOCOLS, Config, ConfigError, with_values
from orchestrator.pretrain import is_cached, needed, resolve_backbone
from orchestrator.redact import redact


@dataclass
class Plan:
    """Everything a run will do, resolved from a validated config; built before anything starts."""

    config: Config
    trials: list[dict[str, Any]]
    trial_configs: list[Config]
    names: list[str]
    tracking_uri: str
    warnings: list[str] = field(default_factory=list)
    # sweep.epochs_mode checkpoints: every MLflow run scored from a trial's checkpoints (empty in separate mode)
    checkpoint_runs: list[CheckpointRun] = field(default_factory=list)

    def runs_of(self, trial: str) -> list[CheckpointRun]:
        """The checkpoint runs a trial's training serves, by epoch (none in separate mode)."""
        return sorted((r for r in self.checkpoint_runs if r.trial == trial), key=lambda r: r.epoch)

    @property
    def training_epochs(self) -> int:
        """Epochs the whole sweep trains (every trial to its train.epochs)."""
        return sum(c.train.epochs for c in self.trial_configs)


@dataclass
class CheckpointRun:
    """A run of a `sweep.epochs_mode: checkpoints` sweep: the checkpoint at `epoch` of the training trial `trial`
    (which trains to its group's largest epoch count), scored and logged as its own MLflow run."""

    name: str
    trial: str
    epoch: int
    overrides: dict[str, Any]
    config: Config


def expand_trials(config: Config) -> list[dict[str, Any]]:
    """The sweep's trials as `key.path -> value` overrides: the grid's product, or seeded random draws."""
    params = config.sweep.params
    if not params:
        return [{} for _ in range(config.sweep.num_samples)]
    keys = sorted(params)
    if config.sweep.search == "grid":
        grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(params[k] for k in keys))]
        return grid * config.sweep.num_samples
    rng = random.Random(config.train.seed)
    return [{k: rng.choice(params[k]) for k in keys} for _ in range(config.sweep.num_samples)]


def trial_name(index: int, overrides: dict[str, Any]) -> str:
    """A unique, readable trial name, e.g. 't01_eps=4_steps=2' (also its folder and MLflow run name)."""
    short = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(overrides.items()))
    return f"t{index:02d}_{short or 'base'}"


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def check_paths(config: Config) -> list[str]:
    """Warnings for local inputs that do not exist yet (placeholders in recipes), never errors."""
    warnings = []
    data = config.data
    if data.root is not None and not os.path.exists(data.root):
        warnings.append(
            f"data.root {data.root}: not found (a placeholder? point it at your "
            f"{'ADEChallengeData2016' if data.dataset == 'ade20k' else 'VOCdevkit/VOC2012'} folder)"
        )
    if is_local(data.shards) and not os.path.exists(os.path.join(_local_path(data.shards), "train", "manifest.json")):
        source = "generated data" if data.synthetic else f"data.root {data.root}"
        warnings.append(f"data.shards {data.shards}: not found, will be prepared from {source}")
    named = {"model.backbone_weights": config.model.backbone_weights,
             **{f"model.init_weights.{init}": uri for init, uri in config.model.init_weights.items()}}
    for key, weights in named.items():
        if weights and is_local(weights) and not os.path.exists(_local_path(weights)):
            warnings.append(f"{key} {weights}: not found")
    return warnings


def trial_config(base: Config, overrides: dict[str, Any]) -> Config:
    """One trial's config: the sweep's values set on the base, and the backbone file its init loads named."""
    return resolve_backbone(with_values(base, overrides))


def build_plan(config: Config, tracking_uri: str) -> Plan:
    """Expand and validate every trial; a trial whose overrides make an invalid config is a ConfigError."""
    trials = expand_trials(config)
    trial_configs = []
    names = [trial_name(i, overrides) for i, overrides in enumerate(trials)]
    for name, overrides in zip(names, trials, strict=True):
        try:
            trial_configs.append(trial_config(config, overrides))
        except ConfigError as exc:
            raise ConfigError(f"sweep trial {name}: {exc}") from None
    if config.sweep.epochs_mode == "checkpoints":
        return _checkpoints_plan(config, trials, trial_configs, names, tracking_uri)
    return Plan(config, trials, trial_configs, names, tracking_uri, check_paths(config))


def _checkpoints_plan(config: Config, trials: list[dict[str, Any]], trial_configs: list[Config], names: list[str],
                      tracking_uri: str) -> Plan:
    """Trials that differ only in train.epochs become one trial trained to the largest count; each original trial
    is a checkpoint run scoring that trial's checkpoint at its own epoch count (repeats of a grid stay apart)."""
    groups: dict[tuple[str, int], list[int]] = {}
    seen: dict[tuple[str, int], int] = {}
    for index, (overrides, trial_config) in enumerate(zip(trials, trial_configs, strict=True)):
        rest = json.dumps({k: v for k, v in overrides.items() if k != "train.epochs"}, sort_keys=True, default=str)
        repeat = seen.get((rest, trial_config.train.epochs), 0)
        seen[(rest, trial_config.train.epochs)] = repeat + 1
        groups.setdefault((rest, repeat), []).append(index)
    kept, runs = [], []
    for members in groups.values():
        longest = max(members, key=lambda m: trial_configs[m].train.epochs)
        kept.append(longest)
        runs += [CheckpointRun(names[m], names[longest], trial_configs[m].train.epochs, trials[m], trial_configs[m])
                 for m in members]
    kept.sort()
    return Plan(config, [trials[k] for k in kept], [trial_configs[k] for k in kept], [names[k] for k in kept],
                tracking_uri, check_paths(config), runs)


def epochs_text(plan: Plan) -> str:
    """The plan's line on sweep.epochs_mode and the training epochs the whole sweep costs."""
    if plan.config.sweep.epochs_mode == "separate":
        return (f"Epochs: sweep.epochs_mode separate (one trial per epoch count, each with its own learning-rate "
                f"schedule); {plan.training_epochs} training epochs in all")
    separate = sum(r.config.train.epochs for r in plan.checkpoint_runs)
    return (f"Epochs: sweep.epochs_mode checkpoints (the schedule of the longest run, scored at intermediate epochs): "
            f"{len(plan.trials)} trial(s) train to their largest epoch count, {len(plan.checkpoint_runs)} run(s) score "
            f"their checkpoints; {plan.training_epochs} training epochs in all (separate: {separate})")


def scaling_text(config: Config) -> str:
    """The Ray Train ScalingConfig a trial will use, as text."""
    c = config.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.gpus_per_worker:
        resources["GPU"] = c.gpus_per_worker
    return (
        f"ScalingConfig(num_workers={c.workers}, use_gpu={bool(c.gpus_per_worker)}, "
        f"resources_per_worker={resources}, placement_strategy={c.placement_strategy!r})"
    )


def sea_extras_text(config: Config) -> list[str]:
    """The plan's lines on the extra attacks and the defences scored beside SEA (sea.extra_attacks, sea.defense)."""
    sea = config.sea
    lines = ["  extra attacks: none"]
    if sea.extra_attacks:
        where = ("also in SEA's worst case (sea.extra_in_worst)" if sea.extra_in_worst
                 else "scored apart, not in SEA's worst case")
        lines = [f"  extra attacks: {', '.join(sea.extra_attacks)} at every eps on the SEA images, logged as "
                 f"extra_{{attack}}_*; {where}"]
    attacks = "SEA's ensemble" + (" and the extra attacks" if sea.extra_attacks else "")
    for defense in sea.defense:
        how = ("attack points found on the bare model (non-adaptive)" if defense == "nlm"
               else f"attacks through the filter with BPDA (SEA: {sea.defense_iterations or sea.iterations} "
                    "iterations)")
        lines.append(f"  defence {defense}: the model behind non-local-means denoising scored clean and under "
                     f"{attacks}, {how}; logged as defense_{defense}_*")
    if not sea.defense:
        lines.append("  defence: none")
    return lines


def pretrain_text(plan: Plan) -> list[str]:
    """What the pretrain stage will do: the backbones the trials load, cached or to be trained."""
    lines, training = [], False
    for uri, config in needed(plan.trial_configs).items():
        pre = config.pretrain
        state = "cached" if is_cached(uri) else "to train"
        training = training or state == "to train"
        how = f"{pre.attack_steps}-step PGD {pre.eps:g}/255" if config.model.init == "pir" else "clean"
        lines.append(f"Pretrain ({state}): {uri} ({how}, {pre.steps} steps of {pre.batch_size} generated "
                     f"{pre.image_size}px objects of {pre.classes} classes) for init {config.model.init}")
    if training:
        lines.append("Pretrain runs beside the sweep: a trial starts training once its init's backbone is written")
    return lines


def format_plan(plan: Plan) -> str:
    """Human-readable plan: what --dry-run prints (redacted: it is a log line)."""
    cfg = plan.config
    lines = [f"Sweep {cfg.sweep.name!r}: {len(plan.trials)} trial(s), {cfg.sweep.search} search"
             + (f", ASHA early stopping on the selection images' robust proxy (grace {cfg.sweep.asha_grace_epochs} "
                f"epoch(s), reduction factor {cfg.sweep.asha_reduction_factor})"
                if cfg.sweep.scheduler == "asha" else ", FIFO (every trial to its end)")
             + f", at most {cfg.sweep.max_concurrent_trials} at once"]
    for i, (name, tc) in enumerate(zip(plan.names, plan.trial_configs, strict=True)):
        a = tc.train.attack
        scored = plan.runs_of(name)
        lines.append(
            f"  trial {i}: {name}  -> epochs={tc.train.epochs} attack.steps={a.steps} "
            f"attack.eps={a.eps:g}/255 step_size={a.step_size:g}/255 init={tc.model.init} seed={tc.train.seed}"
            + (f"; scored at epochs {', '.join(str(r.epoch) for r in scored)} ({', '.join(r.name for r in scored)})"
               if scored else "")
        )
    lines.append(epochs_text(plan))
    m = cfg.model
    lines += [
        f"Model: {m.decoder} on {m.backbone} (stem {m.stem}), init {m.init}"
        + (f" from {m.backbone_weights}" if m.backbone_weights else ""),
        *pretrain_text(plan),
        f"Data: {cfg.data.dataset} ({cfg.data.num_classes} classes) train split {cfg.data.train_split!r}, "
        f"val {cfg.data.val_dataset}/{cfg.data.val_split!r}; crop {cfg.data.crop_size}, val size {cfg.data.val_size}",
        "Resources per trial:",
        f"  {scaling_text(cfg)}",
        f"  global batch {cfg.train.batch_size} = {cfg.cluster.workers} worker(s) "
        f"x per-worker batch {cfg.per_worker_batch}",
        f"  max_failures {cfg.cluster.max_failures}",
        "Storage:",
        f"  shards: {cfg.data.shards.rstrip('/')}/train, {cfg.data.shards.rstrip('/')}/val",
        f"  Ray results and checkpoints: {cfg.sweep.storage_path.rstrip('/')}/{cfg.sweep.name}",
        f"Tracking URI: {plan.tracking_uri} (experiment {cfg.tracking.experiment!r})",
        f"SEA: eps {', '.join(f'{e:g}' for e in cfg.sea.eps)} (/255), {cfg.sea.iterations} iterations, "
        f"losses {', '.join(cfg.sea.losses)} (tracking {cfg.sea.track}), images {cfg.sea.images or 'all val'}, "
        f"{cfg.sea.min_actors}-{cfg.sea.max_actors} actors "
        f"x ({cfg.sea.cpus_per_actor:g} CPU, {cfg.sea.gpus_per_actor:g} GPU), "
        + ("each trial scored as it finishes, beside the others' training (sea.overlap)" if cfg.sea.overlap
           else "scored after the last trial (sea.overlap: false)"),
        *sea_extras_text(cfg),
        f"Scores: eval.protocol {cfg.eval.protocol} ({PROTOCOLS[cfg.eval.protocol]})",
    ]
    lines += [f"warning: {w}" for w in plan.warnings]
    return redact("\n".join(lines))
