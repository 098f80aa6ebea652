"""What the project logs is filtered: credential-like keys (`*key*`, `*secret*`, `*token*`, `*password*`), URIs
with user:password and the values of secret environment variables are redacted before they reach MLflow
(params, tags, run names, text artifacts) or a log line; unknown config keys are refused. No server here:
the MLflow client is a recorder (tests/test_mlflow_auth.py does the same against a real server)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess

import pytest
from mlflow.entities import Metric, Param, RunTag

from orchestrator import mlflow_auth
from orchestrator.config import ConfigError, load_config, with_values
from orchestrator.plan import build_plan, format_plan
from orchestrator.redact import (
    REDACTED,
    RedactingClient,
    environment_secrets,
    environment_snapshot,
    is_secret_key,
    redact,
    redact_tree,
    say,
)
from orchestrator.tracking import config_params

from .conftest import PYTHON, REPO

DEMO = REPO / "experiments" / "configs" / "demo.yaml"
PASSWORD = "Zq3-planted-mlflow-password"


@pytest.mark.parametrize("key", ["aws_secret_access_key", "AWS_ACCESS_KEY_ID", "gcs_key", "X-Api-Key", "key",
                                 "ssh_private_key", "db_password", "MLFLOW_TRACKING_PASSWORD", "auth_token",
                                 "RAY_AUTH_TOKEN", "client_secret", "passwd", "credentials"])
def test_credential_like_keys_are_secret(key):
    assert is_secret_key(key)
    assert redact_tree({key: "v4lue", "outer": {key: ["a", "b"]}}) == {key: REDACTED, "outer": {key: REDACTED}}


@pytest.mark.parametrize("key", ["train.attack.steps", "keep_checkpoints", "sweep.name", "data.shards",
                                 "model.backbone_weights", "tracking.uri", "MLFLOW_TRACKING_USERNAME"])
def test_ordinary_keys_are_not_secret(key):
    assert not is_secret_key(key)


def test_environment_secrets_are_scrubbed_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("SOME_API_KEY", "k" * 20)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # shorter than MIN_SECRET_CHARS: an ordinary word
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/home/ray/.ray/auth_token")  # a location, not the secret
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/etc/gcp/key.json")
    found = environment_secrets()
    assert PASSWORD in found and "k" * 20 in found
    assert "testing" not in found and "/home/ray/.ray/auth_token" not in found and "/etc/gcp/key.json" not in found
    assert redact(f"login as pir-at-ray:{PASSWORD} failed") == f"login as pir-at-ray:{REDACTED} failed"
    assert redact(f"http://pir-at-ray:{PASSWORD}@10.0.0.5:5000") == f"http://{REDACTED}@10.0.0.5:5000"
    assert redact("testing /home/ray/.ray/auth_token") == "testing /home/ray/.ray/auth_token"
    assert redact_tree({"note": [f"x{PASSWORD}y"]}) == {"note": [f"x{REDACTED}y"]}
    assert environment_secrets({"MLFLOW_TRACKING_PASSWORD": PASSWORD, "HOME": "/root/long-path"}) == [PASSWORD]


class _VanishingEnviron(dict):
    """An environment in which one variable is removed by another thread between listing and reading, as
    MLflow's telemetry thread removes _MLFLOW_TELEMETRY_SESSION_ID when it finds no network."""

    def __getitem__(self, name):
        if name == "_VANISHING":
            raise KeyError(name)
        return super().__getitem__(name)

    def items(self):
        return ((name, self[name]) for name in list(self))  # os.environ's way: list the names, then read each

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default


def test_a_variable_removed_while_reading_the_environment_is_left_out():
    environ = _VanishingEnviron(_VANISHING="gone-before-it-was-read", MLFLOW_TRACKING_PASSWORD=PASSWORD)
    assert environment_secrets(environ) == [PASSWORD]
    assert environment_snapshot(environ) == {"MLFLOW_TRACKING_PASSWORD": PASSWORD}


# Run in a process of its own: setenv/unsetenv race with getenv in any native thread (Ray's, gRPC's, the AWS
# SDK's) that earlier tests left in the test process.
_FLICKER = """
import os, sys, threading, time
from orchestrator.redact import REDACTED, environment_snapshot, redact
password = sys.argv[1]
os.environ["MLFLOW_TRACKING_PASSWORD"] = password
stop, flips = threading.Event(), [0]

def flicker():
    while not stop.is_set():
        os.environ["_PIR_AT_FLICKER"] = "x"
        del os.environ["_PIR_AT_FLICKER"]
        flips[0] += 1

thread = threading.Thread(target=flicker, daemon=True)
sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can, so a removal lands mid-read
thread.start()
calls, deadline = 0, time.monotonic() + 1.0
while time.monotonic() < deadline:
    assert redact("user:" + password) == "user:" + REDACTED
    assert environment_snapshot()["MLFLOW_TRACKING_PASSWORD"] == password
    calls += 1
stop.set()
thread.join()
print(calls, flips[0])
"""


