"""PIR initialisation: read a (robust) ImageNet classifier checkpoint from a URI and load it into a backbone exactly.

Checkpoints are read with `torch.load(weights_only=True)` (or safetensors), so a file that carries pickled objects
other than tensors and plain containers is refused before anything in it runs. Published layouts are unwrapped
(`state_dict` / `model` entries, `module.` from DDP, a `normalize.*` input normaliser beside `model.*`), the
classifier head is dropped, and the rest must match the backbone key for key and shape for shape.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainables.models.backbones import family
from trainables.models.normalize import IMAGENET_MEAN, IMAGENET_STD

SCHEMES = ("file", "s3", "gs", "http", "https")
# Entries of a training checkpoint that hold the model's state dict, tried in this order.
STATE_ENTRIES = ("state_dict", "model")
# Whole-dict prefixes added by wrappers: DDP (`module.`), a normaliser wrapper (`model.`), torch.compile.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
NORMALIZER_PREFIX = "normalize."
# Classifier-only tensors, not part of a segmentation backbone.
HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")
# A classifier key `k` is the backbone key `CLASSIFIER_PREFIX + k`: every backbone keeps the classifier as `model`.
# The published CvSt stem keys `stem.stem.{0,1,3,4}.*` are ConvStem's own names, so they need no renaming.
CLASSIFIER_PREFIX = "model."
LISTED = 25


class BackboneWeightsError(ValueError):
    """A backbone checkpoint that cannot be used; the message names the URI and what is wrong."""


class BackboneWeightsNotFound(BackboneWeightsError, FileNotFoundError):
    """The backbone checkpoint URI points at nothing."""


def _where(uri: str, key: str = "model.backbone_weights") -> str:
    return f"{key} {uri}"


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def read_bytes(uri: str, key: str = "model.backbone_weights") -> bytes:
    """The raw bytes behind a local path, file://, s3://, gs://, http(s):// URI (remote ones via smart_open);
    errors name the config `key` the URI came from."""
    scheme = _scheme(uri)
    if scheme and scheme not in SCHEMES:
        raise BackboneWeightsError(
            f"{_where(uri, key)}: unsupported scheme {scheme}://; use a local path or one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if scheme in ("", "file"):
        path = uri[len("file://"):] if scheme == "file" else uri
        if not os.path.exists(path):
            raise BackboneWeightsNotFound(f"{_where(uri, key)}: not found (no file {os.path.abspath(path)})")
        if not os.path.isfile(path):
            raise BackboneWeightsError(f"{_where(uri, key)}: is a directory, expected a checkpoint file")
        with open(path, "rb") as handle:
            return handle.read()
    import smart_open

    try:
        with smart_open.open(uri, "rb", compression="disable") as handle:
            return handle.read()
    except Exception as exc:  # smart_open surfaces boto3/GCS/requests errors of many types
        detail = f"{type(exc).__name__}: {exc}".strip()
        if re.search(r"NoSuchKey|NoSuchBucket|Not ?Found|\b404\b|does not exist", detail, re.IGNORECASE):
            raise BackboneWeightsNotFound(f"{_where(uri, key)}: not found ({detail.splitlines()[0]})") from None
        raise BackboneWeightsError(f"{_where(uri, key)}: cannot be read ({detail.splitlines()[0]})") from None


def read_checkpoint(uri: str, key: str = "model.backbone_weights") -> Any:
    """Deserialise a checkpoint without running code: safetensors, or torch.load(weights_only=True)."""
    data = read_bytes(uri, key)
    if uri.lower().endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as exc:
            raise BackboneWeightsError(f"{_where(uri, key)}: not a safetensors file ({exc})") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if blocked:
            raise BackboneWeightsError(
                f"{_where(uri, key)}: refused, it holds a pickled object ({blocked.group(1)}) that could run code; "
                "nothing in it was run. Re-save only the tensors, e.g. torch.save(model.state_dict(), path), "
                "or use a .safetensors file"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        raise BackboneWeightsError(
            f"{_where(uri, key)}: not a PyTorch tensor checkpoint "
            f"({reason.group(1) if reason else 'unreadable pickle'})"
        ) from None
    except Exception as exc:
        raise BackboneWeightsError(
            f"{_where(uri, key)}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from None


def _check_normalizer(uri: str, normalizer: dict[str, torch.Tensor]) -> None:
    """A wrapped normaliser must be ImageNet's, because that is what the segmentation model applies."""
    for key, value in normalizer.items():
        name = key.rsplit(".", 1)[-1]
        expected = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}.get(name)
        if expected is None or value.numel() != 3:
            continue
        if not torch.allclose(value.flatten().float(), torch.tensor(expected), atol=1e-3):
            raise BackboneWeightsError(
                f"{_where(uri)}: its input normaliser {key} = {[round(v, 4) for v in value.flatten().tolist()]} "
                f"differs from the ImageNet {name} {[round(v, 4) for v in expected]} the model applies"
            )


