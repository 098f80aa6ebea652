"""SEA scoring of a checkpoint by an autoscaling pool of Ray actors (Ray Data `map_batches` + ActorPoolStrategy).

Each actor loads the checkpoint once and runs `trainables.attacks.sea` for every ε on its batches (with the
extra attacks and the defended model when `sea.extra_attacks` and `sea.defense` ask for them); the
per-image results come back to the driver, which combines them with `aggregate` in image-id order (the val
list's order for VOC and ADE20K, as the paper's greedy mIoU walks it). A dead actor is restarted by Ray Data
and its batch retried; results are keyed by (ε, image id) so each image counts once. The val images are
scored as `eval.protocol` says (`eval_view`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from data.classes import VOC_CLASSES
from data.pipeline import val_collate, val_dataset
from orchestrator.config import Config, SeaConfig, to_dict
from orchestrator.scores import EXTRA_GROUP, SEA_GROUP, score_group
from trainables.units import eps_label


@dataclass
class SeaOutcome:
    """Aggregated SEA numbers per ε (1/255 units) plus a few adversarial examples for plotting."""

    by_eps: dict[float, dict[str, dict[str, float]]]
    images: int
    seconds: float
    examples: dict[str, np.ndarray] | None = None
    scored_by: set[int] = field(default_factory=set)  # process ids of the actors whose results were used
    # the scores beside SEA's by score group (orchestrator.tracking.score_group), each as by_eps: extra, defense_*
    groups: dict[str, dict[float, dict[str, dict[str, float]]]] = field(default_factory=dict)


def image_key(image_id: str) -> int:
    """A stable 60-bit integer for an image id (a result's ids; `in_id_order` renumbers them by the ids)."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:15], 16)


def eval_view(config: Config) -> dict[str, Any]:
    """val_dataset's view of the val images under eval.protocol: `reference` crops data.crop_size and scores
    VOC's borders as background; `full` fits data.val_size and keeps the original labels for scoring."""
    if config.eval.protocol == "reference":
        background = VOC_CLASSES.index("background") if config.data.val_dataset == "voc" else None
        return {"size": config.data.crop_size, "protocol": "reference", "ignore_as": background}
    return {"size": config.data.val_size, "protocol": "full", "ignore_as": None}


def score_batch(model, tensors: dict[str, Any], sea_settings: dict[str, Any], num_classes: int, *, device,
                return_adv: bool = False) -> list[dict[str, Any]]:
    """Results of a val_collate batch at each ε of sea_settings (in its order), one `SeaResult` per score group
    (`score_group`): "sea" (SEA's ensemble), "extra" (sea_settings' extra_attacks, scored apart) and per
    defence d of its `defense` list "defense_{d}_sea" and "defense_{d}_extra". With extra_in_worst the extra
    attacks also join each SEA group, so its worst case covers them; SEA through nlm-bpda runs
    defense_iterations when set. Scored as the rows say: at the original label sizes when the batch carries
    them (eval.protocol full), else against its labels. return_adv keeps the "sea" group's attack points at
    the largest ε (for the example images)."""
    from trainables.attacks import ScoreAt, sea
    from trainables.attacks.baselines import baselines, merge_results, score_points
    from trainables.defense import defended_models
    from trainables.units import to_unit

    x, y = tensors["image"].to(device), tensors["label"].to(device)
    score_at = None
    if "score_label" in tensors:
        score_at = ScoreAt(tensors["score_label"], tensors["score_size"], tensors["content"])
    keys = [image_key(i) for i in tensors["id"]]
    extras = tuple(sea_settings.get("extra_attacks") or ())
    defenses = tuple(sea_settings.get("defense") or ())
    in_worst = bool(sea_settings.get("extra_in_worst", False))
    if in_worst and not extras:
        raise ValueError("score_batch: extra_in_worst = true needs extra_attacks (none given)")
    out = []
    for eps in sea_settings["eps"]:
        examples = return_adv and eps == max(sea_settings["eps"])
        keep = examples or "nlm" in defenses  # the non-adaptive defence scores the bare model's points again
        common = {"eps": to_unit(eps), "num_classes": num_classes, "ids": keys, "score_at": score_at}
        groups: dict[str, Any] = {}
        for defense in (None, *defenses):
            sea_group, extra_group = score_group(SEA_GROUP, defense), score_group(EXTRA_GROUP, defense)
            if defense == "nlm":  # the bare model's attack points (computed above), scored through the filter
                defended = defended_models(model, defense)[1]
                groups[sea_group] = score_points(defended, x, y, groups[SEA_GROUP].adv, defense=defense, **common)
                if extras:
                    groups[extra_group] = score_points(defended, x, y, groups[EXTRA_GROUP].adv, defense=defense,
                                                       **common)
                continue
            iterations = sea_settings["iterations"] if defense is None else (
                sea_settings.get("defense_iterations") or sea_settings["iterations"])
            groups[sea_group] = sea(model, x, y, n_iter=iterations,
                                    losses=tuple(sea_settings["losses"]), seed=sea_settings["seed"],
                                    track=sea_settings["track"], return_adv=keep and defense is None,
                                    defense=defense, **common)
            if extras:
                groups[extra_group] = baselines(model, x, y, attacks=extras, defense=defense,
                                                return_adv=keep and defense is None, **common)
        if in_worst:
            for defense in (None, *defenses):
                sea_group = score_group(SEA_GROUP, defense)
                groups[sea_group] = merge_results(groups[sea_group], groups[score_group(EXTRA_GROUP, defense)])
        for group, result in groups.items():
            if not (examples and group == SEA_GROUP):
                result.adv = None
        out.append(groups)
    return out


# The lowest CPU priority: Ray starts every worker at nice 15 (raylet's worker_niceness), so only 16-19 are lower.
BACKGROUND_NICE = 19
# batches queued on one actor of a growing pool (Ray Data's own default for actors that take one call at a time)
IN_FLIGHT = 2


class SeaScorer:
    """A pool actor: loads the checkpoint once (GPU when it has one) and scores batches for every ε. A
    `background` scorer (beside the sweep's training) runs at a lower CPU priority (nice BACKGROUND_NICE), so that
    trials and backbone pretraining keep their cores and scoring takes what they leave idle; numbers are the same."""

    def __init__(self, checkpoint_path: str, config: dict[str, Any], num_classes: int, threads: int,
                 example_ids: tuple[str, ...] = (), background: bool = False):
        import torch

        from orchestrator.config import ModelConfig
        from trainables.models import build_from_config
        from trainables.pir_at import load_model_state, read_state
        from trainables.report_keys import CHECKPOINT_FILE

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model_config = ModelConfig.model_validate(dict(config["model"], backbone_weights=None, init="random"))
        self.model = build_from_config(model_config, num_classes)
        from orchestrator.train import open_checkpoint

        with open_checkpoint(checkpoint_path).as_directory() as folder:
            load_model_state(self.model, read_state(os.path.join(folder, CHECKPOINT_FILE)), checkpoint_path)
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.sea = config["sea"]
        self.num_classes = num_classes
        self.example_ids = set(example_ids)
        self.background = background

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.background:  # per thread on Linux: the thread that runs the attacks (and the ones it starts)
            os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)
        tensors = val_collate(batch)
        x, y, ids = tensors["image"].to(self.device), tensors["label"].to(self.device), tensors["id"]
        wanted = [n for n, i in enumerate(ids) if i in self.example_ids]
        out: dict[str, list] = {"eps": [], "ids": [], "result": [], "examples": [], "pid": []}
        results = score_batch(self.model, tensors, self.sea, self.num_classes, device=self.device,
                              return_adv=bool(wanted))
        for eps, groups in zip(self.sea["eps"], results, strict=True):
            examples = None
            result = groups[SEA_GROUP]
            if result.adv is not None:
                examples = self._examples(result, x, y, ids, wanted)
            result.adv = None
            out["eps"].append(float(eps))
            out["ids"].append(",".join(ids))
            out["result"].append(pickle.dumps(groups))
            out["examples"].append(pickle.dumps(examples))
            out["pid"].append(os.getpid())
        return {k: np.asarray(v, dtype=object) for k, v in out.items()}

    def _examples(self, result, x, y, ids: list[str], wanted: list[int]) -> dict[str, np.ndarray]:
        """Image, label, clean and worst-attack predictions of the example images in this batch."""
        torch = self.torch
        index = torch.tensor(wanted)
        accuracy = torch.stack([result.correct[name][index] for name in result.losses])
        worst = accuracy.argmin(0)
        adv = torch.stack([result.adv[result.losses[int(w)]][i] for w, i in zip(worst, wanted, strict=True)])
        with torch.no_grad():
            clean_pred = self.model(x[index]).argmax(1).cpu()
            adv_pred = self.model(adv.to(self.device)).argmax(1).cpu()
        return {"id": np.asarray([str(ids[n]) for n in wanted]), "image": x[index].cpu().numpy(),
                "label": y[index].cpu().numpy(), "clean_pred": clean_pred.numpy(), "adv_pred": adv_pred.numpy()}


