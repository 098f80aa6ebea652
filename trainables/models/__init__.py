"""Segmentation models (UPerNet on ConvNeXt, Segmenter on ViT) and their PIR (robust ImageNet) initialisation."""

from trainables.models.backbones import BACKBONES, CONVNEXTS, VITS
from trainables.models.build import BACKBONES_BY_DECODER, DECODERS, build_from_config, build_model, count_parameters
from trainables.models.checkpoints import (
    ModelWeightsError,
    ModelWeightsNotFound,
    inspect_checkpoint,
    load_model_weights,
    read_model_checkpoint,
)
from trainables.models.normalize import IMAGENET_MEAN, IMAGENET_STD, ImageNetNormalize
from trainables.models.segmentation import INPUT_NORMS, SegmentationModel
from trainables.models.stems import STEMS, ConvStem
from trainables.models.weights import (
    BackboneWeightsError,
    BackboneWeightsNotFound,
    load_backbone_weights,
    read_checkpoint,
    unwrap,
)

__all__ = [
    "BACKBONES",
    "BACKBONES_BY_DECODER",
    "CONVNEXTS",
    "DECODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_NORMS",
    "STEMS",
    "VITS",
    "BackboneWeightsError",
    "BackboneWeightsNotFound",
    "ConvStem",
    "ImageNetNormalize",
    "ModelWeightsError",
    "ModelWeightsNotFound",
    "SegmentationModel",
    "build_from_config",
    "build_model",
    "count_parameters",
    "inspect_checkpoint",
    "load_backbone_weights",
    "load_model_weights",
    "read_model_checkpoint",
    "read_checkpoint",
    "unwrap",
]
