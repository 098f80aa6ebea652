"""Whole-model weights (`model.weights`): the published PIR-AT layout or this project's checkpoints, loaded strictly.

A checkpoint is read as backbone weights are (`weights_only`, every URI scheme; one that would run code is
refused). Accepted layouts: a published UPerNet-ConvNeXt state dict (`backbone.downsample_layers.*`,
`backbone.stages.*`, `backbone.norm0..3`, `decode_head.*`, `auxiliary_head.*`), a published Segmenter state dict
(`encoder.*`, `decoder.*`; the encoder's unused 1000-way head is left out and counted as ignored; its position
embeddings keep their own token grid), a training state of this project (`state.pt`: `model` plus
`model_config`), or a plain state dict of this project's model. Every tensor must be
used and every shape equal; otherwise the error lists the first mismatches in the checkpoint's own key names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainables.models.weights import BackboneWeightsError, BackboneWeightsNotFound, read_checkpoint

KEY = "model.weights"
LISTED = 8
# Published ConvNeXt key -> this project's (timm) key; the decode and auxiliary heads share their names.
PUBLISHED_BACKBONE = (
    (re.compile(r"^backbone\.downsample_layers\.0\.stem\.(\d+)\.(.+)$"), r"backbone.model.stem.stem.\1.\2"),
    (re.compile(r"^backbone\.downsample_layers\.0\.(\d+)\.(.+)$"), r"backbone.model.stem.\1.\2"),
    (re.compile(r"^backbone\.downsample_layers\.(\d+)\.(\d+)\.(.+)$"), r"backbone.model.stages.\1.downsample.\2.\3"),
    (re.compile(r"^backbone\.stages\.(\d+)\.(\d+)\.dwconv\.(.+)$"), r"backbone.model.stages.\1.blocks.\2.conv_dw.\3"),
    (re.compile(r"^backbone\.stages\.(\d+)\.(\d+)\.pwconv1\.(.+)$"), r"backbone.model.stages.\1.blocks.\2.mlp.fc1.\3"),
    (re.compile(r"^backbone\.stages\.(\d+)\.(\d+)\.pwconv2\.(.+)$"), r"backbone.model.stages.\1.blocks.\2.mlp.fc2.\3"),
    (re.compile(r"^backbone\.stages\.(\d+)\.(\d+)\.(norm\..+|gamma)$"), r"backbone.model.stages.\1.blocks.\2.\3"),
)
# Published Segmenter key prefix -> this project's; the encoder's 1000-way head is unused by the network.
PUBLISHED_SEGMENTER = (
    ("encoder.", "backbone.model."),
    ("decoder.proj_dec.", "decode_head.proj_in."),
    ("decoder.cls_emb", "decode_head.class_embed"),
    ("decoder.blocks.", "decode_head.blocks."),
    ("decoder.decoder_norm.", "decode_head.norm."),
    ("decoder.proj_patch", "decode_head.proj_patch"),
    ("decoder.proj_classes", "decode_head.proj_class"),
    ("decoder.mask_norm.", "decode_head.mask_norm."),
)
UNUSED_SEGMENTER = ("encoder.head.",)
POS_EMBED = "backbone.model.pos_embed"
# BatchNorm's step counter carries no weight; a checkpoint without it loads with zeros.
OPTIONAL_SUFFIX = ".num_batches_tracked"


class ModelWeightsError(BackboneWeightsError):
    """Whole-model weights that cannot be used; the message names the URI and what is wrong."""


class ModelWeightsNotFound(ModelWeightsError, FileNotFoundError):
    """The `model.weights` URI points at nothing."""


def read_model_checkpoint(uri: str) -> Any:
    """The deserialised checkpoint behind `uri` (safe loading), errors as ModelWeightsError/ModelWeightsNotFound."""
    try:
        return read_checkpoint(uri, KEY)
    except BackboneWeightsNotFound as exc:
        raise ModelWeightsNotFound(str(exc)) from None
    except BackboneWeightsError as exc:
        raise ModelWeightsError(str(exc)) from None


def _tensors(uri: str, state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not state:
        raise ModelWeightsError(f"{KEY} {uri}: holds {type(state).__name__}, expected a state dict of a whole model")
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelWeightsError(f"{KEY} {uri}: entries {', '.join(bad[:LISTED])} are not tensors; expected a state "
                                "dict of a whole model (or a training state with a `model` entry)")
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _published_name(key: str) -> str:
    for pattern, target in PUBLISHED_BACKBONE:
        if pattern.match(key):
            return pattern.sub(target, key)
    return key


def is_published(state: Mapping[str, Any]) -> bool:
    """True for the published UPerNet-ConvNeXt layout (its backbone keys differ from timm's)."""
    return any(k.startswith(("backbone.downsample_layers.", "backbone.stages.")) and not k.startswith(
        "backbone.model.") for k in state)


def inspect_checkpoint(checkpoint: Any, uri: str = "<checkpoint>") -> dict[str, Any]:
    """{state (project key -> tensor), names (project key -> checkpoint key), layout, input_norm, model_config,
    num_classes} of a whole-model checkpoint; input_norm and model_config are None where it records none."""
    model_config = None
    input_norm = None
    layout = "plain"
    state = checkpoint
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping) and "model_config" in state:
        model_config = dict(state["model_config"]) if isinstance(state["model_config"], Mapping) else None
        input_norm = (model_config or {}).get("input_norm", "imagenet")
        layout, state = "project training state", state["model"]
    elif isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        layout, state = "state_dict", state["state_dict"]
    tensors = _tensors(uri, state)
    ignored: list[str] = []
    if any(k.startswith("encoder.") for k in tensors) and any(k.startswith("decoder.") for k in tensors):
        ignored = sorted(k for k in tensors if k.startswith(UNUSED_SEGMENTER))
        names = {_segmenter_name(k): k for k in tensors if k not in ignored}
        state = {p: tensors[k] for p, k in names.items()}
        return {"state": state, "names": names, "layout": "published segmenter", "input_norm": "none",
                "model_config": None, "num_classes": _classes(state), "ignored": ignored}
    if is_published(tensors):
        names = {_published_name(k): k for k in tensors}
        return {"state": {p: tensors[k] for p, k in names.items()}, "names": names, "layout": "published",
                "input_norm": "none", "model_config": None, "num_classes": _classes(tensors), "ignored": ignored}
    return {"state": tensors, "names": {k: k for k in tensors}, "layout": layout, "input_norm": input_norm,
            "model_config": model_config, "num_classes": _classes(tensors), "ignored": ignored}


