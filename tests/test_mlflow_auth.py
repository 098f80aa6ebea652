"""The cluster's MLflow server requires authentication, and nothing secret reaches what runs log.

A real `mlflow server --app-name basic-auth` on 127.0.0.1, started the way the clusters start it
(`python -m orchestrator.mlflow_auth serve` with a secret file made at test time): requests without or
with wrong credentials are refused with 401, the project's tracking code logs a sweep with the
credentials from MLflow's environment variables, and the password appears in no param, tag, run name,
artifact or log line. Rotating the secret and restarting locks the old password out.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator import mlflow_auth
from orchestrator.config import with_values
from orchestrator.redact import REDACTED
from orchestrator.tracking import SweepTracker

from .mlflow_server import mlflow_server
from .test_tracking import assert_no_secrets, assert_sweep_logged, run_fake_sweep, runs_of, secret_config

USER = mlflow_auth.DEFAULT_USERNAME
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"

pytestmark = pytest.mark.slow  # each server start takes about 10 s


def call(url: str, path: str, user: str | None = None, password: str | None = None, data: dict | None = None):
    """(HTTP status, body) of one REST request, with HTTP basic auth when `user` is given."""
    request = urllib.request.Request(url + path, data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """(url, password, folder) of one authenticated loopback server for this module; stopped at the end."""
    assert importlib.util.find_spec("flask_wtf"), "MLflow's basic-auth app needs mlflow[auth]: reinstall the project"
    root = tmp_path_factory.mktemp("auth-mlflow")
    secret = mlflow_auth.new_secret(root / "home" / ".pir-at-ray" / "mlflow_password")
    with mlflow_server(root, str(root / "artifacts"), secret_file=secret) as url:
        yield url, secret.read_text(), root


@pytest.fixture
def no_client_credentials(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def test_requests_without_or_with_wrong_credentials_are_refused(auth_server, no_client_credentials):
    url, password, _ = auth_server
    assert url.startswith("http://127.0.0.1:")
    status, body = call(url, SEARCH)
    assert status == 401 and "not authenticated" in body
    assert call(url, SEARCH, USER, password[:-1] + ("x" if password[-1] != "x" else "y"))[0] == 401
    assert call(url, SEARCH, "intruder", password)[0] == 401
    assert call(url, SEARCH, USER, "password1234")[0] == 401  # MLflow's old default admin password
    # Writes are refused too: no experiment created, no artifact uploaded, no UI page served.
    assert call(url, "/api/2.0/mlflow/experiments/create", data={"name": "fake-results"})[0] == 401
    assert call(url, "/api/2.0/mlflow-artifacts/artifacts/x.txt", data={"x": 1})[0] == 401
    assert call(url, "/")[0] == 401
    status, body = call(url, SEARCH, USER, password)
    assert status == 200 and "fake-results" not in body
    assert call(url, "/health")[0] == 200  # the only open route: liveness
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(tracking_uri=url).search_experiments()


def test_tracking_works_with_credentials_from_the_environment_and_logs_no_secret(
        auth_server, tmp_path, monkeypatch, capfd):
    url, password, root = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # A sweep as the job logs it (parent run, two trials with params, epoch metrics, results, artifacts),
    # its config carrying credentials in URIs (s3://key:secret@..., presigned query strings, ...).
    config = secret_config(tmp_path, **{"tracking.uri": url, "tracking.experiment": "pir-at-auth"})
    run_fake_sweep(url, config)
    client = MlflowClient(tracking_uri=url)
    assert_sweep_logged(client, "pir-at-auth", tmp_path)
    assert_no_secrets(client, "pir-at-auth", tmp_path)

    # The password itself planted where a careless caller could put it: a secret-named override, a
    # trial name, a failure message, a checkpoint URI, a param, a tag, an extra summary column.
    leaky = with_values(config, {"tracking.experiment": "pir-at-auth-leak", "sweep.name": "leak"})
    tracker = SweepTracker(url, leaky)
    run_id = tracker.trial_run(f"trial-{password}", leaky, {"aws_secret_access_key": password,
                                                             "note": f"logged in with {password}"})
    tracker.log_result(run_id, clean={"miou": 0.5}, sea={}, train_hours=0.1, attack_hours=0.0,
                       checkpoint_uri=f"https://{USER}:{password}@host/ckpt?token={password}")
    tracker.client.log_param(run_id, "extra_api_key", password)
    tracker.client.set_tag(run_id, "note", f"password={password}")
    tracker.mark_failed(run_id, f"HTTP 401 as {USER} with password {password}")
    tracker.finish(rows=[{"trial_name": "extra", "comment": f"pw {password}"}])

    texts = []
    for experiment in ("pir-at-auth", "pir-at-auth-leak"):
        parents, children = runs_of(client, experiment)
        for run in parents + children:
            data = run.data
            texts += [run.info.run_name, *data.params, *data.params.values(), *data.tags, *data.tags.values()]
            local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / f"scan-{run.info.run_id}")))
            texts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    blob = "\n".join(texts)
    assert password not in blob
    leak_child = runs_of(client, "pir-at-auth-leak")[1][0]
    assert leak_child.info.run_name == f"trial-{REDACTED}"
    assert leak_child.data.params["extra_api_key"] == REDACTED
    assert json.loads(leak_child.data.tags["trial_overrides"])["aws_secret_access_key"] == REDACTED
    assert leak_child.data.tags["checkpoint_uri"] == f"https://{REDACTED}@host/ckpt?token={REDACTED}"
    assert leak_child.data.tags["failure"] == f"HTTP 401 as {USER} with password {REDACTED}"
    # Nor in a log line: this process's output, the server's log, the auth state on disk but the secret file.
    out, err = capfd.readouterr()
    assert "tracking: MLflow parent run" in out and password not in out + err
    assert password not in (root / "mlflow-server.log").read_text()
    for path in (root / "auth").rglob("*"):
        assert not path.is_file() or password.encode() not in path.read_bytes(), path


def test_rotating_the_secret_locks_the_old_password_out(tmp_path, no_client_credentials):
    secret = mlflow_auth.new_secret(tmp_path / "secret")
    old = secret.read_text()
    state = tmp_path / "auth"
    with mlflow_server(tmp_path, str(tmp_path / "artifacts"), secret_file=secret, state_dir=state) as first:
        status, body = call(first, "/api/2.0/mlflow/experiments/create", USER, old, data={"name": "before"})
        assert status == 200, body
        assert stat.S_IMODE(os.stat(state / mlflow_auth.AUTH_INI).st_mode) == 0o600
        mlflow_auth.new_secret(secret, force=True)
        new = secret.read_text()
        assert new != old
        # Started again on the same state (as `ray up` does): the first server is stopped, the admin's
        # password becomes the new secret, and the runs are still there.
        with mlflow_server(tmp_path, str(tmp_path / "artifacts"), secret_file=secret, state_dir=state) as second:
            with pytest.raises(OSError):
                urllib.request.urlopen(f"{first}/health", timeout=5)
            assert call(second, SEARCH, USER, old)[0] == 401
            status, body = call(second, SEARCH, USER, new)
            assert status == 200 and "before" in body
    assert "admin user 'pir-at-ray': rotated" in (tmp_path / "mlflow-server.log").read_text()
