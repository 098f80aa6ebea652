"""The published PIR-AT UPerNet checkpoints load into build_model(weights=...) and give the paper's logits.

The state dict and the forward below are written from the facts of issue 14 (and docs/ALGORITHMS), not from the
project's model code: key names and shapes of the published layout, a channels-first LayerNorm (eps 1e-6) on each
stage's output, the CvSt stem, UPerNet with pyramid pooling (1, 2, 3, 6), top-down sums, no dropout, BatchNorm eps
1e-5, inputs in [0, 1] with no normalisation and no padding, bilinear upsampling (align_corners=False).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainables.models import ModelWeightsError, ModelWeightsNotFound, build_model

from .conftest import TINY_CONFIG

pytestmark = [pytest.mark.realpath, pytest.mark.usefixtures("two_torch_threads")]

TINY = {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768), "width": 512, "aux_width": 256}
# The same layout scaled down (convnext_atto's stages) so the fast test runs in a few seconds.
ATTO = {"depths": (2, 2, 6, 2), "dims": (40, 80, 160, 320), "width": 32, "aux_width": 16}


def published_state(spec: dict, classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A published-layout UPerNet-ConvNeXt-CvSt state dict with every tensor random (statistics, affines, gammas)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, fan_in=None):
        fan_in = fan_in or (shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1))
        return torch.randn(*shape, generator=g) / fan_in**0.5

    def affine(prefix, c):
        return {f"{prefix}.weight": 1 + 0.2 * torch.randn(c, generator=g),
                f"{prefix}.bias": 0.1 * torch.randn(c, generator=g)}

    def cbr(prefix, cin, cout, k):
        out = {f"{prefix}.conv.weight": w(cout, cin, k, k), **affine(f"{prefix}.batch_norm", cout)}
        out[f"{prefix}.batch_norm.running_mean"] = 0.1 * torch.randn(cout, generator=g)
        out[f"{prefix}.batch_norm.running_var"] = 0.5 + torch.rand(cout, generator=g)
        out[f"{prefix}.batch_norm.num_batches_tracked"] = torch.tensor(1000)
        return out

    dims, width = spec["dims"], spec["width"]
    s: dict[str, torch.Tensor] = {}
    half = dims[0] // 2
    s["backbone.downsample_layers.0.stem.0.weight"] = w(half, 3, 3, 3)
    s["backbone.downsample_layers.0.stem.0.bias"] = 0.1 * torch.randn(half, generator=g)
    s.update(affine("backbone.downsample_layers.0.stem.1", half))
    s["backbone.downsample_layers.0.stem.3.weight"] = w(dims[0], half, 3, 3)
    s["backbone.downsample_layers.0.stem.3.bias"] = 0.1 * torch.randn(dims[0], generator=g)
    s.update(affine("backbone.downsample_layers.0.stem.4", dims[0]))
    for i in range(1, 4):
        s.update(affine(f"backbone.downsample_layers.{i}.0", dims[i - 1]))
        s[f"backbone.downsample_layers.{i}.1.weight"] = w(dims[i], dims[i - 1], 2, 2)
        s[f"backbone.downsample_layers.{i}.1.bias"] = 0.1 * torch.randn(dims[i], generator=g)
    for i, depth in enumerate(spec["depths"]):
        c = dims[i]
        for k in range(depth):
            p = f"backbone.stages.{i}.{k}"
            s[f"{p}.dwconv.weight"] = w(c, 1, 7, 7)
            s[f"{p}.dwconv.bias"] = 0.1 * torch.randn(c, generator=g)
            s.update(affine(f"{p}.norm", c))
            s[f"{p}.pwconv1.weight"] = w(4 * c, c)
            s[f"{p}.pwconv1.bias"] = 0.1 * torch.randn(4 * c, generator=g)
            s[f"{p}.pwconv2.weight"] = w(c, 4 * c)
            s[f"{p}.pwconv2.bias"] = 0.1 * torch.randn(c, generator=g)
            s[f"{p}.gamma"] = 0.5 * torch.rand(c, generator=g)
        s.update(affine(f"backbone.norm{i}", c))
    for j in range(4):
        s.update(cbr(f"decode_head.psp_modules.{j}.1", dims[3], width, 1))
    s.update(cbr("decode_head.bottleneck", dims[3] + 4 * width, width, 3))
    for j in range(3):
        s.update(cbr(f"decode_head.lateral_convs.{j}", dims[j], width, 1))
        s.update(cbr(f"decode_head.fpn_convs.{j}", width, width, 3))
    s.update(cbr("decode_head.fpn_bottleneck", 4 * width, width, 3))
    s["decode_head.classifier.weight"] = w(classes, width, 1, 1)
    s["decode_head.classifier.bias"] = 0.1 * torch.randn(classes, generator=g)
    s.update(cbr("auxiliary_head.convs.0", dims[2], spec["aux_width"], 3))
    s["auxiliary_head.classifier.weight"] = w(classes, spec["aux_width"], 1, 1)
    s["auxiliary_head.classifier.bias"] = 0.1 * torch.randn(classes, generator=g)
    return s


def reference_forward(s: dict[str, torch.Tensor], spec: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits of the published network, eval mode, written from the facts alone."""

    def ln_cf(t, p):  # channels-first LayerNorm, eps 1e-6
        mu = t.mean(1, keepdim=True)
        var = (t - mu).pow(2).mean(1, keepdim=True)
        return s[f"{p}.weight"][:, None, None] * (t - mu) / torch.sqrt(var + 1e-6) + s[f"{p}.bias"][:, None, None]

    def cbr(t, p, k):
        t = F.conv2d(t, s[f"{p}.conv.weight"], padding=k // 2)
        t = F.batch_norm(t, s[f"{p}.batch_norm.running_mean"], s[f"{p}.batch_norm.running_var"],
                         s[f"{p}.batch_norm.weight"], s[f"{p}.batch_norm.bias"], training=False, eps=1e-5)
        return F.relu(t)

    def up(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    stem = "backbone.downsample_layers.0.stem"
    h = F.conv2d(x, s[f"{stem}.0.weight"], s[f"{stem}.0.bias"], stride=2, padding=1)
    h = F.gelu(ln_cf(h, f"{stem}.1"))
    h = F.conv2d(h, s[f"{stem}.3.weight"], s[f"{stem}.3.bias"], stride=2, padding=1)
    h = F.gelu(ln_cf(h, f"{stem}.4"))
    features = []
    for i, depth in enumerate(spec["depths"]):
        if i:
            h = ln_cf(h, f"backbone.downsample_layers.{i}.0")
            d = f"backbone.downsample_layers.{i}.1"
            h = F.conv2d(h, s[f"{d}.weight"], s[f"{d}.bias"], stride=2)
        c = spec["dims"][i]
        for k in range(depth):
            p = f"backbone.stages.{i}.{k}"
            r = F.conv2d(h, s[f"{p}.dwconv.weight"], s[f"{p}.dwconv.bias"], padding=3, groups=c).permute(0, 2, 3, 1)
            r = F.layer_norm(r, (c,), s[f"{p}.norm.weight"], s[f"{p}.norm.bias"], eps=1e-6)
            r = F.linear(F.gelu(F.linear(r, s[f"{p}.pwconv1.weight"], s[f"{p}.pwconv1.bias"])),
                         s[f"{p}.pwconv2.weight"], s[f"{p}.pwconv2.bias"])
            h = h + (s[f"{p}.gamma"] * r).permute(0, 3, 1, 2)
        features.append(ln_cf(h, f"backbone.norm{i}"))
    top = features[3]
    pooled = [up(cbr(F.adaptive_avg_pool2d(top, scale), f"decode_head.psp_modules.{j}.1", 1), top.shape[-2:])
              for j, scale in enumerate((1, 2, 3, 6))]
    levels = [cbr(features[j], f"decode_head.lateral_convs.{j}", 1) for j in range(3)]
    levels.append(cbr(torch.cat([top, *pooled], 1), "decode_head.bottleneck", 3))
    for j in (3, 2, 1):
        levels[j - 1] = levels[j - 1] + up(levels[j], levels[j - 1].shape[-2:])
    outs = [cbr(levels[j], f"decode_head.fpn_convs.{j}", 3) for j in range(3)] + [levels[3]]
    fused = cbr(torch.cat([outs[0]] + [up(o, outs[0].shape[-2:]) for o in outs[1:]], 1),
                "decode_head.fpn_bottleneck", 3)
    logits = F.conv2d(fused, s["decode_head.classifier.weight"], s["decode_head.classifier.bias"])
    return up(logits, x.shape[-2:])


def _check(tmp_path, backbone: str, spec: dict, classes: int, sizes) -> None:
    state = published_state(spec, classes)
    path = tmp_path / "published.pth"
    torch.save(state, path)
    model = build_model("upernet", backbone, classes, "cvst", decoder_width=spec["width"], weights=str(path)).eval()
    assert model.init_report["layout"] == "published"
    assert model.input_norm == "none"
    assert model.init_report["loaded"] == len(state)
    for n, (h, w) in enumerate(sizes):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ours, theirs = model(x), reference_forward(state, spec, x)
        assert ours.shape == (1, classes, h, w)
        assert theirs.abs().max() > 0.5 and theirs.std() > 0.1, "logits too flat for the comparison to mean anything"
        diff = (ours - theirs).abs().max().item()
        print(f"{backbone} {h}x{w}: max |ours - independent| = {diff:.2e} (logit std {theirs.std():.2f})")
        assert diff < 1e-4


@pytest.mark.slow
def test_published_convnext_tiny_upernet_logits_match_an_independent_forward_at_512_and_473(tmp_path):
    _check(tmp_path, "convnext_tiny", TINY, 21, [(512, 512), (473, 473)])


def test_published_layout_scaled_down_matches_on_odd_sizes(tmp_path):
    _check(tmp_path, "convnext_atto", ATTO, 5, [(97, 131), (64, 64)])


def test_a_missing_or_unexpected_key_is_listed(tmp_path):
    state = published_state(ATTO, 5)
    del state["backbone.norm2.weight"]
    state["decode_head.conv_seg.weight"] = torch.zeros(5, 32, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ModelWeightsError) as info:
        build_model("upernet", "convnext_atto", 5, "cvst", decoder_width=32, weights=str(tmp_path / "bad.pth"))
    message = str(info.value)
    assert "model.weights" in message and "matches no supported model" in message
    assert "1 missing: backbone.norm2.weight" in message
    assert "1 unexpected: decode_head.conv_seg.weight" in message


def test_a_class_count_other_than_the_models_is_named(tmp_path):
    torch.save(published_state(ATTO, 5), tmp_path / "k5.pth")
    with pytest.raises(ModelWeightsError, match=r"checkpoint has 5 classes .*the model 7"):
        build_model("upernet", "convnext_atto", 7, "cvst", decoder_width=32, weights=str(tmp_path / "k5.pth"))


def test_weights_that_do_not_exist_or_would_run_code_are_refused(tmp_path):
    with pytest.raises(ModelWeightsNotFound, match=r"model\.weights .*nope\.pth: not found"):
        build_model("upernet", "convnext_atto", 5, "cvst", decoder_width=32, weights=str(tmp_path / "nope.pth"))
    torch.save({"decode_head.classifier.weight": torch.zeros(5, 32, 1, 1), "evil": ModelWeightsError("x")},
               tmp_path / "code.pth")
    with pytest.raises(ModelWeightsError, match=r"model\.weights .*refused, it holds a pickled object"):
        build_model("upernet", "convnext_atto", 5, "cvst", decoder_width=32, weights=str(tmp_path / "code.pth"))


def test_own_checkpoint_round_trips_with_its_input_normalisation(tmp_path):
    model = build_model("upernet", "convnext_atto", 4, "cvst", decoder_width=16, input_norm="none").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    config = {"decoder": "upernet", "backbone": "convnext_atto", "stem": "cvst", "input_norm": "none"}
    torch.save({"model": model.state_dict(), "model_config": config, "epoch": 3}, tmp_path / "state.pt")
    loaded = build_model("upernet", "convnext_atto", 4, "cvst", decoder_width=16, weights=str(tmp_path / "state.pt"))
    assert loaded.init_report["layout"] == "project training state"
    assert loaded.input_norm == "none"
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


VIT_S = {"dim": 384, "depth": 12, "heads": 6, "decoder_depth": 2}


def published_segmenter_state(classes: int, grid: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    """A published-layout Segmenter ViT-S/16 state dict (encoder.*, decoder.*), every tensor random; the encoder's
    position embeddings on a grid x grid token grid (32: trained at 512) and its unused 1000-way head included."""
    g = torch.Generator().manual_seed(seed)
    d = VIT_S["dim"]

    def lin(prefix, cout, cin):
        return {f"{prefix}.weight": torch.randn(cout, cin, generator=g) / cin**0.5,
                f"{prefix}.bias": 0.1 * torch.randn(cout, generator=g)}

    def ln(prefix, c):
        return {f"{prefix}.weight": 1 + 0.2 * torch.randn(c, generator=g),
                f"{prefix}.bias": 0.1 * torch.randn(c, generator=g)}

    def block(prefix):
        return {**ln(f"{prefix}.norm1", d), **lin(f"{prefix}.attn.qkv", 3 * d, d), **lin(f"{prefix}.attn.proj", d, d),
                **ln(f"{prefix}.norm2", d), **lin(f"{prefix}.mlp.fc1", 4 * d, d), **lin(f"{prefix}.mlp.fc2", d, 4 * d)}

    s = {"encoder.patch_embed.proj.weight": torch.randn(d, 3, 16, 16, generator=g) / (3 * 256) ** 0.5,
         "encoder.patch_embed.proj.bias": 0.1 * torch.randn(d, generator=g),
         "encoder.cls_token": 0.5 * torch.randn(1, 1, d, generator=g),
         "encoder.pos_embed": 0.5 * torch.randn(1, grid * grid + 1, d, generator=g)}
    for i in range(VIT_S["depth"]):
        s.update(block(f"encoder.blocks.{i}"))
    s.update(ln("encoder.norm", d))
    s.update(lin("encoder.head", 1000, d))
    s.update(lin("decoder.proj_dec", d, d))
    s["decoder.cls_emb"] = torch.randn(1, classes, d, generator=g)
    for i in range(VIT_S["decoder_depth"]):
        s.update(block(f"decoder.blocks.{i}"))
    s.update(ln("decoder.decoder_norm", d))
    s["decoder.proj_patch"] = torch.randn(d, d, generator=g) / d**0.5
    s["decoder.proj_classes"] = torch.randn(d, d, generator=g) / d**0.5
    s.update(ln("decoder.mask_norm", classes))
    return s


def segmenter_reference_forward(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of the published Segmenter, eval mode, from the facts: zero-pad to 16, class token first, position
    embeddings resized bilinearly only when the grid differs, LayerNorm eps 1e-5, class embeddings after the patch
    tokens, cosine masks then LayerNorm over classes, upsample to the padded size, crop."""
    d, heads = VIT_S["dim"], VIT_S["heads"]

    def ln(t, p):
        return F.layer_norm(t, (t.shape[-1],), s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-5)

    def lin(t, p):
        return F.linear(t, s[f"{p}.weight"], s[f"{p}.bias"])

    def block(t, p):
        b, n, _ = t.shape
        qkv = lin(ln(t, f"{p}.norm1"), f"{p}.attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
        t = t + lin((attn @ qkv[2]).transpose(1, 2).reshape(b, n, d), f"{p}.attn.proj")
        return t + lin(F.gelu(lin(ln(t, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")

    height, width = x.shape[-2:]
    padded = F.pad(x, (0, (-width) % 16, 0, (-height) % 16))
    t = F.conv2d(padded, s["encoder.patch_embed.proj.weight"], s["encoder.patch_embed.proj.bias"], stride=16)
    gh, gw = t.shape[-2:]
    t = torch.cat([s["encoder.cls_token"].expand(x.shape[0], -1, -1), t.flatten(2).transpose(1, 2)], 1)
    pos = s["encoder.pos_embed"]
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if (side, side) != (gh, gw):
        grid = F.interpolate(pos[:, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2), size=(gh, gw),
                             mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], 1)
    t = t + pos
    for i in range(VIT_S["depth"]):
        t = block(t, f"encoder.blocks.{i}")
    t = ln(t, "encoder.norm")[:, 1:]
    classes = s["decoder.cls_emb"].shape[1]
    t = torch.cat([lin(t, "decoder.proj_dec"), s["decoder.cls_emb"].expand(x.shape[0], -1, -1)], 1)
    for i in range(VIT_S["decoder_depth"]):
        t = block(t, f"decoder.blocks.{i}")
    t = ln(t, "decoder.decoder_norm")
    patches, cls = t[:, :-classes] @ s["decoder.proj_patch"], t[:, -classes:] @ s["decoder.proj_classes"]
    patches = patches / patches.norm(dim=-1, keepdim=True)
    cls = cls / cls.norm(dim=-1, keepdim=True)
    masks = ln(patches @ cls.transpose(1, 2), "decoder.mask_norm")
    masks = masks.transpose(1, 2).reshape(x.shape[0], classes, gh, gw)
    masks = F.interpolate(masks, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return masks[..., :height, :width]


@pytest.mark.slow
def test_published_segmenter_logits_match_an_independent_forward_at_512_and_473(tmp_path):
    state = published_segmenter_state(151)
    torch.save(state, tmp_path / "segmenter.pth")
    model = build_model("segmenter", "vit_small_patch16_224", 151, decoder_width=384,
                        weights=str(tmp_path / "segmenter.pth")).eval()
    report = model.init_report
    assert (report["layout"], report["ignored"], model.input_norm) == ("published segmenter", 2, "none")
    assert report["loaded"] == len(state) - 2
    for n, size in enumerate((512, 473)):
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ours, theirs = model(x), segmenter_reference_forward(state, x)
        assert ours.shape == (1, 151, size, size)
        assert theirs.std() > 0.3, "logits too flat for the comparison to mean anything"
        diff = (ours - theirs).abs().max().item()
        print(f"segmenter {size}x{size}: max |ours - independent| = {diff:.2e} (logit std {theirs.std():.2f})")
        assert diff < 1e-4


def test_pir_at_training_adds_the_auxiliary_loss_with_weight_0_4():
    from orchestrator.config import load_config
    from trainables.pir_at import PhaseClock, PirAt

    config = load_config(TINY_CONFIG, ["train.attack.steps=0", "model.decoder_width=16"])
    trainer = PirAt(config.train, config.model, 21, steps_per_epoch=4)
    model = trainer.module
    assert model.auxiliary_head is not None and model.aux_weight == 0.4
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 21, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    y[:, :4] = 255
    model.train()
    with torch.no_grad():
        logits, aux = model(x, with_aux=True)
    main = F.cross_entropy(logits, y, ignore_index=255)
    expected = main + 0.4 * F.cross_entropy(aux, y, ignore_index=255)
    assert aux.shape == logits.shape == (2, 21, 64, 64)
    assert abs(float(expected - main)) > 0.1, "the auxiliary term is too small for the check to mean anything"
    before = {k: v.clone() for k, v in model.auxiliary_head.state_dict().items() if v.is_floating_point()}
    loss, _ = trainer.step(x, y, PhaseClock(torch.device("cpu")))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in model.auxiliary_head.state_dict().items() if k in before)
