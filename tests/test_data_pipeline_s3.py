"""The Ray Data pipeline reads shards from an s3:// URI (loopback moto server); workers get credentials from env."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data.pipeline import train_dataset, val_dataset
from data.prepare import prepare_split
from data.shards import iter_samples
from data.synthetic import generate_voc
from tests.conftest import REPO


@pytest.mark.slow
def test_pipeline_over_s3(s3_bucket, tmp_path):
    import ray

    root = generate_voc(tmp_path, seed=2, train_images=6, val_images=5, num_classes=3, height=64, width=64)
    train_uri, val_uri = f"{s3_bucket}/shards/train", f"{s3_bucket}/shards/val"
    prepare_split("voc_aug", root, "train", train_uri, shard_rows=4, workers=1, progress=False)
    prepare_split("voc", root, "val", val_uri, shard_rows=2, workers=1, progress=False)
    # Started after the fixture set AWS_* and AWS_ENDPOINT_URL, so the workers inherit them.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = val_dataset(val_uri, size=64).take_all()
        samples = list(iter_samples(val_uri))
        assert [row["id"] for row in rows] == [sample_id for sample_id, _, _ in samples]
        for row, (_, _, label) in zip(rows, samples, strict=True):
            assert row["label"].dtype == np.uint8 and np.array_equal(row["label"], label)
        batches = list(train_dataset(train_uri, crop_size=48).iter_batches(batch_size=3, batch_format="numpy"))
        assert [b["image"].shape for b in batches] == [(3, 3, 48, 48)] * 2
    finally:
        ray.shutdown()
