"""Shared pytest fixtures and paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from orchestrator.redact import environment_snapshot

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The tests' tiny config (the demo's previous colour-coded, randomly initialised setting): trains in seconds.
TINY_CONFIG = REPO / "tests" / "tiny.yaml"


@pytest.fixture
def repo_env() -> dict[str, str]:
    """Environment for subprocesses that must import this checkout (not another install)."""
    env = environment_snapshot()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture
def two_torch_threads():
    """Two torch threads for the test, the previous count restored after it (model-size tests, same arithmetic)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1; yields its endpoint URL.

    Clients find it through AWS_ENDPOINT_URL (boto3, smart_open and pyarrow all honour it).
    """
    import subprocess
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(PYTHON).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback S3 server, with the environment pointed at it; yields 's3://name'."""
    import uuid

    import boto3

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> str:
    """The demo's generated VOC-layout data, sharded once per session as the job does; yields the shards' base
    URI (train/, select/ and val/ below it), as `data.shards` expects. 16 of the 64 generated training images
    are held out as the selection split, so train/ keeps 48."""
    from data.prepare import prepare_split
    from data.synthetic import generate_voc

    base = tmp_path_factory.mktemp("demo_data")
    root = generate_voc(base / "generated", seed=0, train_images=64, val_images=16, num_classes=4,
                        height=120, width=160)
    shards = base / "shards"
    for name, part in (("train", "rest"), ("select", "select")):
        prepare_split("voc_aug", root, "train", str(shards / name), shard_rows=16, workers=1, progress=False,
                      part=part, select_images=16)
    prepare_split("voc", root, "val", str(shards / "val"), shard_rows=16, workers=1, progress=False)
    return str(shards)


@pytest.fixture(scope="module")
def ray_session():
    """A local 2-CPU Ray for one test module (Ray Data progress bars off); workers import this checkout."""
    import ray

    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# A token-authenticated Ray head on 127.0.0.1 for `ray job submit` tests (tests/ray_head.py).
from .ray_head import ray_head  # noqa: E402, F401

# The toy segmentation net and batch shared by the attack, SEA and defence tests (tests/segtoy.py).
from .segtoy import batch, model  # noqa: E402, F401
