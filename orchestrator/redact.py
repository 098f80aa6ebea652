"""Credentials never leave the process: what goes to MLflow (params, tags, run names, text artifacts) and to
log lines passes through `redact` first.

Three rules, applied to every string: `scheme://user:password@host` loses its user info, the values of
credential query parameters (X-Amz-Signature, token=, key=, sig=, ...) become `***`, and the value of any
secret-named environment variable (MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN, ...)
becomes `***` wherever it appears. In mappings, the value of a secret-named key (`*key*`, `*secret*`,
`*token*`, `*password*`, ...) becomes `***` whatever it is.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"
# A key (config path, param, tag, environment variable) naming a secret contains one of these, any case.
SECRET_KEY_WORDS = ("key", "secret", "token", "password", "passwd", "credential")
# Environment variables that name a secret but hold a location or a switch, not the secret itself
# (RAY_AUTH_TOKEN_PATH, MLFLOW_AUTH_CONFIG_PATH, GOOGLE_APPLICATION_CREDENTIALS is a file path).
_LOCATION_SUFFIXES = ("_PATH", "_FILE", "_DIR", "_MODE")
_LOCATION_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS",)
# Shorter environment values are not searched for: they match ordinary words ("testing", "true").
MIN_SECRET_CHARS = 8

# Query parameters whose values are credentials (S3/GCS/Azure presigned URLs, tokens, keys).
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;][^=&#;\s]*(?:signature|credential|token|key|secret|password|passwd|sig|auth)[^=&#;\s]*=)"
    r"[^&#;\s]*",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/?#@\s]+@")


def is_secret_key(key: str) -> bool:
    """Whether a config/param/tag key or an environment variable name names a secret."""
    lowered = str(key).lower()
    return any(word in lowered for word in SECRET_KEY_WORDS)


def environment_snapshot(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment that another thread may be changing (MLflow's telemetry thread sets and removes
    _MLFLOW_TELEMETRY_SESSION_ID): a variable removed between listing the names and reading it is left out, where
    `dict(os.environ)` and `os.environ.items()` raise KeyError."""
    environ = os.environ if environ is None else environ
    values = ((name, environ.get(name)) for name in list(environ))
    return {name: value for name, value in values if value is not None}


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of secret-named environment variables (longest first), which must appear nowhere."""
    values = {value for name, value in environment_snapshot(environ).items()
              if is_secret_key(name) and not name.upper().endswith(_LOCATION_SUFFIXES)
              and name.upper() not in _LOCATION_NAMES and len(value.strip()) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def redact(value: Any, secrets: Iterable[str] | None = None) -> str:
    """Text without credentials: `scheme://user:pass@host` -> `scheme://***@host`, credential query values
    (X-Amz-Signature=, token=, key=, sig=, ...) -> ***, and each of `secrets` (by default the values of
    secret-named environment variables) -> *** wherever it occurs."""
    text = str(value)
    for secret in environment_secrets() if secrets is None else secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group('name')}{REDACTED}", text)


def say(message: str) -> None:
    """A progress line for the user, on stderr, with any credential in it redacted."""
    print(redact(message), file=sys.stderr, flush=True)


def redact_tree(tree: Any) -> Any:
    """A copy of a nested mapping/list with secret-named keys' values as *** and every string redacted."""
    if isinstance(tree, Mapping):
        return {k: (REDACTED if is_secret_key(str(k)) and v is not None else redact_tree(v)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_tree(v) for v in tree]
    if isinstance(tree, str):
        return redact(tree)
    return tree


def redact_pair(key: str, value: Any) -> str:
    """A param or tag value as it may be logged: *** under a secret-named key, else the redacted text."""
    if is_secret_key(key) and value not in (None, "", "None"):
        return REDACTED
    return redact(value)


class RedactingClient:
    """An MlflowClient whose outgoing params, tags, run names and text artifacts pass through the rules
    above: the last gate before MLflow, whichever code path produced the value. Everything else
    (metrics, figures, searches, run status) goes straight to the wrapped client."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None, **kwargs):
        tags = {k: redact_pair(k, v) for k, v in (tags or {}).items()}
        return self._client.create_run(experiment_id, start_time=start_time, tags=tags,
                                       run_name=None if run_name is None else redact(run_name), **kwargs)

    def log_param(self, run_id, key, value, **kwargs):
        return self._client.log_param(run_id, key, redact_pair(key, value), **kwargs)

    def set_tag(self, run_id, key, value, **kwargs):
        return self._client.set_tag(run_id, key, redact_pair(key, value), **kwargs)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        from mlflow.entities import Param, RunTag

        params = [Param(p.key, redact_pair(p.key, p.value)) for p in params]
        tags = [RunTag(t.key, redact_pair(t.key, t.value)) for t in tags]
        return self._client.log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    def log_text(self, run_id, text, artifact_file):
        return self._client.log_text(run_id, redact(text), artifact_file)

    def log_dict(self, run_id, dictionary, artifact_file):
        return self._client.log_dict(run_id, redact_tree(dictionary), artifact_file)
