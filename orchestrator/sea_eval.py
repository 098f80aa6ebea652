"""SEA as an evaluation job of its own: any model (published PIR-AT weights or this project's checkpoint), the val
images split into blocks scored by a pool of Ray actors, each finished block written to storage at once, so that
`--resume` scores only what is missing; numbers, per-image rows and plots go to MLflow.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from data import shards
from orchestrator.config import Config, ConfigError, to_dict, with_values
from orchestrator.scores import SEA_GROUP, metric_key
from orchestrator.sea_pool import combine, eval_view, image_key, score_batch
from trainables.units import eps_label

BLOCKS = "blocks"
JOB_FILE = "job.json"
RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})/?$")
# What a finished block must have been scored with to count on --resume.
SCORING_KEYS = ("sea.eps", "sea.iterations", "sea.losses", "sea.track", "sea.seed", "sea.images",
                "eval.block_images", "eval.protocol", "model.weights")


class EvalInputError(ValueError):
    """Bad input to the evaluation job (weights, layout, class count): one line, exit code 2."""


class EvalWeightsNotFound(EvalInputError):
    """model.weights points at nothing (a PLACEHOLDER left in a recipe, say)."""


@dataclass
class EvalPlan:
    """What the job will do: the resolved config, the model's label, the blocks and where they go."""

    config: Config
    label: str
    output: str
    images: int
    blocks: list[list[str]]
    actors: int
    layout: str
    input_norm: str

    @property
    def attack_iterations(self) -> int:
        """APGD iterations over the whole job: images x losses x iterations x ε."""
        sea = self.config.sea
        return self.images * len(sea.losses) * sea.iterations * len(sea.eps)


def resolve_weights(config: Config, tracking_uri: str) -> str:
    """The checkpoint file behind model.weights: a file or URI as it is, a checkpoint folder's state.pt, or the
    `checkpoint_uri` tag of an MLflow run (a trial of this project) given as `runs:/<id>` or a bare run id."""
    from trainables.report_keys import CHECKPOINT_FILE

    weights = config.model.weights
    if not weights:
        raise EvalInputError("model.weights is not set: give a checkpoint path, URI or MLflow run id to score")
    match = RUN_ID.match(weights)
    if match and not os.path.exists(weights):
        from mlflow.tracking import MlflowClient

        try:
            run = MlflowClient(tracking_uri).get_run(match.group(1))
        except Exception as exc:
            raise EvalInputError(f"model.weights = {weights}: no MLflow run with that id at the tracking URI "
                                 f"({type(exc).__name__})") from None
        tag = run.data.tags.get("checkpoint_uri")
        if not tag:
            raise EvalInputError(f"model.weights = {weights}: that MLflow run has no checkpoint_uri tag "
                                 "(not a scored trial of this project)")
        weights = tag
    local = weights[len("file://"):] if weights.startswith("file://") else weights
    if "://" not in local and os.path.isdir(local):
        return os.path.join(local, CHECKPOINT_FILE)
    return weights


def _architecture(config: Config, weights: str) -> tuple[Config, str, str]:
    """The config with the model section a project checkpoint records (decoder, backbone, ...) and weights set;
    the checkpoint's layout and input normalisation. EvalInputError for what cannot be loaded."""
    from trainables.models import ModelWeightsError, ModelWeightsNotFound, inspect_checkpoint, read_model_checkpoint

    try:
        info = inspect_checkpoint(read_model_checkpoint(weights), weights)
    except ModelWeightsNotFound as exc:
        raise EvalWeightsNotFound(str(exc)) from None
    except ModelWeightsError as exc:
        raise EvalInputError(str(exc)) from None
    values: dict[str, Any] = {"model.weights": weights, "model.backbone_weights": None}
    if info["model_config"]:
        for key in ("decoder", "backbone", "stem", "decoder_width"):
            if key in info["model_config"]:
                values[f"model.{key}"] = info["model_config"][key]
    if info["num_classes"] is not None and info["num_classes"] != config.data.num_classes:
        raise EvalInputError(
            f"model.weights {weights}: the checkpoint has {info['num_classes']} classes, data.dataset "
            f"{config.data.val_dataset} has {config.data.num_classes}; score it on the dataset it was trained on"
        )
    return with_values(config, values), info["layout"], info["input_norm"] or config.model.input_norm


