"""build_model: the one entry point from the config's `model` section to a segmentation nn.Module."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from trainables.models.backbones import BACKBONES, CONVNEXTS, VITS, create_backbone
from trainables.models.checkpoints import load_model_weights
from trainables.models.segmentation import SegmentationModel, check_input_norm
from trainables.models.segmenter import MaskTransformerHead
from trainables.models.stems import STEMS
from trainables.models.upernet import AUX_STAGE, AUX_WEIGHT, FCNHead, UPerNetHead
from trainables.models.weights import load_backbone_weights

DECODERS = ("upernet", "segmenter")


class ModelSection(Protocol):
    """What build_from_config reads from the config's `model` section (orchestrator.config.ModelConfig)."""

    decoder: str
    backbone: str
    stem: str
    backbone_weights: str | None
    init: str
    decoder_width: int
    drop_path_rate: float
    weights: str | None
    input_norm: str
BACKBONES_BY_DECODER = {"upernet": CONVNEXTS, "segmenter": VITS}


def build_model(decoder: str, backbone: str, num_classes: int, stem: str = "patch",
                backbone_weights: str | None = None, *, decoder_width: int = 512,
                drop_path_rate: float = 0.0, weights: str | None = None,
                input_norm: str = "imagenet") -> SegmentationModel:
    """A segmentation model mapping images in [0, 1] (N x 3 x H x W) to logits N x num_classes x H x W.

    UPerNet carries the auxiliary FCN head (width decoder_width / 2, 256 for the paper's 512) used in training only.
    The model is randomly initialised (timm, never downloaded); then its backbone is loaded from
    `backbone_weights`, or the whole model from `weights` (published layout or this project's checkpoint, strictly;
    its recorded input normalisation replaces `input_norm`). `model.init_report` records what was loaded
    ({"source": "random"}, {"source": "checkpoint", uri, layout, loaded, missing, unexpected, ignored} or
    {"source": "weights", uri, layout, loaded, input_norm}).
    """
    if decoder not in DECODERS:
        raise ValueError(f"model.decoder = {decoder!r}: unknown decoder; valid: {', '.join(DECODERS)}")
    if backbone not in BACKBONES_BY_DECODER[decoder]:
        known = "" if backbone in BACKBONES else " unknown backbone;"
        raise ValueError(
            f"model.backbone = {backbone!r}:{known} decoder {decoder} takes "
            f"{', '.join(BACKBONES_BY_DECODER[decoder])}"
        )
    if stem not in STEMS:
        raise ValueError(f"model.stem = {stem!r}: must be one of {', '.join(STEMS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes = {num_classes!r}: must be an integer >= 2 (background included)")
    if decoder_width < 8:
        raise ValueError(f"model.decoder_width = {decoder_width}: must be >= 8")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"model.drop_path_rate = {drop_path_rate}: must be in [0, 1)")
    check_input_norm(input_norm)
    if weights and backbone_weights:
        raise ValueError(f"model.weights = {weights!r} loads the whole model; drop model.backbone_weights "
                         f"({backbone_weights!r}), which it would overwrite")
    encoder = create_backbone(backbone, stem, drop_path_rate)
    head: nn.Module
    aux: nn.Module | None = None
    if decoder == "upernet":
        head = UPerNetHead(encoder.channels, decoder_width, num_classes)
        aux = FCNHead(encoder.channels[AUX_STAGE], decoder_width // 2, num_classes)
    else:
        head = MaskTransformerHead(encoder.channels[-1], decoder_width, num_classes)
    model = SegmentationModel(encoder, head, decoder=decoder, backbone_name=backbone, stem=stem,
                              num_classes=num_classes, auxiliary_head=aux, aux_weight=AUX_WEIGHT,
                              input_norm=input_norm)
    if backbone_weights:
        model.init_report = {"source": "checkpoint", **load_backbone_weights(model, backbone_weights)}
    if weights:
        model.init_report = {"source": "weights", **load_model_weights(model, weights)}
    return model


def build_from_config(model_config: ModelSection, num_classes: int) -> SegmentationModel:
    """build_model from the config's `model` section; `init_report["init"]` records model.init (pir/clean/random)."""
    model = build_model(
        model_config.decoder, model_config.backbone, num_classes, model_config.stem, model_config.backbone_weights,
        decoder_width=model_config.decoder_width, drop_path_rate=model_config.drop_path_rate,
        weights=model_config.weights, input_norm=model_config.input_norm,
    )
    model.init_report = {"init": model_config.init, **model.init_report}
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
