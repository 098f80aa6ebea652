"""The cluster's MLflow server behind MLflow's basic-auth app, its admin credentials taken from a secret file.

The user creates the secret once (`new-secret`, mode 600, outside the repository); the cluster configs copy
it to every node. `serve` starts `mlflow server --app-name basic-auth` with the admin user set to that secret
(created on first start, its password replaced when the secret changed: that is how the secret is rotated),
and clients authenticate through MLflow's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. The secret
is passed only through the environment of the server process, never on a command line, in a file of the
repository or in a log line.

    python -m orchestrator.mlflow_auth new-secret ~/.pir-at-ray/mlflow_password
    python -m orchestrator.mlflow_auth serve --secret-file ~/.pir-at-ray/mlflow_password --state-dir ~/mlflow \\
        -- mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000 --backend-store-uri ...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import importlib.util
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from orchestrator.redact import environment_snapshot

# The MLflow user every driver and worker of the cluster logs as (MLFLOW_TRACKING_USERNAME).
DEFAULT_USERNAME = "pir-at-ray"
# MLflow's basic-auth app refuses shorter passwords; its old default admin password is refused too.
MIN_PASSWORD_CHARS = 12
LEGACY_DEFAULT_PASSWORD = "password1234"
AUTH_INI = "basic_auth.ini"
AUTH_DB = "basic_auth.db"
PID_FILE = "server.pid"
APP_NAME = "basic-auth"


class AuthSetupError(ValueError):
    """A secret file or server command that cannot give an authenticated server (the message never holds the
    secret)."""


def new_secret(path: str | Path, force: bool = False) -> Path:
    """Write a fresh random secret (43 URL-safe characters) to `path` with mode 600; refuses to overwrite
    an existing file unless `force` (which is how the secret is rotated)."""
    path = Path(path).expanduser()
    if path.exists() and not force:
        raise AuthSetupError(f"{path}: already exists; pass --force to replace it (rotates the MLflow password)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = path.with_name(path.name + ".new")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32))  # no newline: Kubernetes passes the file's exact bytes on
    os.replace(scratch, path)
    return path


def read_secret(path: str | Path) -> str:
    """The secret in `path`; a missing, empty, short or default one, or one with whitespace (a trailing
    newline included), is an error that names the file and what is valid, never the value."""
    path = Path(path).expanduser()
    fix = f"write a new one with `python -m orchestrator.mlflow_auth new-secret --force {path}`"
    if not path.is_file():
        raise AuthSetupError(f"{path}: no such file; create it with "
                             f"`python -m orchestrator.mlflow_auth new-secret {path}`")
    secret = path.read_text()
    if not secret.strip():
        raise AuthSetupError(f"{path}: the file is empty; it must hold the MLflow admin password; {fix}")
    if any(c.isspace() for c in secret):
        # `$(cat file)` would drop a trailing newline but a Kubernetes secretKeyRef keeps it: two passwords.
        raise AuthSetupError(f"{path}: the secret contains whitespace (a trailing newline?); it must be one "
                             f"word without a newline at the end; {fix}")
    if len(secret) < MIN_PASSWORD_CHARS or secret == LEGACY_DEFAULT_PASSWORD:
        raise AuthSetupError(f"{path}: the secret has {len(secret)} characters; it must have at least "
                             f"{MIN_PASSWORD_CHARS} and not be MLflow's old default password; {fix}")
    return secret


def auth_config(state_dir: str | Path, username: str = DEFAULT_USERNAME) -> str:
    """The basic-auth app's ini file (MLFLOW_AUTH_CONFIG_PATH): its user database in `state_dir`, the admin's
    name and a credential cache. It holds no password: that comes from the environment, see `server_environment`."""
    database = Path(state_dir).expanduser().resolve() / AUTH_DB
    return ("[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{database}\n"
            f"admin_username = {username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without a cache every request pays a PBKDF2 hash of the password (about 0.3 s of CPU);
            # rotation restarts the server, so a cached credential never outlives a secret.
            "auth_cache_ttl_seconds = 300\n")


def sync_admin(state_dir: str | Path, username: str, password: str) -> str:
    """Make the admin's stored password the secret: 'new' (no user database yet; the server creates the
    admin at start-up), 'unchanged', 'rotated' (the secret changed since the last start) or 'absent'
    (the database exists without that user; the server creates it)."""
    database = Path(state_dir).expanduser().resolve() / AUTH_DB
    if not database.exists():
        return "new"
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{database}")
    try:
        if not store.has_user(username, use_primary=True):
            return "absent"
        if store.authenticate_user(username, password, use_primary=True):
            return "unchanged"
        store.update_user(username, password=password)
        if not store.get_user(username).is_admin:
            store.update_user(username, is_admin=True)
        return "rotated"
    finally:
        store.engine.dispose()


def check_server_command(command: list[str]) -> list[str]:
    """The `mlflow server ...` argv to run; it must start MLflow's basic-auth app."""
    if len(command) < 2 or Path(command[0]).name != "mlflow" or command[1] != "server":
        raise AuthSetupError(f"expected `mlflow server ...` after --, got {' '.join(command[:2]) or 'nothing'!r}")
    args = command[2:]
    app = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--app-name"]
    app += [a.split("=", 1)[1] for a in args if a.startswith("--app-name=")]
    if app != [APP_NAME]:
        raise AuthSetupError(f"mlflow server --app-name = {app or 'not given'}: must be exactly once "
                             f"--app-name {APP_NAME} (this wrapper starts only an authenticated server)")
    return command