def check_model(config: Config) -> None:
    """Build the model with its weights once on the driver, so a layout mismatch is one line before Ray starts."""
    from trainables.models import ModelWeightsError, build_from_config

    try:
        build_from_config(config.model, config.data.num_classes)
    except (ModelWeightsError, ValueError) as exc:
        raise EvalInputError(str(exc)) from None


def output_uri(config: Config) -> str:
    """Where blocks and artifacts go: eval.output, else {sweep.storage_path}/sea_eval/{eval.name}."""
    if config.eval.output:
        return config.eval.output.rstrip("/")
    return f"{config.sweep.storage_path.rstrip('/')}/sea_eval/{config.eval.name}"


def _val_tables(config: Config):
    """The val shards' tables in manifest order (each checked against its sha256), cut at sea.images rows.

    Read on the driver, not with Ray Data: the actors may hold every CPU of a small cluster, and a Ray Data read
    would then wait for them while they wait for its rows."""
    from orchestrator.train import shard_uris

    val = shard_uris(config)[2]
    remaining = config.sea.images
    for shard in shards.read_manifest(val)["shards"]:
        table = shards.read_shard(shards.join(val, shard["file"]), shard["sha256"], shard["rows"])
        if remaining is not None:
            table = table.slice(0, remaining)
            remaining -= table.num_rows
        yield table
        if remaining == 0:
            return


def image_ids(config: Config) -> list[str]:
    """The val image ids scored, sorted (the order of the blocks and of SEA's greedy mIoU walk)."""
    return sorted(str(i) for table in _val_tables(config) for i in table.column("id").to_pylist())


def build_plan(config: Config, tracking_uri: str, *, ids: list[str] | None = None, dry_run: bool = False) -> EvalPlan:
    """Resolve the weights, check the model, and split the images into blocks (ids: known image ids). A dry run
    reports weights that are not found (a recipe's PLACEHOLDER) in the plan instead of failing."""
    weights = resolve_weights(config, tracking_uri)
    try:
        config, layout, input_norm = _architecture(config, weights)
        check_model(config)
    except EvalWeightsNotFound:
        if not dry_run:
            raise
        config = with_values(config, {"model.weights": weights, "model.backbone_weights": None})
        layout, input_norm = "NOT FOUND: edit the PLACEHOLDER", config.model.input_norm
    m = config.model
    label = config.eval.label or f"{m.decoder}-{m.backbone}-{m.stem}"
    ids = ids or []
    size = config.eval.block_images
    blocks = [ids[i:i + size] for i in range(0, len(ids), size)]
    images = len(ids) or planned_images(config)
    return EvalPlan(config, label, output_uri(config), images, blocks, config.sea.max_actors, layout, input_norm)


def planned_images(config: Config) -> int:
    """Images the job will score, from the val shards' manifest when they exist (0: not known yet)."""
    from orchestrator.train import shard_uris

    val = shard_uris(config)[2]
    try:
        total = int(shards.read_manifest(val)["total_rows"]) if shards.exists(shards.join(val, shards.MANIFEST)) else 0
    except Exception:  # an unreadable manifest is the data stage's to report, not the plan's
        total = 0
    if not total:
        return 0
    return min(total, config.sea.images) if config.sea.images else total


def format_plan(plan: EvalPlan) -> str:
    """The --dry-run text: model, images, blocks, actors and the attack iterations the job will run."""
    c = plan.config
    sea = c.sea
    images = plan.images or (f"up to {sea.images}" if sea.images else "all val images (shards not prepared yet)")
    return "\n".join([
        f"SEA evaluation {c.eval.name!r}: model {plan.label} ({c.model.decoder}, {c.model.backbone}, stem "
        f"{c.model.stem}, {c.data.num_classes} classes)",
        f"  weights: {c.model.weights} (layout {plan.layout}, input normalisation {plan.input_norm})",
        f"  data: {c.data.val_dataset} {c.data.val_split}, images: {images}, protocol {c.eval.protocol}",
        f"  blocks: {math.ceil(plan.images / c.eval.block_images) if plan.images else '?'} of "
        f"{c.eval.block_images} images -> {plan.output}/{BLOCKS}",
        f"  actors: {plan.actors} ({sea.cpus_per_actor:g} CPU, {sea.gpus_per_actor:g} GPU each)",
        f"  SEA: eps {', '.join(eps_label(e) + '/255' for e in sea.eps)}; losses {', '.join(sea.losses)}; "
        f"{sea.iterations} iterations each"
        + (f"; {plan.attack_iterations:,} APGD iterations in all" if plan.images else ""),
    ])


