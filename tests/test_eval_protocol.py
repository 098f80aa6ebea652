"""Evaluation protocols (`eval.protocol`) on generated images with known labels, and the two SEA mIoU names.

Two VOC-layout val images whose labels a wrong resize would change: A is 40x60 (landscape) with a
one-pixel column of class 1 at x = 41 and a 255 border on rows 10-11; B is 60x40 (portrait) with a 255
border on rows 0-1 and class 0 below row 40. A model stub predicts one fixed class map, so every score
below is an exact fraction worked out by hand from the protocol's geometry.
"""

from __future__ import annotations

import csv
import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from data.classes import IGNORE_INDEX
from data.errors import DataError
from data.pipeline import full_labels, val_collate, val_dataset
from data.prepare import prepare_split
from data.transforms import ignored_as, reference_crop
from orchestrator.config import ConfigError, load_config, with_values
from orchestrator.scores import final_metrics
from orchestrator.sea_pool import eval_view, in_id_order, score_batch
from orchestrator.tracking import SweepTracker
from tests.conftest import REPO
from trainables.attacks import ScoreAt, SeaResult, aggregate, sea
from trainables.metrics import intersection_union, label_area

pytestmark = pytest.mark.realpath

DEMO = REPO / "tests" / "tiny.yaml"
VOC_CLASSES = 21
SEA = {"eps": [4.0], "iterations": 2, "losses": ["mce"], "seed": 0, "track": "ce"}


def _label_a() -> np.ndarray:
    label = np.full((40, 60), 3, np.uint8)
    label[:, :20], label[:, 20:40] = 1, 2
    label[:, 41] = 1
    label[10:12] = IGNORE_INDEX
    return label


def _label_b() -> np.ndarray:
    label = np.zeros((60, 40), np.uint8)
    label[:40, :20], label[:40, 20:] = 1, 2
    label[:2] = IGNORE_INDEX
    return label


LABELS = {"2007_000001": _label_a(), "2007_000002": _label_b()}


def _bands(height: int, width: int, columns: list[tuple[int, int]], bottom: tuple[int, int] | None = None):
    """A class map of vertical bands (class, first column), optionally one class from a row down."""
    out = np.zeros((height, width), np.int64)
    for cls, start in columns:
        out[:, start:] = cls
    if bottom is not None:
        out[bottom[1]:] = bottom[0]
    return out


