"""SEA scoring of a checkpoint by an autoscaling pool of Ray actors (Ray Data `map_batches` + ActorPoolStrategy).

Each actor loads the checkpoint once and runs `trainables.attacks.sea` for every ε on its batches; the
per-image results come back to the driver, which combines them with `aggregate`. A dead actor is
restarted by Ray Data and its batch retried; results are keyed by (ε, image id) so each image counts once.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from data.pipeline import val_dataset

from orchestrator.config import Config, to_dict
from trainables.units import eps_label


@dataclass
class SeaOutcome:
    """Aggregated SEA numbers per ε (1/255 units) plus a few adversarial examples for plotting."""

    by_eps: dict[float, dict[str, dict[str, float]]]
    images: int
    seconds: float
    examples: dict[str, np.ndarray] | None = None


class SeaScorer:
    """A pool actor: loads the checkpoint once (GPU when it has one) and scores batches for every ε."""

    def __init__(self, checkpoint_path: str, config: dict[str, Any], num_classes: int, threads: int,
                 examples: int = 0):
        import torch

        from trainables.pir_at import CHECKPOINT_FILE, build_from_config, load_model_state, read_state

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model_config = dict(config, model=dict(config["model"], backbone_weights=None, init="random"))
        self.model = build_from_config(model_config, num_classes)
        with ray.train.Checkpoint(checkpoint_path).as_directory() as folder:
            load_model_state(self.model, read_state(os.path.join(folder, CHECKPOINT_FILE)), checkpoint_path)
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.sea = config["sea"]
        self.num_classes = num_classes
        self.examples = examples

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from trainables.attacks import sea

        from trainables.units import to_unit

        torch = self.torch
        x = torch.as_tensor(np.ascontiguousarray(batch["image"]), device=self.device)
        y = torch.as_tensor(np.ascontiguousarray(batch["label"]), device=self.device)
        ids = [str(i) for i in batch["id"]]
        columns: dict[str, list] = {"id": [], "eps": [], "result": []}
        for eps in self.sea["eps"]:
            result = sea(self.model, x, y, eps=to_unit(eps), num_classes=self.num_classes,
                         n_iter=self.sea["iterations"], losses=tuple(self.sea["losses"]), ids=ids,
                         seed=self.sea["seed"])
            for index, image_id in enumerate(ids):
                columns["id"].append(image_id)
                columns["eps"].append(float(eps))
                columns["result"].append(result.image(index).to_bytes())
        return {k: np.asarray(v, dtype=object if k == "result" else None) for k, v in columns.items()}


def score_checkpoint(config: Config, checkpoint_path: str, *, label: str = "") -> SeaOutcome:
    """Score one checkpoint with SEA on the val shards for every `sea.eps`; prints progress per ε."""
    from trainables.attacks import aggregate
    from trainables.attacks.sea import SeaResult

    sea = config.sea
    val_uri = f"{config.data.shards.rstrip('/')}/val"
    dataset = val_dataset(val_uri, size=config.data.val_size, limit=sea.images)
    total = dataset.count()
    scored = dataset.map_batches(
        SeaScorer,
        fn_constructor_kwargs={
            "checkpoint_path": checkpoint_path, "config": to_dict(config),
            "num_classes": config.data.num_classes, "threads": int(sea.cpus_per_actor),
        },
        batch_size=sea.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=sea.min_actors, max_size=sea.max_actors),
        num_cpus=sea.cpus_per_actor,
        num_gpus=sea.gpus_per_actor or None,
    )
    started = time.time()
    results: dict[tuple[float, str], bytes] = {}
    done = {float(e): 0 for e in sea.eps}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for image_id, eps, blob in zip(batch["id"], batch["eps"], batch["result"], strict=True):
            key = (float(eps), str(image_id))
            if key not in results:
                results[key] = blob
                done[float(eps)] += 1
        progress = ", ".join(f"eps {eps_label(e)}: {n}/{total}" for e, n in done.items())
        print(f"[sea{(' ' + label) if label else ''}] images scored {progress} "
              f"({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    by_eps = {}
    for eps in done:
        if done[eps] != total:
            raise RuntimeError(f"SEA scored {done[eps]} of {total} images at eps {eps_label(eps)}/255")
        parts = [SeaResult.from_bytes(results[(eps, i)]) for (e, i) in sorted(results) if e == eps]
        by_eps[eps] = aggregate(parts, config.data.num_classes)
    return SeaOutcome(by_eps, total, time.time() - started)
