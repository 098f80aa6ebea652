"""MLflow tracking of a sweep: parent/child runs, params, metrics, artifacts, resume, secrets, servers.

The sweeps here are fake (synthetic numbers), but the MLflow stores are real: an embedded SQLite
store, a `mlflow server` process on 127.0.0.1 over HTTP, and S3 artifacts on the loopback moto server.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from data.classes import IGNORE_INDEX, VOC_PALETTE
from orchestrator.config import ConfigError, load_config, with_values
from orchestrator.plan import expand_trials
from orchestrator.plots import colorize, example_grid, save_png, sea_curve, to_hwc_uint8
from orchestrator.scores import final_metrics, metric_key
from orchestrator.tracking import (
    REDACTED,
    SweepTracker,
    config_params,
    redact,
    redact_tree,
)

from .conftest import REPO
from .mlflow_server import mlflow_server

DEMO = REPO / "tests" / "tiny.yaml"
SEA_EPS = (0.5, 4.0)
LOSSES = ("mce-bal", "mce", "js")

# Credentials planted in the config; none may reach MLflow (params, tags, names or artifacts).
SECRETS = ("AKIAPLANTED", "sup3rsecretpw", "sig123abc", "hunter2pass", "tok456xyz", "pw789zz", "cred000x",
           "ckptpass", "failpw42")


# The values the assertions below rely on, pinned here rather than taken from whatever the demo uses.
PINNED = ["sweep.params={train.attack.steps: [0, 2]}", "train.epochs=3", "train.attack.eps=4", "sea.eps=[2, 4]",
          "train.attack.steps=2"]


def secret_config(tmp_path: Path, **extra):
    """The demo config as a 2-trial sweep, with credentials inside several URIs."""
    base = load_config(DEMO, PINNED)
    values = {
        "data.shards": "s3://AKIAPLANTED:sup3rsecretpw@bucket/shards?X-Amz-Signature=sig123abc",
        "model.init": "pir",
        "model.backbone_weights": "https://alice:hunter2pass@example.com/w.pt?token=tok456xyz&x=1",
        "tracking.uri": "http://bob:pw789zz@127.0.0.1:5000",
        "sweep.storage_path": f"{tmp_path}/ray?X-Amz-Credential=cred000x",
    }
    values.update(extra)
    return with_values(base, values)


def sea_scores(worst_at_4: float) -> dict[float, dict[str, dict[str, float]]]:
    """A fake `trainables.attacks.aggregate` result per ε: the worst case at most each loss's score."""
    out = {}
    for eps in SEA_EPS:
        scale = 1.0 if eps == 4.0 else 2.0
        worst = min(0.9, worst_at_4 * scale)
        out[eps] = {"clean": {"miou": 0.7, "aacc": 0.92, "macc": 0.8},
                    "worst": {"miou": worst, "aacc": worst + 0.05, "macc": worst + 0.02}}
        for i, loss in enumerate(LOSSES):
            out[eps][loss] = {"miou": worst + 0.01 * (i + 1), "aacc": worst + 0.06, "macc": worst + 0.03}
    return out