class FixedMap(nn.Module):
    """Predicts the same class map for every image (logit 10 on its class), whatever the input shows."""

    def __init__(self, classes: np.ndarray, num_classes: int = VOC_CLASSES):
        super().__init__()
        onehot = F.one_hot(torch.as_tensor(classes), num_classes).permute(2, 0, 1).float()
        self.register_buffer("logits", 10 * onehot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != self.logits.shape[1:]:
            raise ValueError(f"model input {tuple(x.shape[2:])}, the stub predicts {tuple(self.logits.shape[1:])}")
        return self.logits.expand(x.shape[0], -1, -1, -1) + 0 * x.mean()


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    """VOC-layout val shards of images A and B; returns the shards' base URI (val/ below it)."""
    base = tmp_path_factory.mktemp("protocol")
    root = base / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sample_id, label in LABELS.items():
        Image.fromarray(rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)).save(root / "JPEGImages" /
                                                                                      f"{sample_id}.jpg")
        Image.fromarray(label).save(root / "SegmentationClass" / f"{sample_id}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(LABELS) + "\n")
    prepare_split("voc", root, "val", str(base / "shards" / "val"), shard_rows=4, workers=1, progress=False)
    return str(base / "shards")


def _config(shards: str, protocol: str):
    return load_config(DEMO, [f"data.shards={shards}", "data.crop_size=20", "data.val_size=30",
                              f"eval.protocol={protocol}"])


def test_reference_crop_short_side_then_centre_crop_with_nearest_labels():
    label = _label_a()
    image = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out_image, out_label = reference_crop(image, label, size=20)
    # short side 40 -> 20, long side 60 -> 30, centre crop from column 5: PIL's nearest takes rows 2r + 1 and
    # columns 2c + 11 of the original, so the 255 border survives on row 5 and the 1-pixel line on column 15
    expected = np.full((20, 20), 3, np.uint8)
    expected[:, :5], expected[:, 5:15], expected[:, 15] = 1, 2, 1
    expected[5] = IGNORE_INDEX
    assert np.array_equal(out_label, expected)
    resized = np.asarray(Image.fromarray(image).resize((30, 20), Image.Resampling.BILINEAR))
    assert np.array_equal(out_image, resized[:, 5:25])
    portrait_image, portrait = reference_crop(image.transpose(1, 0, 2), label.T, size=20)
    assert np.array_equal(portrait, expected.T) and portrait_image.shape == (20, 20, 3)
    assert np.array_equal(ignored_as(expected, 0)[5], np.zeros(20, np.uint8))
    with pytest.raises(ValueError, match="ignore_as = 255"):
        ignored_as(expected, IGNORE_INDEX)
    with pytest.raises(ValueError, match="size 0"):
        reference_crop(image, label, size=0)


def _scores(shards: str, protocol: str, model: nn.Module) -> tuple[dict, dict]:
    config = _config(shards, protocol)
    view = eval_view(config)
    batches = list(val_dataset(f"{shards}/val", **view).iter_torch_batches(batch_size=2, collate_fn=val_collate))
    assert len(batches) == 1 and batches[0]["id"] == list(LABELS)
    results = score_batch(model, batches[0], SEA, config.data.num_classes, device=torch.device("cpu"))
    return aggregate([r["sea"] for r in results], config.data.num_classes), batches[0]


def test_reference_protocol_scores_the_centre_crop_with_borders_as_background(ray_session, val_shards):
    # the stub: class 1 on the crop's left half, class 2 on its right half
    scores, batch = _scores(val_shards, "reference", FixedMap(_bands(20, 20, [(1, 0), (2, 10)])))
    assert batch["image"].shape == (2, 3, 20, 20) and "score_label" not in batch
    assert int((batch["label"] == IGNORE_INDEX).sum()) == 0  # no pixel ignored
    # A's crop: row 5 (the border) class 0; else class 1 on columns 0-4 and 15, 2 on 5-14, 3 on 16-19.
    # B's crop: rows 0-14 class 1 | 2 (columns 0-9 | 10-19), rows 15-19 class 0.
    # class 0: 0 / (20 + 100); class 1: (95 + 150) / (219 + 200); class 2: (95 + 150) / (295 + 200); 3: 0 / 76
    miou = (Fraction(245, 419) + Fraction(245, 495)) / 4
    for name in ("clean", "mce", "worst"):
        assert scores[name]["miou"] == pytest.approx(float(miou), abs=1e-12)
        assert scores[name]["aacc"] == pytest.approx(490 / 800, abs=1e-12)


def test_full_protocol_scores_upsampled_logits_at_the_original_label_size(ray_session, val_shards):
    # the stub on the 30x30 input: class 1 | 2 | 3 on columns 0-9 | 10-19 | 20-29, class 0 from row 20 down.
    # A fits as 20x30 (rows 20-29 are padding, the stub's class 0 there must never be scored), B as 30x20;
    # logits upsampled x2 make A's prediction 1 | 2 | 3 on columns 0-19 | 20-39 | 40-59 and B's 1 | 2, class 0
    # from row 40.
    model = FixedMap(_bands(30, 30, [(1, 0), (2, 10), (3, 20)], bottom=(0, 20)))
    scores, batch = _scores(val_shards, "full", model)
    assert batch["image"].shape == (2, 3, 30, 30)
    assert batch["score_label"].shape == (2, 60, 60) and batch["score_size"].tolist() == [[40, 60], [60, 40]]
    assert batch["content"].tolist() == [[20, 30], [30, 20]]
    assert torch.equal(batch["score_label"][0, :40, :60], torch.from_numpy(_label_a()).long())
    assert bool((batch["score_label"][0, 40:] == IGNORE_INDEX).all())
    # A (rows 10-11 ignored): class 1 inter 760 union 798 (the column x = 41 is missed), 2: 760 / 760,
    # 3: 722 / 760; B (rows 0-1 ignored) is predicted exactly: 0: 800, 1: 760, 2: 760.
    miou = (1 + Fraction(1520, 1558) + 1 + Fraction(722, 760)) / 4
    for name in ("clean", "mce", "worst"):
        assert scores[name]["miou"] == pytest.approx(float(miou), abs=1e-12)
        assert scores[name]["aacc"] == pytest.approx(4562 / 4600, abs=1e-12)


def test_val_dataset_rejects_unknown_views(val_shards):
    with pytest.raises(DataError, match="protocol = 'paper': must be one of fit, reference, full"):
        val_dataset(f"{val_shards}/val", size=20, protocol="paper")
    with pytest.raises(DataError, match="ignore_as = 300"):
        val_dataset(f"{val_shards}/val", size=20, protocol="reference", ignore_as=300)


def test_full_labels_pad_with_the_ignore_value():
    labels, sizes = full_labels([np.ones((2, 3), np.uint8), np.zeros((4, 1), np.uint8)])
    assert labels.shape == (2, 4, 3) and labels.dtype == np.int64 and sizes.tolist() == [[2, 3], [4, 1]]
    assert (labels[0, :2] == 1).all() and (labels[0, 2:] == IGNORE_INDEX).all()
    assert (labels[1, :, :1] == 0).all() and (labels[1, :, 1:] == IGNORE_INDEX).all()


def test_score_at_checks_its_labels_and_sizes():
    model = FixedMap(_bands(8, 8, [(1, 0)]), num_classes=2)
    x, y = torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.long)
    labels = torch.full((1, 16, 16), IGNORE_INDEX)
    labels[0, :16, :12] = 1
    result = sea(model, x, y, eps=4 / 255, num_classes=2, n_iter=1, losses=("mce",),
                 score_at=ScoreAt(labels, torch.tensor([[16, 12]]), torch.tensor([[8, 6]])))
    assert result.labelled.tolist() == [192] and result.area.tolist() == [[0, 192]]
    assert result.correct["clean"].tolist() == [192]
    bad = [
        (ScoreAt(labels, torch.tensor([[17, 12]]), torch.tensor([[8, 6]])), "score_at.sizes"),
        (ScoreAt(labels, torch.tensor([[16, 12]]), torch.tensor([[8, 9]])), "score_at.content"),
        (ScoreAt(labels, torch.tensor([[16, 8]]), torch.tensor([[8, 6]])), "labels outside their sizes"),
        (ScoreAt(labels.clamp(max=5), torch.tensor([[16, 12]]), torch.tensor([[8, 6]])), r"label values \[5\]"),
    ]
    for score_at, error in bad:
        with pytest.raises(ValueError, match=error):
            sea(model, x, y, eps=4 / 255, num_classes=2, n_iter=1, losses=("mce",), score_at=score_at)


