"""A real `mlflow server` process on 127.0.0.1 for tests (HTTP tracking URI), always stopped afterwards;
optionally behind MLflow's basic-auth app, started the way the cluster starts it (orchestrator.mlflow_auth)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from orchestrator.redact import environment_snapshot

from .conftest import REPO, _free_port


@contextlib.contextmanager
def mlflow_server(tmp_path: Path, artifacts_destination: str, timeout: float = 90.0, *,
                  secret_file: Path | None = None, state_dir: Path | None = None) -> Iterator[str]:
    """Start `mlflow server` with a SQLite backend in `tmp_path` and the given artifact destination
    (a folder or s3://...; the server proxies artifact uploads); yields its http:// URI once /health
    answers. The server runs in its own process group, which is terminated on exit.

    With `secret_file`, the server is MLflow's basic-auth app started through
    `python -m orchestrator.mlflow_auth serve` (admin password = the secret, auth state in `state_dir`)."""
    port = _free_port()
    env = environment_snapshot()
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers for a test server
    log_path = tmp_path / "mlflow-server.log"
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
               "--artifacts-destination", artifacts_destination, "--workers", "1"]
    if secret_file is not None:
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        command = [sys.executable, "-m", "orchestrator.mlflow_auth", "serve", "--secret-file", str(secret_file),
                   "--state-dir", str(state_dir or tmp_path / "auth"), "--", *command[:2], "--app-name", "basic-auth",
                   *command[2:]]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start on {url} within {timeout:g} s:\n"
                                       + log_path.read_text()[-3000:])
                time.sleep(0.3)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker share this group
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still alive
