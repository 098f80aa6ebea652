"""The Ray Data pipeline: batch shapes and dtypes, seeded train augmentation, deterministic exact val, checksums."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from data.errors import ShardIntegrityError
from data.pipeline import ingest_config, load_train_rows, train_collate, train_dataset, val_collate, val_dataset
from data.prepare import prepare_split
from data.shards import iter_samples
from data.synthetic import generate_voc


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Demo-sized data (160x120, 4 classes): voc_aug train shards and VOC val shards; and 96x96 val shards."""
    base = tmp_path_factory.mktemp("pipeline")
    root = generate_voc(base / "demo", seed=0, train_images=12, val_images=6, num_classes=4, height=120, width=160)
    square = generate_voc(base / "square", seed=1, train_images=1, val_images=6, num_classes=4, height=96, width=96)
    uris = {"train": str(base / "shards" / "train"), "val": str(base / "shards" / "val"),
            "square": str(base / "shards" / "square")}
    prepare_split("voc_aug", root, "train", uris["train"], shard_rows=4, workers=1, progress=False)
    prepare_split("voc", root, "val", uris["val"], shard_rows=4, workers=1, progress=False)
    prepare_split("voc", square, "val", uris["square"], shard_rows=4, workers=1, progress=False)
    return uris


def _digests(batches) -> list[str]:
    out = []
    for batch in batches:
        for image, label in zip(batch["image"], batch["label"], strict=True):
            out.append(hashlib.sha256(np.asarray(image).tobytes() + np.asarray(label).tobytes()).hexdigest())
    return sorted(out)


def test_train_batches_shapes_and_dtypes(ray_session, shards):
    import torch

    ds = train_dataset(shards["train"], crop_size=96, seed=0)
    raw = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert raw["image"].shape == (4, 3, 96, 96) and raw["image"].dtype == np.uint8  # compact in the object store
    assert raw["label"].shape == (4, 96, 96) and raw["label"].dtype == np.uint8
    batches = list(ds.iter_torch_batches(batch_size=4, collate_fn=train_collate))
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (4, 3, 96, 96) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (4, 96, 96) and batch["label"].dtype == torch.int64
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1
        assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3, 255}


def _ordered_digests(ds) -> list[tuple[str, str]]:
    return [(i, hashlib.sha256(np.asarray(x).tobytes() + np.asarray(y).tobytes()).hexdigest())
            for batch in ds.iter_batches(batch_size=4, batch_format="numpy")
            for i, x, y in zip(batch["id"], batch["image"], batch["label"], strict=True)]


def test_train_epoch_is_a_function_of_seed_and_epoch(ray_session, shards):
    rows = load_train_rows(shards["train"])
    first = train_dataset(rows, crop_size=64, seed=3, epoch=1)
    epoch1 = _ordered_digests(first)
    assert len(epoch1) == 12
    assert _ordered_digests(first) == epoch1  # a second pass over the same epoch: same order, same crops
    assert _ordered_digests(train_dataset(shards["train"], crop_size=64, seed=3, epoch=1)) == epoch1
    epoch2 = _ordered_digests(train_dataset(rows, crop_size=64, seed=3, epoch=2))
    assert sorted(i for i, _ in epoch2) == sorted(i for i, _ in epoch1)
    assert [i for i, _ in epoch2] != [i for i, _ in epoch1] and set(epoch2) != set(epoch1)
    assert set(_ordered_digests(train_dataset(rows, crop_size=64, seed=4, epoch=1))) != set(epoch1)