# ---------------------------------------------------------------------------------------------
# Blocks: each a file of per-image counts (tensors and plain values only, read back with weights_only)


def block_uri(output: str, index: int) -> str:
    return f"{output}/{BLOCKS}/block-{index:05d}.pt"


def _result_dict(result) -> dict[str, Any]:
    return {f.name: getattr(result, f.name) for f in fields(result) if f.name != "adv"}


def write_block(uri: str, block: dict[str, Any]) -> None:
    """One block's results, written whole (a temporary name, then the final one on local storage)."""
    buffer = io.BytesIO()
    torch.save(block, buffer)
    if shards.is_local(uri):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        with open(uri + ".tmp", "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(uri + ".tmp", uri)
    else:
        shards.write_bytes(uri, buffer.getvalue())


def read_block(uri: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(shards.read_bytes(uri)), map_location="cpu", weights_only=True)


class BlockScorer:
    """A Ray actor: builds the model from its weights once, scores whole blocks with SEA and writes each one."""

    def __init__(self, config: dict[str, Any], num_classes: int, threads: int, output: str,
                 example_ids: tuple[str, ...]):
        from orchestrator.config import ModelConfig
        from trainables.models import build_from_config

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_from_config(ModelConfig.model_validate(config["model"]), num_classes)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.sea = config["sea"]
        self.num_classes = num_classes
        self.output = output
        self.example_ids = set(example_ids)

    def ready(self) -> int:
        """The actor's process id, once its model is built (the job times scoring from here)."""
        return os.getpid()

    def score(self, index: int, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from data.pipeline import val_collate

        started = time.time()
        tensors = val_collate(batch)
        ids = [str(i) for i in tensors["id"]]
        wanted = [n for n, i in enumerate(ids) if i in self.example_ids]
        by_eps, examples = {}, None
        results = score_batch(self.model, tensors, self.sea, self.num_classes, device=self.device,
                              return_adv=bool(wanted))
        for eps, groups in zip(self.sea["eps"], results, strict=True):
            result = groups[SEA_GROUP]
            if result.adv is not None and wanted:
                examples = self._examples(result, tensors, wanted)
            by_eps[float(eps)] = _result_dict(result)
        block = {"index": index, "ids": ids, "by_eps": by_eps, "examples": examples,
                 "seconds": time.time() - started, "pid": os.getpid()}
        write_block(block_uri(self.output, index), block)
        return {"index": index, "images": len(ids), "seconds": block["seconds"]}

    def _examples(self, result, tensors, wanted: list[int]) -> dict[str, Any]:
        index = torch.tensor(wanted)
        x = tensors["image"][index].to(self.device)
        accuracy = torch.stack([result.correct[name][index] for name in result.losses])
        worst = accuracy.argmin(0)
        adv = torch.stack([result.adv[result.losses[int(w)]][i] for w, i in zip(worst, wanted, strict=True)])
        with torch.no_grad():
            clean_pred = self.model(x).argmax(1).cpu()
            adv_pred = self.model(adv.to(self.device)).argmax(1).cpu()
        return {"ids": [str(tensors["id"][n]) for n in wanted], "image": x.cpu(), "label": tensors["label"][index],
                "clean_pred": clean_pred, "adv_pred": adv_pred, "eps": float(max(self.sea["eps"]))}


def _block_rows(config: Config, blocks: list[list[str]], todo: set[int]):
    """(block index, numpy batch as val_collate takes it) for each block in `todo`, as soon as all its rows have
    been decoded (in eval.protocol's view)."""
    from data.pipeline import _val_rows

    where = {image_id: b for b, ids in enumerate(blocks) if b in todo for image_id in ids}
    pending: dict[int, list[dict[str, Any]]] = {b: [] for b in todo}
    for table in _val_tables(config):
        for batch in _val_rows(table, **eval_view(config)):
            for n, image_id in enumerate(batch["id"]):
                b = where.get(str(image_id))
                if b is None:
                    continue
                pending[b].append({k: v[n] for k, v in batch.items()})
                if len(pending[b]) == len(blocks[b]):
                    rows = sorted(pending.pop(b), key=lambda r: str(r["id"]))
                    yield b, {k: _stack([r[k] for r in rows]) for k in rows[0]}


def _stack(values: list[Any]) -> np.ndarray:
    if isinstance(values[0], np.ndarray) and values[0].dtype != object and all(
            v.shape == values[0].shape for v in values):
        return np.stack(values)
    out = np.empty(len(values), dtype=object)
    for n, value in enumerate(values):
        out[n] = value
    return out


def _job_record(config: Config) -> dict[str, Any]:
    from orchestrator.config import flatten

    flat = flatten(to_dict(config))
    return {key: flat.get(key) for key in SCORING_KEYS}


def score_blocks(plan: EvalPlan, *, resume: bool, say=print) -> dict[str, int]:
    """Score every block not yet in storage with a pool of actors; returns {"scored": n, "skipped": m}."""
    import ray
    from ray.util import ActorPool

    config = plan.config
    record = _job_record(config)
    job_uri = f"{plan.output}/{JOB_FILE}"
    present = {b for b in range(len(plan.blocks)) if shards.exists(block_uri(plan.output, b))}
    if resume and shards.exists(job_uri) and json.loads(shards.read_bytes(job_uri)) != record:
        raise EvalInputError(f"--resume: {plan.output} was scored with other settings "
                             f"({json.loads(shards.read_bytes(job_uri))}); run without --resume to start anew")
    if not resume:
        for b in present:
            shards.delete(block_uri(plan.output, b))
        present = set()
    shards.write_bytes(job_uri, json.dumps(record).encode())
    todo = set(range(len(plan.blocks))) - present
    if present:
        say(f"[sea-eval] --resume: {len(present)} of {len(plan.blocks)} blocks already scored, {len(todo)} to go")
    if not todo:
        return {"scored": 0, "skipped": len(present)}
    sea = config.sea
    examples = tuple(config.eval.examples) or tuple(i for ids in plan.blocks for i in ids)[:4]
    actor = ray.remote(num_cpus=sea.cpus_per_actor, num_gpus=sea.gpus_per_actor or None,
                       max_restarts=3, max_task_retries=3)(BlockScorer)
    actors = [actor.remote(to_dict(config), config.data.num_classes, max(1, int(sea.cpus_per_actor)), plan.output,
                           examples) for _ in range(min(plan.actors, len(todo)))]
    ray.get([a.ready.remote() for a in actors])  # images/s and the ETA count scoring, not model building
    pool = ActorPool(actors)
    started, done, scored = time.time(), sum(len(plan.blocks[b]) for b in present), 0
    total = plan.images
    submitted = 0

    def report(result):
        nonlocal done, scored
        done += result["images"]
        scored += 1
        elapsed = time.time() - started
        rate = (done - sum(len(plan.blocks[b]) for b in present)) / elapsed if elapsed else 0.0
        eta = (total - done) / rate if rate else math.inf
        per_eps = ", ".join(f"eps {eps_label(e)}: {done}/{total}" for e in sea.eps)
        say(f"[sea-eval {plan.label}] images {per_eps}; {rate:.2f} images/s; ETA {eta:.0f}s")

    for b, batch in _block_rows(config, plan.blocks, todo):
        if submitted >= len(actors):
            report(pool.get_next_unordered())
        pool.submit(lambda a, v: a.score.remote(*v), (b, batch))
        submitted += 1
    while pool.has_next():
        report(pool.get_next_unordered())
    return {"scored": scored, "skipped": len(present)}


def collect(plan: EvalPlan) -> tuple[dict[float, dict[str, dict[str, float]]], list[dict[str, Any]], dict | None]:
    """Aggregate the stored blocks: (scores by ε as `aggregate` gives them, per-image rows, examples)."""
    from trainables.attacks.sea import SeaResult

    results: dict[tuple[float, str], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    parts = []
    for b in range(len(plan.blocks)):
        block = read_block(block_uri(plan.output, b))
        if block["ids"] != plan.blocks[b]:
            raise RuntimeError(f"block {b} in {plan.output} holds other images than planned; run without --resume")
        for eps, fields_ in block["by_eps"].items():
            result = SeaResult(**fields_)
            results[(float(eps), ",".join(block["ids"]))] = {SEA_GROUP: result}
            rows.extend(per_image_rows(result, block["ids"], float(eps)))
        if block["examples"] is not None:
            parts.append(block["examples"])
    by_eps = combine(results, plan.config.data.num_classes)[SEA_GROUP]
    examples = None
    if parts:
        examples = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0] if k != "eps"}
        examples["eps"] = parts[0]["eps"]
    return by_eps, rows, examples


def per_image_rows(result, ids: list[str], eps: float) -> list[dict[str, Any]]:
    """One row per image: ε, pixel accuracy clean / per loss / worst, and the per-class intersections and unions
    (and labelled areas) from which every aggregate can be recomputed."""
    names = ("clean", *result.losses)
    rows = []
    for n, image_id in enumerate(ids):
        labelled = int(result.labelled[n])
        row: dict[str, Any] = {"image_id": image_id, "image_key": image_key(image_id), "eps": eps,
                               "labelled": labelled, "area": result.area[n].tolist()}
        for name in names:
            correct = int(result.correct[name][n])
            row[f"acc_{name}"] = correct / labelled if labelled else float("nan")
            row[f"correct_{name}"] = correct
            row[f"inter_{name}"] = result.inter[name][n].tolist()
            row[f"union_{name}"] = result.union[name][n].tolist()
        row["acc_worst"] = min(row[f"acc_{name}"] for name in names)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting


def eval_metrics(by_eps: dict[float, dict[str, dict[str, float]]]) -> dict[str, float]:
    """clean_miou, clean_aacc, sea_{miou,aacc}_eps{E} (the worst case) and {loss}_{miou,aacc}_eps{E}."""
    first = next(iter(by_eps.values()))
    out = {f"clean_{k}": float(v) for k, v in first["clean"].items()}
    for eps, scores in by_eps.items():
        label = eps_label(eps)
        for name, values in scores.items():
            if name == "clean":
                continue
            prefix = "sea" if name == "worst" else metric_key(name)
            out.update({f"{prefix}_{k}_eps{label}": float(v) for k, v in values.items()})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def summary_table(label: str, dataset: str, metrics: dict[str, float], eps: list[float]) -> str:
    """The seed README's table: Model | Dataset | Clean | Adv.(E/255) ... (mIoU in %)."""
    head = "| Model | Dataset | Clean | " + " | ".join(f"Adv.({eps_label(e)}/255)" for e in eps) + " |"
    cells = [f"{100 * metrics['clean_miou']:.1f}%"] + [
        f"{100 * metrics[f'sea_miou_eps{eps_label(e)}']:.1f}%" for e in eps]
    return "\n".join([head, "|" + "---|" * (3 + len(eps)), f"| {label} | {dataset} | " + " | ".join(cells) + " |"])


def class_table(config: Config, by_eps: dict[float, dict[str, dict[str, float]]], rows: list[dict]) -> str:
    """Per-class IoU (clean and SEA's per-loss single attacks) as CSV with the class names."""
    from data.classes import class_names

    names = class_names(config.data.val_dataset, config.data.reduce_zero_label)
    columns = [k[len("inter_"):] for k in rows[0] if k.startswith("inter_")]
    lines = ["class_index,class_name," + ",".join(f"iou_{c}_eps{eps_label(e)}" for e in by_eps for c in columns)]
    sums: dict[tuple[float, str], tuple[np.ndarray, np.ndarray]] = {}
    for e in by_eps:
        for c in columns:
            inter = np.sum([r[f"inter_{c}"] for r in rows if r["eps"] == e], axis=0)
            union = np.sum([r[f"union_{c}"] for r in rows if r["eps"] == e], axis=0)
            sums[e, c] = inter, union
    for k, name in enumerate(names):
        cells = []
        for e in by_eps:
            for c in columns:
                inter, union = sums[e, c]
                cells.append(f"{inter[k] / union[k]:.4f}" if union[k] else "")
        lines.append(f"{k},{name}," + ",".join(cells))
    return "\n".join(lines) + "\n"


def log_to_mlflow(plan: EvalPlan, tracking_uri: str, by_eps, rows, examples, seconds: float) -> str:
    """A parent run (eval.name) with one child run per model: metrics and the artifacts; returns the child's id."""
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from orchestrator import plots
    from orchestrator.tracking import config_params

    config = plan.config
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.tracking.experiment)
    parents = client.search_runs([experiment_id], f"tags.sea_eval = 'parent' and tags.mlflow.runName = "
                                                  f"'{config.eval.name}'")
    parent = parents[0].info.run_id if parents else client.create_run(
        experiment_id, run_name=config.eval.name, tags={"sea_eval": "parent"}).info.run_id
    child = client.create_run(experiment_id, run_name=plan.label,
                              tags={"mlflow.parentRunId": parent, "sea_eval": "model",
                                    "weights_layout": plan.layout}).info.run_id
    for key, value in config_params(config).items():
        client.log_param(child, key, value)
    metrics = eval_metrics(by_eps)
    metrics.update({"images": float(plan.images), "eval_hours": seconds / 3600.0})
    for key, value in metrics.items():
        client.log_metric(child, key, value)
    table = summary_table(plan.label, config.data.val_dataset, metrics, list(config.sea.eps))
    with tempfile.TemporaryDirectory() as folder:
        files = {"summary.md": table + "\n", "per_class_iou.csv": class_table(config, by_eps, rows)}
        for name, text in files.items():
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(text)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "per_image.parquet"))
        plots.save_png(plots.sea_curve(by_eps, metrics["clean_miou"], title=plan.label),
                       os.path.join(folder, "sea_vs_eps.png"))
        if examples is not None:
            grid = plots.example_grid(examples["image"], examples["label"], examples["clean_pred"],
                                      examples["adv_pred"], eps=examples["eps"])
            plots.save_png(grid, os.path.join(folder, "adversarial_examples.png"))
        for name in sorted(os.listdir(folder)):
            client.log_artifact(child, os.path.join(folder, name))
    client.set_terminated(child)
    client.set_terminated(parent)
    return child


