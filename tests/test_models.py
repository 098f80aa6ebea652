"""Segmentation models: output sizes for every supported combination, the normalisation layer, bad input, sizes."""

from __future__ import annotations

import pytest
import torch

from trainables.models import (
    BACKBONES,
    BACKBONES_BY_DECODER,
    DECODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvStem,
    build_from_config,
    build_model,
    count_parameters,
)

SIZES = [(473, 473), (512, 512), (97, 131)]
SMALL_CONVNEXTS = ("convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano")

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _combinations():
    for backbone in BACKBONES_BY_DECODER["upernet"]:
        for stem in ("patch", "cvst"):
            yield "upernet", backbone, stem
    for backbone in BACKBONES_BY_DECODER["segmenter"]:
        yield "segmenter", backbone, "patch"


def _logits_shapes(model, sizes):
    model.eval()
    with torch.no_grad():
        return [tuple(model(torch.rand(1, 3, h, w)).shape) for h, w in sizes]


@pytest.mark.parametrize("decoder,backbone,stem", list(_combinations()))
def test_every_combination_gives_logits_of_the_input_size(decoder, backbone, stem):
    # A narrow decoder keeps this fast; the full 512-wide decoders are checked in the slow test below.
    width = 384 if decoder == "segmenter" else 32
    model = build_model(decoder, backbone, 7, stem, decoder_width=width)
    assert _logits_shapes(model, SIZES) == [(1, 7, h, w) for h, w in SIZES]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["convnext_tiny", "convnext_small"])
def test_recipe_sized_upernet_gives_logits_of_the_input_size(backbone):
    model = build_model("upernet", backbone, 21, "cvst", decoder_width=512)
    assert _logits_shapes(model, SIZES) == [(1, 21, h, w) for h, w in SIZES]


def test_first_layer_is_imagenet_normalisation():
    model = build_model("upernet", "convnext_atto", 3, decoder_width=16).eval()
    x = torch.rand(2, 3, 64, 96)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(IMAGENET_STD))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        by_hand = model.decode_head(model.backbone((x - mean) / std))
        by_hand = torch.nn.functional.interpolate(by_hand, size=(64, 96), mode="bilinear", align_corners=False)
        assert torch.allclose(model(x), by_hand, atol=1e-5)
    # Constants are not state: a segmentation checkpoint is parameters and BatchNorm statistics only.
    assert not any(k.startswith("normalize") for k in model.state_dict())


def test_every_pixel_of_an_odd_sized_input_gets_a_gradient():
    model = build_model("upernet", "convnext_atto", 4, "cvst", decoder_width=16).eval()
    x = torch.rand(1, 3, 97, 131, requires_grad=True)
    model(x).logsumexp(1).sum().backward()
    assert x.grad.shape == x.shape
    assert (x.grad.abs().sum(1) > 0).all(), "some input pixels (e.g. the last rows/columns) got no gradient"


def test_cvst_stem_replaces_patchify_stem_with_the_same_stride_and_channels():
    model = build_model("upernet", "convnext_tiny", 21, "cvst", decoder_width=16)
    stem = model.backbone.model.stem
    assert isinstance(stem, ConvStem)
    names = {k: tuple(v.shape) for k, v in stem.state_dict().items()}
    assert names == {
        "stem.0.weight": (48, 3, 3, 3), "stem.0.bias": (48,), "stem.1.weight": (48,), "stem.1.bias": (48,),
        "stem.3.weight": (96, 48, 3, 3), "stem.3.bias": (96,), "stem.4.weight": (96,), "stem.4.bias": (96,),
    }
    assert [type(m).__name__ for m in stem.stem] == ["Conv2d", "LayerNorm2d", "GELU", "Conv2d", "LayerNorm2d", "GELU"]
    with torch.no_grad():
        assert stem(torch.rand(1, 3, 64, 96)).shape == (1, 96, 16, 24)
    atto = build_model("upernet", "convnext_atto", 21, "cvst", decoder_width=16).backbone.model.stem
    assert atto.stem[0].out_channels == 20 and atto.stem[3].out_channels == 40