def test_val_deterministic_order_and_content(ray_session, shards):
    ds = val_dataset(shards["val"], size=128)
    runs = [list(ds.iter_batches(batch_size=4, batch_format="numpy")) for _ in range(2)]
    expected_ids = [sample_id for sample_id, _, _ in iter_samples(shards["val"])]
    for batches in runs:
        assert [i for b in batches for i in b["id"]] == expected_ids
        assert batches[0]["image"].shape == (4, 3, 128, 128) and batches[0]["image"].dtype == np.uint8
        assert batches[0]["label"].shape == (4, 128, 128) and batches[0]["label"].dtype == np.uint8
    for a, b in zip(*runs, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    limited = val_dataset(shards["val"], size=128, limit=5).take_all()
    assert [row["id"] for row in limited] == expected_ids[:5]


def test_val_labels_bit_exact_when_already_val_size(ray_session, shards):
    rows = val_dataset(shards["square"], size=96).take_all()
    samples = list(iter_samples(shards["square"]))
    assert len(rows) == len(samples) == 6
    for row, (sample_id, image, label) in zip(rows, samples, strict=True):
        assert row["id"] == sample_id
        assert row["label"].dtype == np.uint8 and np.array_equal(row["label"], label)
        assert np.array_equal(row["image"], image.transpose(2, 0, 1))
    assert any((row["label"] == 255).any() for row in rows)  # VOC borders stay ignore
    batches = list(val_dataset(shards["square"], size=96).iter_torch_batches(batch_size=4, collate_fn=val_collate))
    images = np.concatenate([b["image"].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert labels.dtype == np.int64 and np.array_equal(labels, np.stack([s[2] for s in samples]).astype(np.int64))
    assert images.dtype == np.float32
    assert np.array_equal(images, np.stack([s[1] for s in samples]).transpose(0, 3, 1, 2).astype(np.float32) / 255)


def test_val_torch_batches_keep_ids(ray_session, shards):
    batches = list(val_dataset(shards["val"], size=128).iter_torch_batches(batch_size=4, collate_fn=val_collate))
    assert [len(b["id"]) for b in batches] == [4, 2]
    assert isinstance(batches[0]["id"][0], str)
    assert tuple(batches[0]["image"].shape) == (4, 3, 128, 128) and str(batches[0]["label"].dtype) == "torch.int64"


def test_data_tasks_run_beside_fractional_cpu_holders(ray_session, shards):
    """With 1.5 of the 2 CPUs held (a trial's worker, a pretraining task, a SEA actor at 0.5 each, as in the demo),
    read and decode tasks asking for 0.5 CPU still run: the same rows as with whole-CPU tasks on a free cluster.
    (Building a val dataset samples its Parquet files with whole-CPU Ray Data tasks: it is built before.)"""
    import threading

    ray = ray_session
    rows = load_train_rows(shards["train"])
    free_train = _ordered_digests(train_dataset(rows, crop_size=64, seed=1, epoch=1))
    free_val = [r["id"] for r in val_dataset(shards["val"], size=64).take_all()]
    val = val_dataset(shards["val"], size=64, num_cpus=0.5)

    @ray.remote(num_cpus=1.5)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    out: dict[str, list] = {}

    def read() -> None:
        out["train"] = _ordered_digests(train_dataset(rows, crop_size=64, seed=1, epoch=1, num_cpus=0.5))
        out["val"] = [r["id"] for r in val.take_all()]

    reader = threading.Thread(target=read, daemon=True)
    try:
        reader.start()
        reader.join(timeout=120)  # whole-CPU tasks would wait for the holder forever
        assert not reader.is_alive(), "0.5-CPU data tasks did not run beside 1.5 held CPUs"
        assert out["train"] == free_train and out["val"] == free_val
    finally:
        ray.kill(holder)


def test_damaged_shard_is_named_when_building(ray_session, shards, tmp_path):
    import shutil

    uri = str(tmp_path / "val")
    shutil.copytree(shards["val"], uri)
    val_dataset(uri, size=64)  # verified and cached
    shard = tmp_path / "val" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[50] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match=r"part-00001\.parquet: sha256 .* does not match"):
        val_dataset(uri, size=64)
    with pytest.raises(ShardIntegrityError, match=r"part-00001\.parquet"):
        train_dataset(uri, crop_size=64)


@pytest.mark.slow
@pytest.mark.realpath
def test_two_ray_train_workers_see_disjoint_images_whose_union_is_the_epoch(ray_session, shards, tmp_path):
    """Two workers, two epochs: each worker's batches are its slice of the epoch order (disjoint, together the
    epoch's images), with the crops of a one-worker run, whatever the task timing."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from data.epoch_order import epoch_order, worker_positions

    rows = load_train_rows(shards["train"])
    out = tmp_path / "seen"
    out.mkdir()

    def loop(config):
        import json

        import ray.train

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        positions = worker_positions(steps=3, global_batch=4, world_size=world, rank=rank)
        seen = {}
        for epoch in (1, 2):
            ds = train_dataset(config["rows"], crop_size=64, seed=5, epoch=epoch, positions=positions)
            seen[epoch] = [[i, d] for i, d in _ordered_digests(ds)]
            batches = list(ds.iter_torch_batches(batch_size=2, collate_fn=train_collate))
            assert [tuple(b["image"].shape) for b in batches] == [(2, 3, 64, 64)] * 3
        ids = [i for b in ray.train.get_dataset_shard("select").iter_torch_batches(batch_size=4, collate_fn=val_collate)
               for i in b["id"]]
        with open(f"{config['out']}/rank{rank}.json", "w") as handle:
            json.dump({"seen": seen, "select": ids}, handle)

    trainer = TorchTrainer(
        loop, train_loop_config={"out": str(out), "rows": rows},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),  # a CPU left for decoding
        datasets={"select": val_dataset(shards["val"], size=128)}, dataset_config=ingest_config(),
        run_config=RunConfig(storage_path=str(tmp_path), name="pipeline"),
    )
    trainer.fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    ids_by_row = [sample_id for sample_id, _, _ in iter_samples(shards["train"])]
    for epoch in ("1", "2"):
        per_rank = [[tuple(x) for x in r["seen"][epoch]] for r in ranks]
        ids = [[i for i, _ in seen] for seen in per_rank]
        assert len(ids[0]) == len(ids[1]) == 6 and not set(ids[0]) & set(ids[1])
        order = epoch_order(12, seed=5, epoch=int(epoch))
        assert sorted(ids[0] + ids[1]) == sorted(ids_by_row[r] for r in order[:12])
        # Step s of the epoch is positions [4s, 4s + 4): rank 0 takes the first two, rank 1 the other two; the
        # crops are those of a single worker that takes all four.
        single = _ordered_digests(train_dataset(rows, crop_size=64, seed=5, epoch=int(epoch)))
        merged = [x for s in range(3) for x in per_rank[0][2 * s:2 * s + 2] + per_rank[1][2 * s:2 * s + 2]]
        assert merged == single
    assert ranks[0]["seen"]["1"] != ranks[0]["seen"]["2"]
    expected = [sample_id for sample_id, _, _ in iter_samples(shards["val"])]
    assert ranks[0]["select"] == ranks[1]["select"] == expected