def test_redaction_survives_another_thread_changing_os_environ(repo_env):
    """The failure seen in a fresh clone's make demo: KeyError from os.environ while MLflow's telemetry thread
    unset a variable. Here a thread sets and unsets one for a second while redact and the snapshot run."""
    result = subprocess.run([PYTHON, "-c", _FLICKER, PASSWORD], env=repo_env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    calls, flips = map(int, result.stdout.split())
    assert calls > 100 and flips > 100, (calls, flips)


def test_a_config_with_credentials_is_logged_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    config = with_values(load_config(DEMO), {
        "data.shards": "s3://AKIAUSER:s3cretpass@host/bucket/shards",
        "sweep.storage_path": f"s3://bucket/ray?X-Amz-Signature=sig987&note={PASSWORD}",
        "tracking.uri": f"http://pir-at-ray:{PASSWORD}@127.0.0.1:5000",
        "sweep.name": f"sweep-{PASSWORD}",
    })
    params = config_params(config)
    assert params["data.shards"] == "s3://***@host/bucket/shards"
    assert params["sweep.storage_path"] == "s3://bucket/ray?X-Amz-Signature=***&note=***"
    assert params["tracking.uri"] == "http://***@127.0.0.1:5000"
    assert params["sweep.name"] == "sweep-***"
    blob = json.dumps(params)
    assert not any(s in blob for s in ("AKIAUSER", "s3cretpass", "sig987", PASSWORD))


def test_a_secret_named_key_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="tracking.aws_secret_access_key: unknown key") as raised:
        load_config(DEMO, [f"tracking.aws_secret_access_key={PASSWORD}"])
    assert PASSWORD not in str(raised.value)


