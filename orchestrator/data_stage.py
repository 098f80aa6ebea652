"""The job's data stage: generate the synthetic dataset when configured, then shard train and val once."""

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
    synthetic = config.data.synthetic
    key = hashlib.sha256(json.dumps(synthetic.model_dump(), sort_keys=True).encode()).hexdigest()[:10]
    shards = config.data.shards
    parent = Path(shards).parent if "://" not in shards else Path.cwd() / ".cache"
    return parent / f"generated-{config.data.val_dataset}-{key}"


def _manifest_matches(uri: str, dataset: str, split: str) -> bool:
    if not shards.exists(f"{uri.rstrip('/')}/manifest.json"):
        return False
    manifest = shards.read_manifest(uri)
    return manifest.get("dataset") == dataset and manifest.get("split") == split


def prepare_data(config: Config) -> tuple[str, str]:
    """Make sure `data.shards`/train and /val exist (prepare is resumable); returns their URIs."""
    from data.synthetic import generate_ade20k, generate_voc

    data = config.data
    if data.synthetic is not None:
        generate = generate_ade20k if data.dataset == "ade20k" else generate_voc
        root = generate(_generated_root(config), **data.synthetic.model_dump())
        print(f"generated {data.val_dataset} layout at {root}", file=sys.stderr, flush=True)
    else:
        root = Path(data.root)
    base = data.shards.rstrip("/")
    uris = []
    for dataset, split, name in ((data.dataset, data.train_split, "train"), (data.val_dataset, data.val_split, "val")):
        uri = f"{base}/{name}"
        if _manifest_matches(uri, dataset, split):
            print(f"shards {uri}: present ({dataset}/{split})", file=sys.stderr, flush=True)
        else:
            prepare_split(dataset, root, split, uri, shard_rows=data.shard_rows, workers=2,
                          reduce_zero_label=data.reduce_zero_label)
        uris.append(uri)
    return uris[0], uris[1]
