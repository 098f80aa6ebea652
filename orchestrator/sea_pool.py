"""SEA scoring of a checkpoint by an autoscaling pool of Ray actors (Ray Data `map_batches` + ActorPoolStrategy).

Each actor loads the checkpoint once and runs `trainables.attacks.sea` for every ε on its batches; the
per-image results come back to the driver, which combines them with `aggregate`. A dead actor is
restarted by Ray Data and its batch retried; results are keyed by (ε, image id) so each image counts once.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from data.pipeline import val_collate, val_dataset
from orchestrator.config import Config, to_dict
from trainables.units import eps_label


@dataclass
class SeaOutcome:
    """Aggregated SEA numbers per ε (1/255 units) plus a few adversarial examples for plotting."""

    by_eps: dict[float, dict[str, dict[str, float]]]
    images: int
    seconds: float
    examples: dict[str, np.ndarray] | None = None
    scored_by: set[int] = field(default_factory=set)  # process ids of the actors whose results were used


def image_key(image_id: str) -> int:
    """A stable 60-bit integer for an image id (SEA orders images by it, whichever actor scored them)."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:15], 16)


class SeaScorer:
    """A pool actor: loads the checkpoint once (GPU when it has one) and scores batches for every ε."""

    def __init__(self, checkpoint_path: str, config: dict[str, Any], num_classes: int, threads: int,
                 example_ids: tuple[str, ...] = ()):
        import torch

        from trainables.pir_at import CHECKPOINT_FILE, load_model_state, model_from_config, read_state

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model_config = dict(config, model=dict(config["model"], backbone_weights=None))
        self.model = model_from_config(model_config, num_classes)
        from orchestrator.train import open_checkpoint

        with open_checkpoint(checkpoint_path).as_directory() as folder:
            load_model_state(self.model, read_state(os.path.join(folder, CHECKPOINT_FILE)), checkpoint_path)
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.sea = config["sea"]
        self.num_classes = num_classes
        self.example_ids = set(example_ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from trainables.attacks import sea
        from trainables.units import to_unit

        tensors = val_collate(batch)
        x, y, ids = tensors["image"].to(self.device), tensors["label"].to(self.device), tensors["id"]
        keys = [image_key(i) for i in ids]
        wanted = [n for n, i in enumerate(ids) if i in self.example_ids]
        out: dict[str, list] = {"eps": [], "ids": [], "result": [], "examples": [], "pid": []}
        largest = max(self.sea["eps"])
        for eps in self.sea["eps"]:
            keep = bool(wanted) and eps == largest
            result = sea(self.model, x, y, eps=to_unit(eps), num_classes=self.num_classes,
                         n_iter=self.sea["iterations"], losses=tuple(self.sea["losses"]), ids=keys,
                         seed=self.sea["seed"], return_adv=keep, track=self.sea["track"])
            examples = None
            if keep:
                examples = self._examples(result, x, y, wanted)
            result.adv = None
            out["eps"].append(float(eps))
            out["ids"].append(",".join(ids))
            out["result"].append(pickle.dumps(result))
            out["examples"].append(pickle.dumps(examples))
            out["pid"].append(os.getpid())
        return {k: np.asarray(v, dtype=object) for k, v in out.items()}

    def _examples(self, result, x, y, wanted: list[int]) -> dict[str, np.ndarray]:
        """Image, label, clean and worst-attack predictions of the example images in this batch."""
        torch = self.torch
        index = torch.tensor(wanted)
        accuracy = torch.stack([result.correct[name][index] for name in result.losses])
        worst = accuracy.argmin(0)
        adv = torch.stack([result.adv[result.losses[int(w)]][i] for w, i in zip(worst, wanted, strict=True)])
        with torch.no_grad():
            clean_pred = self.model(x[index]).argmax(1).cpu()
            adv_pred = self.model(adv.to(self.device)).argmax(1).cpu()
        return {"id": np.asarray([str(v) for v in np.asarray(wanted)]), "image": x[index].cpu().numpy(),
                "label": y[index].cpu().numpy(), "clean_pred": clean_pred.numpy(), "adv_pred": adv_pred.numpy()}


def score_checkpoint(config: Config, checkpoint_path: str, *, label: str = "", examples: int = 4) -> SeaOutcome:
    """Score one checkpoint with SEA on the val shards for every `sea.eps`; prints progress per ε."""
    from trainables.attacks import aggregate

    sea = config.sea
    val_uri = f"{config.data.shards.rstrip('/')}/val"
    dataset = val_dataset(val_uri, size=config.data.val_size, limit=sea.images, block_rows=sea.batch_size)
    total = dataset.count()
    example_ids = tuple(str(row["id"]) for row in dataset.select_columns(["id"]).take(examples))
    scored = dataset.map_batches(
        SeaScorer,
        fn_constructor_kwargs={
            "checkpoint_path": checkpoint_path, "config": to_dict(config),
            "num_classes": config.data.num_classes, "threads": int(sea.cpus_per_actor),
            "example_ids": example_ids,
        },
        batch_size=sea.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=sea.min_actors, max_size=sea.max_actors),
        num_cpus=sea.cpus_per_actor,
        num_gpus=sea.gpus_per_actor or None,
    )
    started = time.time()
    results: dict[tuple[float, str], Any] = {}
    example_parts = []
    scored_by: set[int] = set()
    done = {float(e): 0 for e in sea.eps}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        columns = (batch["eps"], batch["ids"], batch["result"], batch["examples"], batch["pid"])
        for eps, ids, blob, ex, pid in zip(*columns, strict=True):
            key = (float(eps), str(ids))
            if key in results:  # a retried batch: count it once
                continue
            results[key] = pickle.loads(blob)
            scored_by.add(int(pid))
            done[float(eps)] += len(results[key])
            examples = pickle.loads(ex)
            if examples is not None:
                example_parts.append(examples)
        progress = ", ".join(f"eps {eps_label(e)}: {n}/{total}" for e, n in done.items())
        print(f"[sea{(' ' + label) if label else ''}] images scored {progress} "
              f"({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    by_eps = {}
    for eps, count in done.items():
        if count != total:
            raise RuntimeError(f"SEA scored {count} of {total} images at eps {eps_label(eps)}/255")
        by_eps[eps] = aggregate([r for (e, _), r in sorted(results.items()) if e == eps], config.data.num_classes)
    joined = None
    if example_parts:
        joined = {k: np.concatenate([p[k] for p in example_parts]) for k in example_parts[0]}
        joined["eps"] = max(sea.eps)
    return SeaOutcome(by_eps, total, time.time() - started, joined, scored_by)