class Recorder:
    """Stands in for MlflowClient: records what would be sent."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_the_redacting_client_is_the_last_gate_before_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    recorder = Recorder()
    client = RedactingClient(recorder)
    client.create_run("0", run_name=f"trial-{PASSWORD}", tags={"aws_secret_access_key": "AKIA/abc",
                                                             "origin": "s3://u:p@bucket/x", "role": "trial"})
    client.log_param("r", "gcs_key", "abcdefgh")
    client.log_param("r", "shards", "s3://u:p@bucket/x")
    client.set_tag("r", "failure", f"401 for pir-at-ray with {PASSWORD}")
    client.log_batch("r", metrics=[Metric("loss", 1.0, 0, 0)], params=[Param("api_token", "t0ken-value")],
                     tags=[RunTag("checkpoint_uri", "https://a:b@h/c?sig=zz")])
    client.log_text("r", f"uri: s3://u:p@bucket/x\npassword: {PASSWORD}\n", "config.yaml")
    client.log_dict("r", {"secret_key": "zzz", "nested": {"uri": "gs://k:s@b/o"}}, "d.json")
    client.get_run("r")  # anything else passes through unchanged
    sent = {name: (args, kwargs) for name, args, kwargs in recorder.calls if name != "log_param"}
    params = [args[1:] for name, args, _ in recorder.calls if name == "log_param"]
    assert sent["create_run"][1]["run_name"] == "trial-***"
    assert sent["create_run"][1]["tags"] == {"aws_secret_access_key": REDACTED, "origin": "s3://***@bucket/x",
                                             "role": "trial"}
    assert params == [("gcs_key", REDACTED), ("shards", "s3://***@bucket/x")]
    assert sent["set_tag"][0] == ("r", "failure", "401 for pir-at-ray with ***")
    batch = sent["log_batch"][1]
    assert [(p.key, p.value) for p in batch["params"]] == [("api_token", REDACTED)]
    assert [(t.key, t.value) for t in batch["tags"]] == [("checkpoint_uri", "https://***@h/c?sig=***")]
    assert batch["metrics"][0].value == 1.0
    assert sent["log_text"][0] == ("r", "uri: s3://***@bucket/x\npassword: ***\n", "config.yaml")
    assert sent["log_dict"][0][1] == {"secret_key": REDACTED, "nested": {"uri": "gs://***@b/o"}}
    assert sent["get_run"][0] == ("r",)


def test_log_lines_are_redacted(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    config = with_values(load_config(DEMO), {"model.backbone_weights": "https://u:weightspw@host/w.pt",
                                             "model.init": "pir", "sweep.name": f"n-{PASSWORD}"})
    plan = build_plan(config, f"http://pir-at-ray:{PASSWORD}@10.0.0.5:5000")
    text = format_plan(plan)
    assert "Tracking URI: http://***@10.0.0.5:5000" in text and "from https://***@host/w.pt" in text
    say(f"trial failed: 403 from s3://AKIA:topsecret@bucket with {PASSWORD}")
    err = capsys.readouterr().err
    assert "trial failed: 403 from s3://***@bucket with ***" in err
    assert not any(s in text + err for s in ("weightspw", "topsecret", PASSWORD))


def test_config_errors_are_printed_redacted(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pir_at_sweep", REPO / "experiments" / "pir_at_sweep.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--dry-run", "data.crop_size=s3://AKIAUSER:wr0ngplace@bucket/x"])
    err = capsys.readouterr().err
    assert code == script.EXIT_INPUT and "demo.yaml: data.crop_size = " in err
    assert "s3://***@bucket/x" in err and "wr0ngplace" not in err


# ---------------------------------------------------------------------------------------------
# orchestrator.mlflow_auth without a server


def test_new_secret_is_private_random_and_not_overwritten(tmp_path):
    path = mlflow_auth.new_secret(tmp_path / "dir" / "mlflow_password")
    first = path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) >= 40 and first == first.strip() and mlflow_auth.read_secret(path) == first
    with pytest.raises(mlflow_auth.AuthSetupError, match="already exists; pass --force"):
        mlflow_auth.new_secret(path)
    assert mlflow_auth.new_secret(path, force=True).read_text() != first


@pytest.mark.parametrize("content, message", [
    (None, "no such file; create it with `python -m orchestrator.mlflow_auth new-secret"),
    ("", "the file is empty"),
    ("short-pw", "has 8 characters; it must have at least 12"),
    ("password1234", "not be MLflow's old default password"),
    ("a-long-enough-secret\n", "contains whitespace"),
])
def test_unusable_secrets_are_refused_without_echoing_them(tmp_path, content, message):
    path = tmp_path / "mlflow_password"
    if content is not None:
        path.write_text(content)
    with pytest.raises(mlflow_auth.AuthSetupError, match=message) as raised:
        mlflow_auth.read_secret(path)
    assert str(path) in str(raised.value)
    assert not content or content.strip() not in str(raised.value)


@pytest.mark.parametrize("command, message", [
    (["mlflow", "server", "--host", "0.0.0.0"], "--app-name = not given: must be exactly once --app-name basic-auth"),
    (["mlflow", "server", "--app-name", "other"], r"--app-name = \['other'\]"),
    (["mlflow", "server", "--app-name", "basic-auth", "--app-name=other"], "must be exactly once"),
    (["mlflow", "ui", "--app-name", "basic-auth"], "expected `mlflow server ...` after --, got 'mlflow ui'"),
    ([], "got 'nothing'"),
])
def test_serve_refuses_a_server_without_basic_auth(tmp_path, capsys, command, message):
    secret = mlflow_auth.new_secret(tmp_path / "s")
    code = mlflow_auth.main(["serve", "--secret-file", str(secret), "--state-dir", str(tmp_path / "st"), "--",
                             *command])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "st").exists()  # refused before anything was written or started


def test_auth_config_and_server_environment_hold_no_password(tmp_path):
    secret = mlflow_auth.read_secret(mlflow_auth.new_secret(tmp_path / "s"))
    ini = mlflow_auth.auth_config(tmp_path / "state")
    assert f"database_uri = sqlite:///{tmp_path}/state/basic_auth.db" in ini
    assert "admin_username = pir-at-ray" in ini and "password" not in ini
    env = mlflow_auth.server_environment(tmp_path / "state", "pir-at-ray", secret,
                                         base={"MLFLOW_TRACKING_PASSWORD": "client", "PATH": "/bin"})
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == secret and env["MLFLOW_AUTH_ADMIN_USERNAME"] == "pir-at-ray"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "state" / "basic_auth.ini")
    assert len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64 and secret not in env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert "MLFLOW_TRACKING_PASSWORD" not in env and env["PATH"] == "/bin"


def test_sync_admin_rotates_the_stored_password(tmp_path):
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    state = tmp_path / "state"
    assert mlflow_auth.sync_admin(state, "pir-at-ray", "first-secret-123") == "new"
    state.mkdir()
    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{state / mlflow_auth.AUTH_DB}")
    store.create_user("pir-at-ray", "first-secret-123", is_admin=True)
    assert mlflow_auth.sync_admin(state, "pir-at-ray", "first-secret-123") == "unchanged"
    assert mlflow_auth.sync_admin(state, "pir-at-ray", "second-secret-456") == "rotated"
    assert store.authenticate_user("pir-at-ray", "second-secret-456")
    assert not store.authenticate_user("pir-at-ray", "first-secret-123")
    assert mlflow_auth.sync_admin(state, "someone-else", "second-secret-456") == "absent"
    store.engine.dispose()