def unwrap(checkpoint: Any, uri: str = "<checkpoint>") -> tuple[dict[str, torch.Tensor], str]:
    """(classifier state dict, layout description) from any published layout; BackboneWeightsError otherwise."""
    layout = []
    state = checkpoint
    while isinstance(state, Mapping):
        entry = next((e for e in STATE_ENTRIES if isinstance(state.get(e), Mapping)), None)
        if entry is None:
            break
        layout.append(entry)
        state = state[entry]
    if not isinstance(state, Mapping) or not state:
        raise BackboneWeightsError(f"{_where(uri)}: holds {type(checkpoint).__name__}, expected a state dict")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise BackboneWeightsError(
            f"{_where(uri)}: not a state dict, entries {', '.join(not_tensors[:10])} are not tensors; "
            f"expected a state dict, possibly under one of {', '.join(STATE_ENTRIES)}"
        )
    state = dict(state)
    normalizer: dict[str, torch.Tensor] = {}
    while True:
        for key in [k for k in state if k.startswith(NORMALIZER_PREFIX)]:
            normalizer[key] = state.pop(key)
        prefix = next((p for p in WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        layout.append("normalize+model." if normalizer and prefix == "model." else prefix)
        state = {k[len(prefix):]: v for k, v in state.items()}
    _check_normalizer(uri, normalizer)
    return state, "/".join(layout) or "plain"


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED]) + (f", ... and {len(keys) - LISTED} more" if len(keys) > LISTED else "")
    return f"{len(keys)} {title}: {shown}"


def _hints(state: Mapping[str, torch.Tensor], stem: str) -> list[str]:
    hints = []
    if stem == "patch" and any(k.startswith("stem.stem.") for k in state):
        hints.append("the checkpoint has the CvSt stem (stem.stem.*): set model.stem: cvst")
    if stem == "cvst" and "stem.0.weight" in state:
        hints.append("the checkpoint has the patchify stem (stem.0.*): set model.stem: patch")
    return hints


def load_backbone_weights(model: nn.Module, uri: str, *, max_mismatched: int = 0) -> dict[str, Any]:
    """Load a classifier checkpoint into `model.backbone`; returns {uri, layout, loaded, missing, unexpected, ignored}.

    Fails, listing the keys, if more than `max_mismatched` backbone tensors are missing, unexpected or of another
    shape (default 0: the backbone loads completely or not at all). The classifier head is ignored.
    """
    if not hasattr(model, "backbone") or not hasattr(model, "backbone_name"):
        raise TypeError(f"load_backbone_weights needs a model from build_model, got {type(model).__name__}")
    classifier, layout = unwrap(read_checkpoint(uri), uri)
    ignored = sorted(k for k in classifier if k.startswith(HEAD_PREFIXES))
    mapped = {CLASSIFIER_PREFIX + k: v for k, v in classifier.items() if k not in ignored}
    # the backbone's own per-stage output norms (segmentation only) are not part of a classifier
    expected = {k: v for k, v in model.backbone.state_dict().items() if k.startswith(CLASSIFIER_PREFIX)}
    strip = len(CLASSIFIER_PREFIX)
    missing = sorted(k[strip:] for k in expected if k not in mapped)
    unexpected = sorted(k[strip:] for k in mapped if k not in expected)
    reshaped = sorted(
        f"{k[strip:]} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in mapped.items() if k in expected and v.shape != expected[k].shape
    )
    if len(missing) + len(unexpected) + len(reshaped) > max_mismatched:
        problems = [
            _listing(title, keys)
            for title, keys in (("missing", missing), ("unexpected", unexpected),
                                ("with another shape (checkpoint vs model)", reshaped))
            if keys
        ]
        hints = _hints(classifier, model.stem_name)
        raise BackboneWeightsError(
            f"{_where(uri)}: does not fit backbone {model.backbone_name} (stem {model.stem_name}, "
            f"{family(model.backbone_name)} layout, {len(expected)} tensors); " + "; ".join(problems)
            + "".join(f". Hint: {h}" for h in hints)
        )
    usable = {k: v for k, v in mapped.items() if k in expected and v.shape == expected[k].shape}
    model.backbone.load_state_dict(usable, strict=False)
    return {
        "uri": uri,
        "layout": layout,
        "loaded": len(usable),
        "missing": len(missing),
        "unexpected": len(unexpected) + len(reshaped),
        "ignored": len(ignored),
    }
