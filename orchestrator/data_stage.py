"""The job's data stage: generate the synthetic dataset when configured, then shard train, select and val once.

`select` holds `data.select_images` images of the training split, held out of `train` (disjoint by image id):
checkpoints are chosen on them, never on the val images that SEA scores."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from data import shards
from data.prepare import prepare_split
from orchestrator.config import Config


def _generated_root(config: Config) -> Path:
    """Where generated data lives: a folder beside local shards, keyed by the generator's settings."""
    shards = config.data.shards
    parent = Path(shards).parent if "://" not in shards else Path.cwd() / ".cache"
    return parent / f"generated-{config.data.val_dataset}-{_generator_key(config)}"


def _generator_key(config: Config) -> str:
    return hashlib.sha256(json.dumps(config.data.synthetic.model_dump(), sort_keys=True).encode()).hexdigest()[:10]


def _manifest_matches(uri: str, wanted: dict) -> bool:
    """Whether the shards under `uri` were written with these options (the generator's settings included, so
    shards of other generated data at the same URI are rewritten, not reused)."""
    if not shards.exists(f"{uri.rstrip('/')}/manifest.json"):
        return False
    manifest = shards.read_manifest(uri)
    recorded = {**manifest.get("options", {}), **{k: v for k, v in manifest.items() if k != "options"}}
    return all(recorded.get(key) == value for key, value in wanted.items())


def prepare_data(config: Config) -> tuple[str, str, str]:
    """Make sure `data.shards`/train, /select and /val exist (prepare is resumable); returns their URIs."""
    from data.synthetic import generate_ade20k, generate_voc

    data = config.data
    if data.synthetic is not None:
        generate = generate_ade20k if data.dataset == "ade20k" else generate_voc
        root = generate(_generated_root(config), **data.synthetic.model_dump())
        print(f"generated {data.val_dataset} layout at {root}", file=sys.stderr, flush=True)
        source = {"source": f"synthetic:{_generator_key(config)}"}
    else:
        root, source = Path(data.root), {}
    base = data.shards.rstrip("/")
    held_out = {"select_images": data.select_images, **source}
    splits = (
        ("train", {"dataset": data.dataset, "split": data.train_split, "part": "rest", **held_out}),
        ("select", {"dataset": data.dataset, "split": data.train_split, "part": "select", **held_out}),
        ("val", {"dataset": data.val_dataset, "split": data.val_split, "part": "all", "select_images": 0, **source}),
    )
    uris = []
    for name, wanted in splits:
        uri = f"{base}/{name}"
        if _manifest_matches(uri, wanted):
            print(f"shards {uri}: present ({wanted['dataset']}/{wanted['split']}, {wanted['part']})",
                  file=sys.stderr, flush=True)
        else:
            prepare_split(wanted["dataset"], root, wanted["split"], uri, shard_rows=data.shard_rows, workers=2,
                          reduce_zero_label=data.reduce_zero_label, part=wanted["part"],
                          select_images=wanted["select_images"], source=wanted.get("source"))
        uris.append(uri)
    return uris[0], uris[1], uris[2]
