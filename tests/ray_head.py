"""A token-authenticated Ray head on 127.0.0.1 for tests that submit Ray jobs (fixture `ray_head`).

The head runs in its own temp dir with its own ports and token, so it never touches another Ray
instance, ~/.ray or /tmp/ray; teardown stops only the processes this head started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.redact import environment_snapshot

from .conftest import PYTHON, REPO, _free_port

RAY_CLI = str(Path(PYTHON).parent / "ray")
MARKER = "PIR_AT_TEST_RAY_HEAD"  # set in the head's environment; every process it spawns inherits it
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 45
# Ray variables from the caller's shell that would point the head or its clients somewhere else.
_FOREIGN_RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")


@dataclass(frozen=True)
class RayHead:
    """A running head: where it listens, its token, and the environment clients need to reach it."""

    address: str  # GCS address, e.g. "127.0.0.1:41234" (ray.init, ray status)
    dashboard_url: str  # jobs API and dashboard, e.g. "http://127.0.0.1:41235"
    token: str
    env: dict[str, str]  # RAY_AUTH_MODE=token, RAY_AUTH_TOKEN, RAY_ADDRESS=dashboard_url, PATH with the venv
    temp_dir: Path

    def ray(self, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this head (with self.env unless `env` is given); never raises on exit code."""
        return subprocess.run([RAY_CLI, *args], env=self.env if env is None else env, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, *entrypoint: str, working_dir: Path = REPO, runtime_env: dict | None = None,
               submission_id: str | None = None, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . [--runtime-env-json ..] -- ENTRYPOINT` run from working_dir.

        Waits for the job to end and streams its logs into stdout; exit code 0 means SUCCEEDED.
        """
        args = ["job", "submit", "--working-dir", "."]
        if runtime_env:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        if submission_id:
            args += ["--submission-id", submission_id]
        return self.ray(*args, "--", *entrypoint, env=env, cwd=working_dir, timeout=timeout)

    def job_info(self, submission_id: str, token: str | None = None) -> dict:
        """The jobs API's record of one job (status, entrypoint, runtime_env, ...), read over HTTP."""
        request = urllib.request.Request(f"{self.dashboard_url}/api/jobs/{submission_id}")
        request.add_header("Authorization", f"Bearer {self.token if token is None else token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def generate_token(home: Path) -> str:
    """A new token from `ray get-auth-token --generate`, with HOME pointed at `home` so ~/.ray stays untouched."""
    env = {k: v for k, v in environment_snapshot().items() if k not in _FOREIGN_RAY_ENV}
    env["HOME"] = str(home)
    result = subprocess.run([RAY_CLI, "get-auth-token", "--generate"], env=env, capture_output=True,
                            text=True, timeout=120)
    token = result.stdout.strip()
    if result.returncode != 0 or not token:
        raise RuntimeError(
            f"`ray get-auth-token --generate` failed (exit {result.returncode}): {result.stderr[-2000:]}"
        )
    return token


def head_env(token: str, temp_dir: Path) -> dict[str, str]:
    """Environment of the head's processes (and so of job drivers and workers)."""
    env = {k: v for k, v in environment_snapshot().items() if k not in _FOREIGN_RAY_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # Ray's switch for single-machine clusters: every address stays on 127.0.0.1 instead of
        # the machine's routable IP (`--node-ip-address 127.0.0.1` alone is replaced by that IP).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": str(Path(PYTHON).parent) + os.pathsep + env.get("PATH", ""),
        MARKER: str(temp_dir),
    })
    return env


def _authorized(url: str, token: str) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _pids_with_marker(value: str) -> list[int]:
    """Processes whose environment carries MARKER=value: this head's descendants, however detached."""
    needle = f"{MARKER}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_head(proc: subprocess.Popen, temp_dir: Path) -> list[int]:
    """SIGTERM the blocking `ray start` (it drains and stops its children), then SIGKILL leftovers by pid.

    Returns the pids that had to be killed.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    leftovers = _pids_with_marker(str(temp_dir))
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


def start_head(temp_dir: Path, num_cpus: int = 2) -> tuple[subprocess.Popen, RayHead]:
    """Start `ray start --head --block` on 127.0.0.1 with token auth; returns once the jobs API answers."""
    token = generate_token(temp_dir / "home")
    gcs_port, dashboard_port, client_port, agent_port = (_free_port() for _ in range(4))
    env = head_env(token, temp_dir)
    log_path = temp_dir / "ray_start.log"
    command = [
        RAY_CLI, "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--include-dashboard", "true",
        "--ray-client-server-port", str(client_port),
        "--dashboard-agent-listen-port", str(agent_port),
        "--num-cpus", str(num_cpus),
        "--temp-dir", str(temp_dir / "ray"),
        "--disable-usage-stats",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _authorized(f"{dashboard_url}/api/version", token):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_head(proc, temp_dir)
            raise RuntimeError(
                f"Ray head did not answer on {dashboard_url} within {START_TIMEOUT_S}s "
                f"(ray start exit {proc.poll()}); log {log_path}:\n{log_path.read_text()[-4000:]}"
            )
        time.sleep(0.5)
    client_env = dict(env)
    client_env["RAY_ADDRESS"] = dashboard_url
    return proc, RayHead(f"127.0.0.1:{gcs_port}", dashboard_url, token, client_env, temp_dir)


@pytest.fixture(scope="session")
def ray_head():
    """A Ray head on 127.0.0.1 with token auth (2 CPUs, dashboard and jobs API); yields a RayHead."""
    # A short path under /tmp: Ray's Unix sockets live in the temp dir and have a ~100 byte limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    proc, head = start_head(temp_dir)
    try:
        yield head
    finally:
        stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