def in_id_order(results: dict[tuple[float, str], Any]) -> dict[tuple[float, str], Any]:
    """The results (keyed by ε and their comma-joined image ids) with ids renumbered by the sorted image ids,
    so `aggregate` walks the images in id order rather than in the order of their hashes."""
    import torch

    ids = sorted({i for _, joined in results for i in joined.split(",")})
    rank = {image_id: n for n, image_id in enumerate(ids)}
    return {(eps, joined): dataclasses.replace(r, ids=torch.tensor([rank[i] for i in joined.split(",")]))
            for (eps, joined), r in results.items()}


def combine(results: dict[tuple[float, str], dict[str, Any]], num_classes: int,
            extra_attacks: tuple[str, ...] = ()) -> dict[str, dict[float, dict[str, dict[str, float]]]]:
    """Scores per score group and ε (`aggregate`) of the batches' results (keyed by ε and comma-joined image ids),
    each group walked in image-id order. A SEA group that took the extra attacks into its worst case keeps that
    worst case but not their single scores, which its extra group holds."""
    from trainables.attacks import aggregate

    out: dict[str, dict[float, dict[str, dict[str, float]]]] = {}
    for group in sorted({g for groups in results.values() for g in groups}):
        in_order = in_id_order({key: groups[group] for key, groups in results.items()})
        drop = () if group.endswith(EXTRA_GROUP) else extra_attacks
        out[group] = {}
        for eps in sorted({e for e, _ in in_order}):
            scores = aggregate([r for (e, _), r in sorted(in_order.items()) if e == eps], num_classes)
            out[group][eps] = {name: v for name, v in scores.items() if name not in drop}
    return out