def trial_name(overrides) -> str:
    """The fake sweep's trial names, e.g. 'steps=2'."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(overrides.items()))


def run_fake_sweep(uri: str, config, *, resume=False, only=None, finish=True, fail=None) -> SweepTracker:
    """Log a fake sweep: per trial 3 epochs, a result, example images; `fail` names a trial that fails."""
    tracker = SweepTracker(uri, config, resume=resume)
    rng = np.random.default_rng(0)
    for overrides in expand_trials(config):
        name = trial_name(overrides)
        if only is not None and name not in only:
            continue
        run_id = tracker.trial_run(name, with_values(config, overrides), overrides)
        for epoch in range(3):
            tracker.log_epoch(run_id, epoch, {"train_loss": 2.0 - 0.5 * epoch, "val_miou": 0.1 * (epoch + 1),
                                              "lr": np.float32(1e-3), "status": "ok", "done": False})
        if name == fail:
            tracker.mark_failed(run_id, "worker died reading https://eve:failpw42@host/x?token=tok456xyz")
            continue
        steps = overrides["train.attack.steps"]
        tracker.log_result(run_id, clean={"miou": 0.7, "aacc": 0.92}, sea=sea_scores(0.1 + 0.1 * steps),
                           train_hours=0.5 + steps, attack_hours=0.25,
                           checkpoint_uri=f"s3://carol:ckptpass@bucket/{name}/checkpoint_000002")
        images = rng.random((2, 3, 24, 32), dtype=np.float32)
        labels = rng.integers(0, 4, (2, 24, 32))
        labels[:, :3] = IGNORE_INDEX
        tracker.log_examples(run_id, images, labels, labels, rng.integers(0, 4, (2, 24, 32)), eps=4.0)
        tracker.end_trial(run_id)
    if finish:
        tracker.finish()
    return tracker


def runs_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("run_role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("run_role") == "trial"]
    return parents, children


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def assert_sweep_logged(client: MlflowClient, experiment: str, tmp_path: Path) -> None:
    """Everything the issue asks for is in the store, with the numbers that were logged."""
    parents, children = runs_of(client, experiment)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "demo"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["trial_name"] for c in children} == {"steps=0", "steps=2"}
    assert parent.data.params["train.epochs"] == "3" and parent.data.params["sweep.name"] == "demo"
    for child in children:
        params, metrics = child.data.params, child.data.metrics
        steps = int(params["attack_steps"])
        assert child.info.status == "FINISHED"
        assert params["train.attack.steps"] == str(steps) and steps in (0, 2)
        for short, value in {"eps": "4.0", "epochs": "3", "backbone": "convnext_atto", "init": "pir",
                             "dataset": "voc_aug", "decoder": "upernet"}.items():
            assert params[short] == value, short
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 2.0), (1, 1.5), (2, 1.0)]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "lr")] == [0, 1, 2]
        assert "status" not in metrics and "done" not in metrics
        assert metrics["clean_miou"] == pytest.approx(0.7) and metrics["clean_aacc"] == pytest.approx(0.92)
        worst4 = 0.1 + 0.1 * steps
        assert metrics["sea_miou_eps4"] == pytest.approx(worst4)
        assert metrics["sea_aacc_eps4"] == pytest.approx(worst4 + 0.05)
        assert metrics["sea_miou_eps0.5"] == pytest.approx(min(0.9, 2 * worst4))
        for i, loss in enumerate(LOSSES):
            assert metrics[f"sea_{loss}_miou_eps4"] == pytest.approx(worst4 + 0.01 * (i + 1))
            assert f"sea_{loss}_miou_eps0.5" in metrics
        assert metrics["train_hours"] == pytest.approx(0.5 + steps) and metrics["attack_hours"] == 0.25
        assert artifact_paths(client, child.info.run_id) == {
            "config.yaml", "checkpoint.txt", "sea_miou_vs_eps.png", "examples_eps4.png"}
        local = Path(client.download_artifacts(child.info.run_id, "", str(tmp_path / child.info.run_id)))
        assert (local / "checkpoint.txt").read_text().strip() == f"s3://***@bucket/steps={steps}/checkpoint_000002"
        assert f"steps: {steps}" in (local / "config.yaml").read_text()
        for png in ("sea_miou_vs_eps.png", "examples_eps4.png"):
            with Image.open(local / png) as image:
                assert image.format == "PNG" and image.width > 200 and image.height > 100
    assert artifact_paths(client, parent.info.run_id) == {
        "config.yaml", "summary.csv", "summary.md", "sea_miou_per_trial.png"}
    local = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "parent")))
    table = list(csv.DictReader(io.StringIO((local / "summary.csv").read_text())))
    assert sorted(row["trial_name"] for row in table) == ["steps=0", "steps=2"]
    by_name = {row["trial_name"]: row for row in table}
    assert float(by_name["steps=2"]["sea_miou_eps4"]) == pytest.approx(0.3)
    assert float(by_name["steps=0"]["train_hours"]) == pytest.approx(0.5)
    markdown = (local / "summary.md").read_text()
    assert "| steps=2 | FINISHED | 2 |" in markdown and "0.3000" in markdown and "sea_miou_eps0.5" in markdown


def assert_no_secrets(client: MlflowClient, experiment: str, tmp_path: Path) -> None:
    """No planted credential appears in any param, tag, run name or text artifact of the experiment."""
    parents, children = runs_of(client, experiment)
    texts = []
    for run in parents + children:
        texts += [run.info.run_name, *run.data.params.values(), *run.data.tags.values(), *run.data.params]
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / ("scan-" + run.info.run_id))))
        texts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    blob = "\n".join(texts)
    leaked = [s for s in SECRETS if s in blob]
    assert not leaked, f"secrets logged: {leaked}"
    assert REDACTED in blob  # the redaction happened (the URIs are there, without credentials)


def test_embedded_sqlite_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = secret_config(tmp_path)
    tracker = run_fake_sweep(uri, config)
    client = MlflowClient(tracking_uri=uri)
    assert_sweep_logged(client, "pir-at-demo", tmp_path)
    assert_no_secrets(client, "pir-at-demo", tmp_path)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.params["data.shards"] == "s3://***@bucket/shards?X-Amz-Signature=***"
    assert parent.data.params["model.backbone_weights"] == "https://***@example.com/w.pt?token=***&x=1"
    assert parent.data.params["sea.losses"] == '["mce-bal", "mce", "js", "segpgd", "mask-sph"]'


def test_resume_reuses_parent_and_children(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = secret_config(tmp_path)
    first = run_fake_sweep(uri, config, only={"steps=0"}, finish=False)  # the driver "crashed" here
    first_child = first.trial_run("steps=0", with_values(config, {"train.attack.steps": 0}),
                                  {"train.attack.steps": 0})
    second = run_fake_sweep(uri, config, resume=True, only={"steps=2"})
    assert second.parent_run_id == first.parent_run_id
    assert second.trial_run("steps=0", with_values(config, {"train.attack.steps": 0}),
                            {"train.attack.steps": 0}) == first_child
    client = MlflowClient(tracking_uri=uri)
    assert_sweep_logged(client, "pir-at-demo", tmp_path)  # one parent, two children, both in the summary

    third = SweepTracker(uri, config, resume=True)  # the sweep is FINISHED: a new parent
    assert third.parent_run_id != first.parent_run_id
    third.finish(status="KILLED")
    other = SweepTracker(uri, with_values(config, {"sweep.storage_path": str(tmp_path / "elsewhere")}),
                         resume=True)  # same name, other storage path: not the same sweep
    assert other.parent_run_id not in (first.parent_run_id, third.parent_run_id)


def test_resume_of_failed_sweep_restarts_parent_and_failed_child(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = secret_config(tmp_path)
    first = SweepTracker(uri, config)
    child = first.trial_run("steps=0", config, {"train.attack.steps": 0})
    first.mark_failed(child, "out of memory")
    first.finish(status="FAILED")
    assert first.client.get_run(first.parent_run_id).info.status == "FAILED"
    again = SweepTracker(uri, config, resume=True)
    assert again.parent_run_id == first.parent_run_id
    assert again.client.get_run(again.parent_run_id).info.status == "RUNNING"
    assert again.trial_run("steps=0", config, {"train.attack.steps": 0}) == child
    restarted = again.client.get_run(child)
    assert restarted.info.status == "RUNNING" and "failure" not in restarted.data.tags


def test_failed_trial_and_finish_closes_open_children(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = secret_config(tmp_path)
    tracker = run_fake_sweep(uri, config, fail="steps=0", finish=False)
    open_id = tracker.trial_run("extra", config, {})  # started, never got a result
    rows = tracker.finish(rows=[{"trial_name": "steps=2", "ray_status": "TERMINATED"}])
    client = MlflowClient(tracking_uri=uri)
    parents, children = runs_of(client, "pir-at-demo")
    status = {c.data.tags["trial_name"]: c.info.status for c in children}
    assert status == {"steps=0": "FAILED", "steps=2": "FINISHED", "extra": "KILLED"}
    failed = next(c for c in children if c.data.tags["trial_name"] == "steps=0")
    assert failed.data.tags["failure"] == "worker died reading https://***@host/x?token=***"
    assert client.get_run(open_id).data.tags["failure"].startswith("ended by the sweep's finish")
    by_name = {row["trial_name"]: row for row in rows}
    assert by_name["steps=2"]["ray_status"] == "TERMINATED" and by_name["steps=0"]["status"] == "FAILED"
    assert "clean_miou" not in by_name["steps=0"]
    assert_no_secrets(client, "pir-at-demo", tmp_path)


def test_artifacts_on_s3_artifact_location(tmp_path, monkeypatch, s3_bucket):
    import boto3

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = secret_config(tmp_path, **{"tracking.artifact_location": f"{s3_bucket}/mlflow"})
    tracker = run_fake_sweep(uri, config)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(tracker.experiment_id).artifact_location == f"{s3_bucket}/mlflow"
    bucket = s3_bucket.removeprefix("s3://")
    keys = {obj["Key"] for obj in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    prefix = f"mlflow/{tracker.parent_run_id}/artifacts/"
    assert {prefix + n for n in ("config.yaml", "summary.csv", "summary.md", "sea_miou_per_trial.png")} <= keys
    _, children = runs_of(client, "pir-at-demo")
    for child in children:
        assert f"mlflow/{child.info.run_id}/artifacts/checkpoint.txt" in keys
        assert f"mlflow/{child.info.run_id}/artifacts/examples_eps4.png" in keys
    assert not list(tmp_path.glob("mlruns/*/*/artifacts/*"))  # nothing went to the local default
    assert_sweep_logged(client, "pir-at-demo", tmp_path)
    assert_no_secrets(client, "pir-at-demo", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_http_tracking_server(tmp_path, monkeypatch, request, store):
    monkeypatch.chdir(tmp_path)
    # Everything must use the URI it is given: a stray MLFLOW_TRACKING_URI would catch misdirected calls.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/wrong.db")
    if store == "s3":
        destination = request.getfixturevalue("s3_bucket") + "/served"
    else:
        destination = str(tmp_path / "served-artifacts")
    with mlflow_server(tmp_path, destination) as url:
        config = secret_config(tmp_path, **{"tracking.uri": url})
        tracker = run_fake_sweep(url, config)
        client = MlflowClient(tracking_uri=url)
        assert client.get_experiment(tracker.experiment_id).artifact_location.startswith("mlflow-artifacts:")
        assert_sweep_logged(client, "pir-at-demo", tmp_path)
        assert_no_secrets(client, "pir-at-demo", tmp_path)
    # The artifacts went through the server to its destination.
    if store == "s3":
        import boto3

        bucket = request.getfixturevalue("s3_bucket").removeprefix("s3://")
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
        assert any(k.startswith("served/") and k.endswith("summary.csv") for k in keys), keys
    else:
        assert list((tmp_path / "served-artifacts").rglob("summary.csv"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "wrong.db").exists()


# ---------------------------------------------------------------------------------------------
# Units: redaction, metric names, checks, plots


@pytest.mark.parametrize("raw, expected", [
    ("s3://AKIA1:secretpw@bucket/key", "s3://***@bucket/key"),
    ("https://user:pass@host:8080/path?a=1", "https://***@host:8080/path?a=1"),
    ("https://token123@github.com/org/repo", "https://***@github.com/org/repo"),
    ("https://b.s3.amazonaws.com/o?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=abc123"
     "&X-Amz-Security-Token=tok", "https://b.s3.amazonaws.com/o?X-Amz-Algorithm=AWS4&X-Amz-Credential=***"
     "&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://acct.blob.core.windows.net/c/b?sv=2022&sig=s1g&se=2030", "https://acct.blob.core.windows.net/c/b"
     "?sv=2022&sig=***&se=2030"),
    ("gs://bucket/x?key=k3y&token=t0k", "gs://bucket/x?key=***&token=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlruns.db", "sqlite:////tmp/mlruns.db"),
    ("failed: see postgresql://me:pw@db:5432/mlflow and s3://k:s@b/x", "failed: see postgresql://***@db:5432/mlflow"
     " and s3://***@b/x"),
    ("plain text, no uri", "plain text, no uri"),
])
def test_redact(raw, expected):
    assert redact(raw) == expected


def test_secret_named_keys_are_starred():
    tree = {"aws_secret_access_key": "x1", "api_token": "x2", "db": {"password": "x3", "user": "me",
                                                                      "uri": "s3://a:b@c/d"},
            "credentials": ["x4"], "keep_checkpoints": 2, "empty_password": None}
    assert redact_tree(tree) == {"aws_secret_access_key": REDACTED, "api_token": REDACTED,
                                 "db": {"password": REDACTED, "user": "me", "uri": "s3://***@c/d"},
                                 "credentials": REDACTED, "keep_checkpoints": 2, "empty_password": None}


def test_config_params_are_flat_and_redacted():
    config = load_config(DEMO, [*PINNED, "tracking.uri=http://u:p@127.0.0.1:5000"])
    params = config_params(config)
    assert params["train.attack.steps"] == "2" and params["train.attack.eps"] == "4.0"
    assert params["sea.eps"] == "[2.0, 4.0]" and params["tracking.uri"] == "http://***@127.0.0.1:5000"
    assert params["tracking.artifact_location"] == "None"


def test_artifact_location_config_key():
    config = load_config(DEMO, ["tracking.artifact_location=s3://bucket/mlflow"])
    assert config.tracking.artifact_location == "s3://bucket/mlflow"
    assert load_config(DEMO).tracking.artifact_location is None
    with pytest.raises(ConfigError, match="tracking.artifact_locaton: unknown key"):
        load_config(DEMO, ["tracking.artifact_locaton=s3://bucket/mlflow"])


def test_final_metric_names_and_checks():
    metrics = final_metrics({"miou": 0.5, "aacc": 0.8, "name": "x"}, sea_scores(0.2), 1.5, 0.5)
    assert metrics["sea_mce-bal_miou_eps0.5"] == pytest.approx(0.41)
    assert metrics["sea_miou_eps4"] == pytest.approx(0.2) and metrics["sea_clean_miou_eps4"] == 0.7
    assert "clean_name" not in metrics and metrics["train_hours"] == 1.5
    assert final_metrics({"miou": 0.5, "loss": 2.5}, {}, 1.0, 1.0)["clean_loss"] == 2.5  # not a fraction score
    assert {metric_key(k) for k in metrics} == set(metrics)  # all valid MLflow names, unchanged
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\], not percent"):
        final_metrics({"miou": 55.0}, {}, 1.0, 1.0)
    with pytest.raises(ValueError, match="no 'worst' entry"):
        final_metrics({"miou": 0.5}, {4.0: {"clean": {"miou": 0.5}}}, 1.0, 1.0)
    with pytest.raises(ValueError, match="train_hours = -1"):
        final_metrics({"miou": 0.5}, {}, -1, 1.0)
    assert metric_key("val/mIoU (4/255)") == "val/mIoU _4/255_"


def test_colorize_uses_palette_and_ignore_colour():
    label = np.array([[0, 1], [IGNORE_INDEX, 150]])
    rgb = colorize(label)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 1]) == VOC_PALETTE[1] and tuple(rgb[1, 1]) == VOC_PALETTE[150]
    assert tuple(rgb[1, 0]) == VOC_PALETTE[IGNORE_INDEX] == (224, 224, 192)
    with pytest.raises(ValueError, match="no colour in a palette of 3 entries"):
        colorize(np.array([[0, 5]]), palette=[(0, 0, 0), (1, 1, 1), (2, 2, 2)])


def test_image_layouts():
    floats = np.zeros((1, 3, 4, 5), dtype=np.float32)
    floats[0, 0] = 1.0
    out = to_hwc_uint8(floats)
    assert out.shape == (1, 4, 5, 3) and tuple(out[0, 0, 0]) == (255, 0, 0)
    assert to_hwc_uint8(out) is out
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        to_hwc_uint8(floats * 3 - 1)  # ImageNet-normalised input is a mistake
    with pytest.raises(ValueError, match="N×3×H×W floats in \\[0, 1\\] or N×H×W×3 uint8"):
        to_hwc_uint8(np.zeros((1, 4, 5, 3), dtype=np.float32))


def test_plots_write_pngs(tmp_path):
    path = save_png(sea_curve(sea_scores(0.2)), tmp_path / "curve.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300
    labels = np.zeros((3, 20, 30), dtype=np.int64)
    figure = example_grid(np.zeros((3, 20, 30, 3), dtype=np.uint8), labels, labels, labels + 1, eps=4.0,
                          class_names=["background", "aeroplane"])
    with Image.open(save_png(figure, tmp_path / "grid.png")) as image:
        assert image.height > image.width * 0.5  # three rows
    with pytest.raises(ValueError, match="clean_pred must be N×H×W"):
        example_grid(np.zeros((3, 20, 30, 3), dtype=np.uint8), labels, labels[:, :10], labels)
