"""Unbiased model selection: checkpoints are chosen on training images held out as their own shard split,
never on the val images that SEA scores, and the training pipeline never yields a selection image."""

from __future__ import annotations

import os

import pytest

from data.errors import DataError
from data.prepare import prepare_split, selection_ids
from data.shards import iter_samples, read_manifest
from orchestrator.config import load_config, resolve_paths, with_values

from .conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.realpath


def _ids(uri: str) -> list[str]:
    return [sample_id for sample_id, _, _ in iter_samples(uri)]


@pytest.fixture(scope="module")
def job_data(tmp_path_factory):
    """The job's data stage on a small generated dataset: train/, select/ and val/ shards."""
    from orchestrator.data_stage import prepare_data

    base = tmp_path_factory.mktemp("selection")
    config = with_values(resolve_paths(load_config(TINY_CONFIG), REPO), {
        "data.shards": str(base / "shards"), "data.synthetic.train_images": 20, "data.synthetic.val_images": 6,
        "data.select_images": 5, "data.synthetic.height": 48, "data.synthetic.width": 64,
    })
    cwd = os.getcwd()
    os.chdir(base)
    try:
        prepare_data(config)
    finally:
        os.chdir(cwd)
    return config


def test_selection_images_are_held_out_of_train_and_apart_from_sea(job_data):
    from orchestrator.train import shard_uris

    train_uri, select_uri, val_uri = shard_uris(job_data)  # what the trainer and the SEA pool read
    train, select, val = _ids(train_uri), _ids(select_uri), _ids(val_uri)
    assert len(select) == 5 and len(train) == 15
    assert not set(select) & set(train)
    assert not set(select) & set(val)
    assert read_manifest(select_uri)["part"] == "select" and read_manifest(train_uri)["part"] == "rest"


def test_the_training_pipeline_never_yields_a_selection_image(job_data, ray_session):
    from data.pipeline import load_train_rows, train_dataset
    from orchestrator.train import shard_uris

    train_uri, select_uri, _ = shard_uris(job_data)
    rows = load_train_rows(train_uri)
    seen = [i for epoch in (1, 2) for batch in
            train_dataset(rows, crop_size=32, epoch=epoch).iter_batches(batch_size=8, batch_format="numpy")
            for i in batch["id"]]
    assert len(seen) == 30 and not set(seen) & set(_ids(select_uri))


def test_selection_is_fixed_by_the_ids_alone(tmp_path):
    ids = [f"2008_{i:06d}" for i in range(40)]
    chosen = selection_ids(ids, 8)
    assert len(chosen) == 8 and chosen == selection_ids(list(reversed(ids)), 8)
    with pytest.raises(DataError, match="select_images = 40: must be >= 1 and leave training images"):
        selection_ids(ids, 40)
    with pytest.raises(DataError, match="needs part 'select' or 'rest'"):
        prepare_split("voc", tmp_path, "train", str(tmp_path / "out"), select_images=3)