def _segmenter_name(key: str) -> str:
    for prefix, target in PUBLISHED_SEGMENTER:
        if key.startswith(prefix):
            return target + key[len(prefix):]
    return key


def _classes(state: Mapping[str, torch.Tensor]) -> int | None:
    weight = state.get("decode_head.classifier.weight")
    if weight is None:
        weight = state.get("decode_head.class_embed")
        return int(weight.shape[1]) if weight is not None and weight.ndim == 3 else None
    return int(weight.shape[0])


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED]) + (f" (+{len(keys) - LISTED} more)" if len(keys) > LISTED else "")
    return f"{len(keys)} {title}: {shown}"


def load_model_weights(model: nn.Module, uri: str, checkpoint: Any | None = None) -> dict[str, Any]:
    """Load every tensor of a whole-model checkpoint into `model` (from build_model), strictly, and set the model's
    input normalisation to what the checkpoint records; returns {uri, layout, loaded, input_norm}."""
    info = inspect_checkpoint(read_model_checkpoint(uri) if checkpoint is None else checkpoint, uri)
    state, names = info["state"], info["names"]
    classes = info["num_classes"]
    if classes is not None and classes != model.num_classes:
        raise ModelWeightsError(
            f"{KEY} {uri}: the checkpoint has {classes} classes (its classifier), the model {model.num_classes} "
            f"(the dataset's class count); use a checkpoint trained on this dataset"
        )
    own = model.state_dict()
    if info["layout"] == "published":  # the published pointwise Linear layers in a 1x1-conv MLP (small ConvNeXts)
        state = {k: v.view(own[k].shape) if k in own and own[k].shape == v.shape + (1, 1) else v
                 for k, v in state.items()}
    pos = state.get(POS_EMBED)
    if pos is not None and POS_EMBED in own and pos.shape != own[POS_EMBED].shape and pos.ndim == 3 \
            and pos.shape[0] == 1 and pos.shape[2] == own[POS_EMBED].shape[2] and _square(pos.shape[1] - 1):
        # the ViT's position embeddings on the checkpoint's own token grid (trained at its crop size)
        model.backbone.model.pos_embed = nn.Parameter(torch.zeros_like(pos))
        own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith(OPTIONAL_SUFFIX))
    unexpected = sorted(names[k] for k in state if k not in own)
    reshaped = sorted(f"{names[k]} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                      for k, v in state.items() if k in own and v.shape != own[k].shape)
    if missing or unexpected or reshaped:
        problems = [_listing(title, keys) for title, keys in (
            ("missing", missing), ("unexpected", unexpected), ("with another shape (checkpoint vs model)", reshaped),
        ) if keys]
        raise ModelWeightsError(
            f"{KEY} {uri}: its layout ({info['layout']}) matches no supported model of decoder "
            f"{model.decoder_name}, backbone {model.backbone_name}, stem {model.stem_name}, {model.num_classes} "
            "classes; " + "; ".join(problems)
        )
    full = {k: state.get(k, torch.zeros_like(v)) for k, v in own.items()}
    model.load_state_dict(full, strict=True)
    if info["input_norm"] is not None:
        model.input_norm = info["input_norm"]
    return {"uri": uri, "layout": info["layout"], "loaded": len(state), "ignored": len(info["ignored"]),
            "input_norm": model.input_norm}


def _square(tokens: int) -> bool:
    return tokens > 0 and math.isqrt(tokens) ** 2 == tokens
