"""Keys and features that used to do nothing: each is now wired (and tested) or removed with a clear error."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, load_config, resolve_paths, with_values

from .conftest import REPO

pytestmark = pytest.mark.realpath
DEMO = REPO / "tests" / "tiny.yaml"


@pytest.mark.parametrize("key", ["data.val_images", "train.val_images"])
def test_removed_keys_are_refused_by_name(key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(DEMO, [f"{key}=8"])


def test_drop_path_rate_reaches_the_backbone():
    from trainables.models import build_from_config

    config = with_values(load_config(DEMO), {"model.drop_path_rate": 0.3})
    model = build_from_config(config.model, 4)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="model.drop_path_rate"):
        load_config(DEMO, ["model.drop_path_rate=1.5"])


def test_remote_weights_are_not_reported_missing_on_this_machine():
    from data.shards import is_local
    from orchestrator.plan import check_paths

    assert not is_local("https://example.org/w.pt") and not is_local("s3://b/w.pt")
    assert is_local("/tmp/w.pt") and is_local("file:///tmp/w.pt") and is_local("relative/w.pt")
    config = with_values(resolve_paths(load_config(DEMO), REPO),
                         {"model.init": "pir", "model.backbone_weights": "https://example.org/robust.pt"})
    assert not [w for w in check_paths(config) if "backbone_weights" in w]


def test_every_imported_package_is_declared():
    """Third-party modules imported by the installed packages are dependencies in pyproject.toml."""
    declared = {re.split(r"[\[<>=;! ]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for package in ("data", "orchestrator", "trainables"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("data", "orchestrator", "trainables"):
                        continue
                    dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                    if not dists & declared:
                        missing[top] = str(path.relative_to(REPO))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_sea_examples_are_named_by_image_id(tmp_path):
    from orchestrator.sea_pool import SeaScorer
    from trainables.pir_at import PirAt
    from trainables.report_keys import CHECKPOINT_FILE

    config = with_values(load_config(DEMO), {"sea.iterations": 2, "sea.eps": [8]})
    torch.manual_seed(0)
    state = PirAt(config.train, config.model, 4, steps_per_epoch=1).state_dict(epoch=1)
    torch.save(state, os.path.join(tmp_path, CHECKPOINT_FILE))
    scorer = SeaScorer(str(tmp_path), config.model_dump(mode="json"), 4, threads=1, example_ids=("img_c",))
    rng = np.random.default_rng(0)
    batch = {"id": np.asarray(["img_a", "img_b", "img_c"], dtype=object),
             "image": rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8),
             "label": rng.integers(0, 4, (3, 32, 32), dtype=np.uint8)}
    import pickle

    out = scorer(batch)
    examples = [pickle.loads(blob) for blob in out["examples"]]
    assert [list(e["id"]) for e in examples if e is not None] == [["img_c"]]