def test_eval_protocol_config_and_view():
    config = load_config(DEMO)
    assert config.eval.protocol == "reference"
    assert eval_view(config) == {"size": config.data.crop_size, "protocol": "reference", "ignore_as": 0}
    full = with_values(config, {"eval.protocol": "full"})
    assert eval_view(full) == {"size": config.data.val_size, "protocol": "full", "ignore_as": None}
    ade = with_values(config, {"data.dataset": "ade20k"})
    assert eval_view(ade)["ignore_as"] is None and ade.data.num_classes == 151
    with pytest.raises(ConfigError, match="eval.protocol = 'paper': must be one of reference or full"):
        load_config(DEMO, ["eval.protocol=paper"])
    with pytest.raises(ConfigError, match="eval.protocol = 'reference' scores ADE20K with class 0 kept"):
        with_values(config, {"data.dataset": "ade20k", "data.reduce_zero_label": True})
    assert with_values(full, {"data.dataset": "ade20k", "data.reduce_zero_label": True}).data.num_classes == 150
    for recipe in sorted((REPO / "experiments" / "configs").glob("*.yaml")):
        assert load_config(recipe).eval.protocol == "reference", recipe.name


def _worst_case_result(ids=(0, 1)) -> SeaResult:
    """Two 1x4 images whose greedy worst-case mIoU (7/12) is above the refined one (11/21)."""
    y = torch.tensor([[[0, 0, 1, 1]], [[0, 0, 0, 0]]])
    preds = {"clean": torch.tensor([[[0, 0, 0, 1]], [[0, 0, 0, 1]]]),
             "a": torch.tensor([[[1, 0, 1, 1]], [[0, 0, 0, 0]]])}
    counts = {name: intersection_union(pred, y, 2) for name, pred in preds.items()}
    return SeaResult(eps=4 / 255, losses=("a",), num_classes=2, area=label_area(y, 2),
                     labelled=torch.tensor([4, 4]), inter={k: c[0] for k, c in counts.items()},
                     union={k: c[1] for k, c in counts.items()},
                     correct={k: c[2] for k, c in counts.items()}, ids=torch.tensor(ids))