def run(config: Config, tracking_uri: str, *, resume: bool = False, say=None) -> tuple[EvalPlan, dict[str, Any]]:
    """The whole job: check the model, data, Ray, blocks, aggregate, MLflow; returns the plan and {metrics, run_id,
    scored, skipped}. Bad weights fail (EvalInputError) before any data is read or Ray is started."""
    from orchestrator.cluster import connect
    from orchestrator.data_stage import prepare_data

    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    plan = build_plan(config, tracking_uri)
    prepare_data(plan.config)
    say(connect(plan.config))
    ids = image_ids(plan.config)
    size = plan.config.eval.block_images
    plan.images, plan.blocks = len(ids), [ids[i:i + size] for i in range(0, len(ids), size)]
    print(format_plan(plan), flush=True)
    started = time.time()
    counts = score_blocks(plan, resume=resume, say=say)
    say(f"[sea-eval {plan.label}] blocks scored now: {counts['scored']}, already stored: {counts['skipped']}")
    by_eps, rows, examples = collect(plan)
    run_id = log_to_mlflow(plan, tracking_uri, by_eps, rows, examples, time.time() - started)
    metrics = eval_metrics(by_eps)
    print(summary_table(plan.label, plan.config.data.val_dataset, metrics, list(plan.config.sea.eps)), flush=True)
    return plan, {"metrics": metrics, "run_id": run_id, **counts}


__all__ = ["ConfigError", "EvalInputError", "EvalPlan", "EvalWeightsNotFound", "build_plan", "format_plan", "run"]
