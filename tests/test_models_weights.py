"""PIR initialisation: published layouts load exactly, from paths and URIs; unsafe or wrong ones fail loudly."""

from __future__ import annotations

import functools
import http.server
import io
import os
import pickle
import threading

import pytest
import timm
import torch

from orchestrator.config import ModelConfig
from trainables.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneWeightsError,
    BackboneWeightsNotFound,
    build_from_config,
    build_model,
    load_backbone_weights,
)
from trainables.models.stems import set_convnext_stem


@pytest.fixture(scope="module")
def tiny_cvst_classifier() -> dict[str, torch.Tensor]:
    """The state dict of a (random) timm ConvNeXt-T ImageNet classifier with the CvSt stem, head included."""
    torch.manual_seed(1)
    net = timm.create_model("convnext_tiny", pretrained=False, num_classes=1000)
    set_convnext_stem(net, "cvst")
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _published(state: dict[str, torch.Tensor], layout: str):
    if layout == "plain":
        return state
    if layout == "module":
        return {f"module.{k}": v for k, v in state.items()}
    if layout == "normalize":
        wrapped = {
            "normalize.mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
            "normalize.std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
        }
        wrapped.update({f"model.{k}": v for k, v in state.items()})
        return {"state_dict": wrapped}
    if layout == "model_entry":
        return {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 300, "arch": "convnext_tiny"}
    raise AssertionError(layout)


def _assert_backbone_equals(model, classifier: dict[str, torch.Tensor]):
    backbone = model.backbone.state_dict()
    expected = {f"model.{k}": v for k, v in classifier.items() if not k.startswith("head.")}
    # beside the classifier's tensors the backbone has only its per-stage output norms (segmentation only)
    stage_norms = {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")} if model.decoder_name == "upernet" \
        else set()
    assert set(backbone) == set(expected) | stage_norms, "backbone and checkpoint disagree on the tensor names"
    for key, value in expected.items():
        assert torch.equal(backbone[key], value), key


@pytest.mark.parametrize("layout", ["plain", "module", "normalize", "model_entry"])
def test_published_layouts_load_tensor_for_tensor(tmp_path, tiny_cvst_classifier, layout):
    path = tmp_path / f"{layout}.pt"
    torch.save(_published(tiny_cvst_classifier, layout), path)
    model = build_model(decoder="upernet", backbone="convnext_tiny", stem="cvst", num_classes=21,
                        backbone_weights=str(path))
    _assert_backbone_equals(model, tiny_cvst_classifier)
    report = model.init_report
    assert report["source"] == "checkpoint" and report["uri"] == str(path)
    classifier_part = len(model.backbone.model.state_dict())
    assert (report["loaded"], report["missing"], report["unexpected"]) == (classifier_part, 0, 0)
    assert report["ignored"] == 4  # head.norm.{weight,bias}, head.fc.{weight,bias}
    assert report["layout"] == {"plain": "plain", "module": "module.", "normalize": "state_dict/normalize+model.",
                                "model_entry": "model/module."}[layout]


def test_file_uri_and_s3_uri_load_tensor_for_tensor(tmp_path, tiny_cvst_classifier, s3_bucket):
    import boto3

    path = tmp_path / "robust.pt"
    torch.save(_published(tiny_cvst_classifier, "normalize"), path)
    model = build_model("upernet", "convnext_tiny", 21, "cvst", backbone_weights=f"file://{path}", decoder_width=16)
    _assert_backbone_equals(model, tiny_cvst_classifier)

    bucket = s3_bucket[len("s3://"):]
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).upload_file(str(path), bucket, "ckpt/robust.pt")
    uri = f"{s3_bucket}/ckpt/robust.pt"
    model = build_from_config(ModelConfig(backbone="convnext_tiny", stem="cvst", init="pir", backbone_weights=uri), 21)
    _assert_backbone_equals(model, tiny_cvst_classifier)
    assert model.init_report["init"] == "pir" and model.init_report["uri"] == uri

    with pytest.raises(BackboneWeightsNotFound, match=f"{s3_bucket}/ckpt/missing.pt: not found"):
        build_model("upernet", "convnext_tiny", 21, "cvst", backbone_weights=f"{s3_bucket}/ckpt/missing.pt")


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_uri_loads_and_a_missing_url_is_named(http_root):
    root, base = http_root
    torch.manual_seed(2)
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    torch.save(net.state_dict(), root / "atto.pt")
    model = build_model("upernet", "convnext_atto", 5, backbone_weights=f"{base}/atto.pt", decoder_width=16)
    _assert_backbone_equals(model, net.state_dict())
    with pytest.raises(BackboneWeightsNotFound, match=f"{base}/nothing.pt: not found"):
        build_model("upernet", "convnext_atto", 5, backbone_weights=f"{base}/nothing.pt", decoder_width=16)


def test_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    net = timm.create_model("convnext_atto", pretrained=False)
    set_convnext_stem(net, "cvst")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "atto.safetensors"))
    model = build_model("upernet", "convnext_atto", 5, "cvst", str(tmp_path / "atto.safetensors"), decoder_width=16)
    _assert_backbone_equals(model, net.state_dict())


def test_vit_checkpoint_loads_into_segmenter(tmp_path):
    torch.manual_seed(4)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "vit.pt")
    model = build_model("segmenter", "vit_small_patch16_224", 150, backbone_weights=str(tmp_path / "vit.pt"),
                        decoder_width=384)
    _assert_backbone_equals(model, vit.state_dict())
    # The 224x224 position embeddings are interpolated for other sizes, not replaced.
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 97, 131)).shape == (1, 150, 97, 131)