class ScoringCancelled(RuntimeError):
    """Scoring stopped on request (the job was interrupted) before every image was scored."""


def _room(config: Config) -> int:
    """How many scoring actors the cluster's CPUs (and GPUs) hold beside one read/decode task (a pool that took
    every CPU would leave its own images unread). The whole cluster's: the previous pool's actors may not have
    released theirs yet."""
    total, sea = ray.cluster_resources(), config.sea
    room = int((total.get("CPU", 0.0) - config.cluster.cpus_per_data_task) // sea.cpus_per_actor)
    if sea.gpus_per_actor:
        room = min(room, int(total.get("GPU", 0.0) // sea.gpus_per_actor))
    return room


def pool_strategy(sea: SeaConfig, batches: int, *, spread: bool, room: int) -> dict[str, int]:
    """ActorPoolStrategy arguments for scoring `batches` batches. Spread: a fixed pool of an actor per batch (at
    most sea.max_actors and `room`), one batch in flight each. Otherwise a pool from sea.min_actors that grows while
    batches queue, each actor holding up to IN_FLIGHT of them, and never larger than the batches can feed: an
    actor started once every batch is queued on the others would get none and only cost its start-up."""
    if spread:
        size = max(sea.min_actors, min(sea.max_actors, batches, room))
        return {"min_size": size, "max_size": size, "max_tasks_in_flight_per_actor": 1}
    fed = -(-batches // IN_FLIGHT)
    return {"min_size": sea.min_actors, "max_size": max(sea.min_actors, min(sea.max_actors, fed)),
            "max_tasks_in_flight_per_actor": IN_FLIGHT}


def score_checkpoint(config: Config, checkpoint_path: str, *, label: str = "", examples: int = 4,
                     stop: threading.Event | None = None, spread: bool = False) -> SeaOutcome:
    """Score one checkpoint with SEA (and the extra attacks and defences `sea` asks for) on the val shards for
    every `sea.eps`; prints progress per ε. A set `stop` ends the scoring after the batch in hand
    (ScoringCancelled), which releases the pool's actors. `spread` (nothing else needs the cluster, e.g. the
    sweep's last trial): a fixed pool of an actor per batch, up to sea.max_actors and what the cluster holds
    beside a read task, each taking one batch at a time; otherwise the pool starts at sea.min_actors, grows while
    batches queue (Ray Data's autoscaling, up to what the batches can feed: `pool_strategy`) and its actors run in
    the background (SeaScorer)."""
    sea = config.sea
    from orchestrator.train import shard_uris

    val_uri = shard_uris(config)[2]
    dataset = val_dataset(val_uri, **eval_view(config), limit=sea.images, block_rows=sea.batch_size,
                          num_cpus=config.cluster.cpus_per_data_task)
    total = dataset.count()
    pool = pool_strategy(sea, -(-total // sea.batch_size), spread=spread, room=_room(config) if spread else 0)
    example_ids = tuple(str(row["id"]) for row in dataset.select_columns(["id"]).take(examples))
    scored = dataset.map_batches(
        SeaScorer,
        fn_constructor_kwargs={
            "checkpoint_path": checkpoint_path, "config": to_dict(config),
            "num_classes": config.data.num_classes, "threads": int(sea.cpus_per_actor),
            "example_ids": example_ids, "background": not spread,
        },
        batch_size=sea.batch_size,
        compute=ray.data.ActorPoolStrategy(**pool),
        num_cpus=sea.cpus_per_actor,
        num_gpus=sea.gpus_per_actor or None,
    )
    started = time.time()
    results: dict[tuple[float, str], Any] = {}
    example_parts = []
    scored_by: set[int] = set()
    done = {float(e): 0 for e in sea.eps}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        if stop is not None and stop.is_set():
            raise ScoringCancelled(f"SEA scoring{(' of ' + label) if label else ''} cancelled")
        columns = (batch["eps"], batch["ids"], batch["result"], batch["examples"], batch["pid"])
        for eps, ids, blob, ex, pid in zip(*columns, strict=True):
            key = (float(eps), str(ids))
            if key in results:  # a retried batch: count it once
                continue
            results[key] = pickle.loads(blob)
            scored_by.add(int(pid))
            done[float(eps)] += len(results[key][SEA_GROUP])
            examples = pickle.loads(ex)
            if examples is not None:
                example_parts.append(examples)
        progress = ", ".join(f"eps {eps_label(e)}: {n}/{total}" for e, n in done.items())
        print(f"[sea{(' ' + label) if label else ''}] images scored {progress} "
              f"({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    for eps, count in done.items():
        if count != total:
            raise RuntimeError(f"SEA scored {count} of {total} images at eps {eps_label(eps)}/255")
    groups = combine(results, config.data.num_classes, tuple(sea.extra_attacks))
    by_eps = groups.pop(SEA_GROUP)
    joined = None
    if example_parts:
        joined = {k: np.concatenate([p[k] for p in example_parts]) for k in example_parts[0]}
        joined["eps"] = max(sea.eps)
    return SeaOutcome(by_eps, total, time.time() - started, joined, scored_by, groups)
