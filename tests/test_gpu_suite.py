"""experiments/benchmarks/gpu_suite.py keeps working: its --tiny CPU run writes every section's figures."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_benchmarks import load

LOSSES = ("mce-bal", "mce", "js", "segpgd", "mask-sph")


@pytest.mark.realpath
@pytest.mark.slow
def test_tiny_suite_writes_json_and_markdown(tmp_path, capsys):
    gpu_suite = load("gpu_suite")
    assert gpu_suite.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["meta"]["tiny"] is True and result["meta"]["device_name"].startswith("CPU")

    train = result["train"]
    assert {(r["classes"], r["precision"]) for r in train} == {(k, p) for k in (21, 151)
                                                              for p in ("fp32", "bf16", "bf16+cl")}
    for row in train:
        assert row["clean_images_per_s"] > 0 and row["pgd_images_per_s"] > 0
        assert math.isclose(row["floor_ratio"], 3 * row["pgd_images_per_s"] / row["clean_images_per_s"])
        assert row["clean_peak_gib"] is None and row["channels_last"] is False  # CPU: no CUDA memory, no NHWC
    for row in result["apgd"]:
        assert row["bare_ms"] > 0
        assert all(0 < row[f"{loss}_ratio"] < 20 for loss in LOSSES)
    assert all(r["images_per_s"] > 0 and r["iterations"] == 300 for r in result["sea"])
    syncs = result["syncs"]
    assert syncs["counted_with"].startswith("host reads") and syncs["train_per_step"] <= 1
    assert syncs["apgd_fixed_batch_per_iteration"] == 0
    strength = result["strength"]
    assert 0 <= strength["fp32_sea_miou"] <= strength["fp32_clean_miou"] <= 1
    assert math.isclose(strength["difference_points"],
                        100 * (strength["bf16_sea_miou"] - strength["fp32_sea_miou"]))
    assert not strength["conclusive"] and not strength["bf16_attacks_allowed"]  # 3 steps teach a model nothing

    ddp = result["ddp"]
    assert ddp["world"] == 2 and ddp["backend"] == "gloo" and ddp["losses_finite"]
    assert {"all_reduce", "broadcast"} <= set(ddp["collectives"]) and ddp["collectives_off_device"] == 0
    assert [(r["precision"], r["steps"]) for r in ddp["runs"]] == [("fp32", 3)]
    assert all(0 <= r["clean_miou"] <= 1 for r in ddp["runs"])  # the validation under DDP ran

    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| voc | 64 | bf16+cl |" in table and "| train_per_step | " in table
    assert "bf16 attacks" in table and "PIR-AT under DDP: 2 process(es) over gloo" in table
    assert table in capsys.readouterr().out


@pytest.mark.realpath
def test_full_sizes_refuse_a_cpu_with_a_clear_error(capsys):
    gpu_suite = load("gpu_suite")
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.main(["--device", "cpu"])
    assert exit_info.value.code == 2
    assert "the full sizes need a GPU; add --tiny" in capsys.readouterr().err