class _RunsCode:
    """Pickles to a call that writes a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_checkpoint_with_a_pickled_object_is_refused_and_nothing_runs(tmp_path, tiny_cvst_classifier):
    marker = tmp_path / "marker"
    checkpoint = {"state_dict": tiny_cvst_classifier, "extra": _RunsCode(marker)}
    path = tmp_path / "evil.pt"
    torch.save(checkpoint, path)
    refused = r"evil\.pt: refused, it holds a pickled object \((builtins\.)?exec\)"
    with pytest.raises(BackboneWeightsError, match=refused):
        build_model("upernet", "convnext_tiny", 21, "cvst", backbone_weights=str(path), decoder_width=16)
    assert not marker.exists(), "unpickling the checkpoint ran its code"

    # Control: the same file, unpickled without the weights-only guard, does run the payload.
    control = tmp_path / "control_marker"
    torch.save({"x": _RunsCode(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.read_text() == "ran"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_payload_is_refused_too(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"state_dict": _RunsCode(marker)}))
    with pytest.raises(BackboneWeightsError, match="evil.pkl"):
        build_model("upernet", "convnext_atto", 5, backbone_weights=str(tmp_path / "evil.pkl"), decoder_width=16)
    assert not marker.exists()


def test_missing_local_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nope" / "robust.pt"
    with pytest.raises(BackboneWeightsNotFound, match=f"model.backbone_weights {missing}: not found"):
        build_model("upernet", "convnext_atto", 5, backbone_weights=str(missing), decoder_width=16)
    with pytest.raises(FileNotFoundError):
        build_model("upernet", "convnext_atto", 5, backbone_weights=f"file://{missing}", decoder_width=16)


def test_unsupported_scheme_and_non_checkpoints_are_named(tmp_path):
    with pytest.raises(BackboneWeightsError, match=r"unsupported scheme ftp://; use a local path or one of file://"):
        build_model("upernet", "convnext_atto", 5, backbone_weights="ftp://host/x.pt", decoder_width=16)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(BackboneWeightsError, match=r"notes\.pt: not a PyTorch"):
        build_model("upernet", "convnext_atto", 5, backbone_weights=str(tmp_path / "notes.pt"), decoder_width=16)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(BackboneWeightsError, match=r"meta\.pt: not a state dict, entries epoch, lr are not tensors"):
        build_model("upernet", "convnext_atto", 5, backbone_weights=str(tmp_path / "meta.pt"), decoder_width=16)


def test_checkpoint_of_another_architecture_lists_the_mismatched_keys(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(BackboneWeightsError) as info:
        build_model("upernet", "convnext_atto", 5, backbone_weights=str(tmp_path / "resnet18.pt"), decoder_width=16)
    message = str(info.value)
    assert "does not fit backbone convnext_atto" in message
    assert "124 missing: stages.0.blocks.0.conv_dw.bias" in message
    assert "unexpected: bn1.bias, bn1.num_batches_tracked" in message

    torch.save(timm.create_model("convnext_femto", pretrained=False).state_dict(), tmp_path / "femto.pt")
    with pytest.raises(BackboneWeightsError, match=r"with another shape \(checkpoint vs model\): "
                                                  r"stages\.0\.blocks\.0\.conv_dw\.bias \(48,\) vs \(40,\)"):
        build_model("upernet", "convnext_atto", 5, backbone_weights=str(tmp_path / "femto.pt"), decoder_width=16)


def test_stem_mismatch_fails_with_a_hint_and_nothing_is_loaded(tmp_path, tiny_cvst_classifier):
    torch.save(tiny_cvst_classifier, tmp_path / "cvst.pt")
    with pytest.raises(BackboneWeightsError, match=r"4 missing: stem\.0\.bias.*Hint: .*set model\.stem: cvst"):
        build_model("upernet", "convnext_tiny", 21, "patch", backbone_weights=str(tmp_path / "cvst.pt"))
    # Loading into an existing model also refuses a partial fit, and leaves the model untouched.
    model = build_model("upernet", "convnext_tiny", 21, "patch", decoder_width=16)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(BackboneWeightsError):
        load_backbone_weights(model, str(tmp_path / "cvst.pt"))
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_a_few_mismatches_can_be_allowed_explicitly(tmp_path, tiny_cvst_classifier):
    state = dict(tiny_cvst_classifier)
    dropped = state.pop("stages.3.blocks.2.conv_dw.weight")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(BackboneWeightsError, match=r"1 missing: stages\.3\.blocks\.2\.conv_dw\.weight"):
        build_model("upernet", "convnext_tiny", 21, "cvst", backbone_weights=str(tmp_path / "partial.pt"))
    model = build_model("upernet", "convnext_tiny", 21, "cvst", decoder_width=16)
    report = load_backbone_weights(model, str(tmp_path / "partial.pt"), max_mismatched=1)
    assert report["missing"] == 1 and report["loaded"] == len(model.backbone.model.state_dict()) - 1
    assert not torch.equal(model.backbone.state_dict()["model.stages.3.blocks.2.conv_dw.weight"], dropped)


def test_a_normaliser_other_than_imagenet_is_refused(tmp_path, tiny_cvst_classifier):
    wrapped = _published(tiny_cvst_classifier, "normalize")
    wrapped["state_dict"]["normalize.mean"] = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    (tmp_path / "norm.pt").write_bytes(buffer.getvalue())
    with pytest.raises(BackboneWeightsError, match=r"normalize\.mean = \[0\.5, 0\.5, 0\.5\] differs from the ImageNet"):
        build_model("upernet", "convnext_tiny", 21, "cvst", backbone_weights=str(tmp_path / "norm.pt"))