def test_strongest_and_greedy_worst_case_named_from_sea_to_the_summary(tmp_path, monkeypatch):
    # greedy: image 0 takes "a" (tie at 7/12, first candidate), then image 1 takes clean: 7/12.
    # refined: clean on both images gives class 0 5/7 and class 1 1/3, mIoU 11/21 < 7/12.
    worst = aggregate([_worst_case_result()], 2)["worst"]
    assert worst["miou_greedy"] == pytest.approx(7 / 12) and worst["miou"] == pytest.approx(11 / 21)
    sea_scores = {4.0: aggregate([_worst_case_result()], 2)}
    metrics = final_metrics({"miou": 0.75}, sea_scores, 1.0, 0.5)
    assert metrics["sea_miou_eps4"] == pytest.approx(11 / 21)
    assert metrics["sea_miou_greedy_eps4"] == pytest.approx(7 / 12)
    with pytest.raises(ValueError, match="sea_miou_greedy|not percent"):
        final_metrics({"miou": 0.75}, {4.0: {"worst": {"miou": 0.5, "miou_greedy": 58.3}}}, 1.0, 0.5)

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = load_config(DEMO, ["sweep.params={}", f"sweep.storage_path={tmp_path}/ray", "eval.protocol=full"])
    tracker = SweepTracker(uri, config)
    run_id = tracker.trial_run("only", config, {})
    tracker.log_result(run_id, clean={"miou": 0.75}, sea=sea_scores, train_hours=1.0, attack_hours=0.5,
                       checkpoint_uri="/tmp/checkpoint")
    tracker.end_trial(run_id)
    tracker.finish()
    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id).data
    assert logged.metrics["sea_miou_eps4"] == pytest.approx(11 / 21)
    assert logged.metrics["sea_miou_greedy_eps4"] == pytest.approx(7 / 12)
    assert logged.params["protocol"] == "full"
    local = Path(client.download_artifacts(tracker.parent_run_id, "", str(tmp_path / "parent")))
    row = next(csv.DictReader(io.StringIO((local / "summary.csv").read_text())))
    assert row["protocol"] == "full" and float(row["sea_miou_greedy_eps4"]) == pytest.approx(7 / 12)
    markdown = (local / "summary.md").read_text()
    header = [c.strip() for c in markdown.splitlines()[0].strip("| ").split("|")]
    assert "protocol" in header and "sea_miou_eps4" in header and "sea_miou_greedy_eps4" in header
    assert "| full |" in markdown and "0.5238" in markdown and "0.5833" in markdown
    assert "sea_miou_greedy_eps{E}: the paper's greedy worst case; this is the number comparable" in markdown
    assert "sea_miou_eps{E}: SEA's strongest valid worst case" in markdown
    assert "protocol reference: as the paper's code" in markdown and "protocol full: as the segmentation" in markdown


def test_greedy_walks_the_images_in_id_order():
    # the same two images, sent by the actors with hash keys in the opposite order of their ids
    first = _slice(_worst_case_result(), 0, key=900)
    second = _slice(_worst_case_result(), 1, key=100)
    results = {(4.0, "2007_000001"): first, (4.0, "2007_000002"): second}
    hashed = aggregate(list(results.values()), 2)["worst"]["miou_greedy"]
    ordered = in_id_order(results)
    assert [r.ids.tolist() for r in ordered.values()] == [[0], [1]]
    assert aggregate(list(ordered.values()), 2)["worst"]["miou_greedy"] == pytest.approx(7 / 12)
    assert hashed != pytest.approx(7 / 12)  # walked in key order (image 1 first), the greedy number differs


def _slice(result: SeaResult, index: int, *, key: int) -> SeaResult:
    import dataclasses

    pick = slice(index, index + 1)
    return dataclasses.replace(
        result, area=result.area[pick], labelled=result.labelled[pick],
        inter={k: v[pick] for k, v in result.inter.items()}, union={k: v[pick] for k, v in result.union.items()},
        correct={k: v[pick] for k, v in result.correct.items()}, ids=torch.tensor([key]))