def server_environment(state_dir: str | Path, username: str, password: str,
                       base: dict[str, str] | None = None) -> dict[str, str]:
    """The server process's environment: the auth config, the admin credentials for the first start and
    a CSRF key derived from the secret (stable across restarts with the same secret)."""
    env = environment_snapshot() if base is None else dict(base)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(Path(state_dir).expanduser().resolve() / AUTH_INI)
    env["MLFLOW_AUTH_ADMIN_USERNAME"] = username
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = hmac.new(password.encode(), b"pir-at-ray mlflow csrf",
                                                     hashlib.sha256).hexdigest()
    # The server must not authenticate to itself with a client's credentials.
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    return env


def stop_previous(state_dir: str | Path, timeout: float = 20.0) -> bool:
    """Stop the server a previous `serve` in `state_dir` started (its process group), if it still runs;
    a restart (new secret, `ray up` again) would otherwise find the port taken. True if one was stopped."""
    pid_file = Path(state_dir).expanduser() / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        cmdline = b""
    if b"mlflow" not in cmdline:
        pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and _running(pid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def _running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie waiting for its parent counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def serve(secret_file: str | Path, state_dir: str | Path, command: list[str], username: str = DEFAULT_USERNAME):
    """Prepare the auth config and admin user in `state_dir`, then replace this process by the server."""
    command = check_server_command(command)
    password = read_secret(secret_file)
    if importlib.util.find_spec("flask_wtf") is None:
        raise AuthSetupError("MLflow's basic-auth app needs Flask-WTF, which `mlflow[auth]` brings: install this "
                             "project again (pip install -e .), its dependencies name mlflow[auth]")
    state = Path(state_dir).expanduser()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    ini = state / AUTH_INI
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(auth_config(state, username))
    if stop_previous(state):
        print("mlflow_auth: stopped the previous MLflow server", flush=True)
    status = sync_admin(state, username, password)
    print(f"mlflow_auth: admin user {username!r}: {status}; auth config {ini}", flush=True)
    env = server_environment(state, username, password)
    with contextlib.suppress(PermissionError):
        os.setsid()  # its own process group, so that stop_previous ends the server and its workers
    (state / PID_FILE).write_text(f"{os.getpid()}\n")
    os.execvpe(command[0], command, env)


def build_parser() -> argparse.ArgumentParser:
    """The command line: `new-secret PATH [--force]` and `serve --secret-file F --state-dir D -- mlflow server ...`."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.mlflow_auth", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    make = sub.add_parser("new-secret", help="write a new random secret file (mode 600)")
    make.add_argument("path")
    make.add_argument("--force", action="store_true", help="replace an existing secret (rotation)")
    run = sub.add_parser("serve", help="start `mlflow server --app-name basic-auth` with the secret as admin password")
    run.add_argument("--secret-file", required=True)
    run.add_argument("--state-dir", required=True, help="holds the auth ini, the user database and the server's pid")
    run.add_argument("--username", default=os.environ.get("MLFLOW_TRACKING_USERNAME") or DEFAULT_USERNAME)
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- mlflow server --app-name basic-auth ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "new-secret":
            path = new_secret(args.path, force=args.force)
            print(f"wrote a new secret to {path} (mode 600)")
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        serve(args.secret_file, args.state_dir, command, username=args.username)
    except AuthSetupError as exc:
        print(f"mlflow_auth: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