def test_parameter_counts_of_the_recipe_upernets():
    """UPerNet-ConvNeXt-T/-S with 512 decoder channels, 150 classes (ADE20K), auxiliary FCN head included.

    mmseg's configs report about 60M and 82M including their auxiliary FCN head (~0.9M), as ours; within 10%.
    """
    counts = {}
    for backbone, usual in (("convnext_tiny", 60e6), ("convnext_small", 82e6)):
        for stem in ("patch", "cvst"):
            model = build_model("upernet", backbone, 150, stem, decoder_width=512)
            total, encoder = count_parameters(model), count_parameters(model.backbone)
            counts[backbone, stem] = total
            print(f"UPerNet {backbone} stem={stem} width=512 K=150: {total / 1e6:.2f}M parameters "
                  f"(backbone {encoder / 1e6:.2f}M, decoder {(total - encoder) / 1e6:.2f}M; usual {usual / 1e6:.0f}M)")
            assert abs(total - usual) / usual < 0.10
    segmenter = build_model("segmenter", "vit_small_patch16_224", 150, decoder_width=384)
    print(f"Segmenter ViT-S/16 width=384 K=150: {count_parameters(segmenter) / 1e6:.2f}M parameters")
    assert counts["convnext_small", "cvst"] > counts["convnext_tiny", "cvst"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(decoder="fcn", backbone="convnext_tiny", num_classes=21), "valid: upernet, segmenter"),
        (dict(decoder="upernet", backbone="resnet50", num_classes=21),
         "unknown backbone; decoder upernet takes convnext_atto, convnext_femto"),
        (dict(decoder="segmenter", backbone="convnext_tiny", num_classes=21),
         "decoder segmenter takes vit_small_patch16_224"),
        (dict(decoder="upernet", backbone="convnext_tiny", num_classes=1), "num_classes = 1: must be an integer >= 2"),
        (dict(decoder="upernet", backbone="convnext_tiny", num_classes=0), "num_classes = 0"),
        (dict(decoder="upernet", backbone="convnext_tiny", num_classes=21, stem="conv"),
         "model.stem = 'conv': must be one of patch, cvst"),
        (dict(decoder="segmenter", backbone="vit_small_patch16_224", num_classes=21, stem="cvst"),
         "CvSt stem exists for ConvNeXt backbones only"),
        (dict(decoder="upernet", backbone="convnext_atto", num_classes=21, drop_path_rate=1.0),
         "model.drop_path_rate = 1.0: must be in [0, 1)"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError) as info:
        build_model(**kwargs)
    assert message in str(info.value)


def test_registry_is_consistent():
    assert set(DECODERS) == set(BACKBONES_BY_DECODER)
    assert set(BACKBONES) == {b for names in BACKBONES_BY_DECODER.values() for b in names}
    assert set(SMALL_CONVNEXTS) < set(BACKBONES_BY_DECODER["upernet"])


def test_wrong_input_shape_is_named():
    model = build_model("upernet", "convnext_atto", 3, decoder_width=16)
    with pytest.raises(ValueError, match=r"N x 3 x H x W.*\(3, 64, 64\)"):
        model(torch.rand(3, 64, 64))


def test_upernet_training_on_one_image_per_worker_is_refused_with_a_reason():
    model = build_model("upernet", "convnext_atto", 3, decoder_width=16).train()
    with pytest.raises(ValueError, match=r"needs >= 2 images per worker in training, got 1"):
        model(torch.rand(1, 3, 64, 64))
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_build_from_the_config_model_section_records_init():
    from orchestrator.config import ModelConfig

    config = ModelConfig(decoder="upernet", backbone="convnext_atto", stem="cvst", decoder_width=16)
    model = build_from_config(config, num_classes=4)
    assert model.init_report == {"init": "random", "source": "random"}
    assert (model.decoder_name, model.backbone_name, model.stem_name, model.num_classes) == (
        "upernet", "convnext_atto", "cvst", 4)
