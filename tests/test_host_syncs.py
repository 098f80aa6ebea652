"""Host synchronisations in the inner loops, counted on a CPU as the Tensor reads that would synchronise on a GPU:
at most one per PIR-AT training step (the loss, the ranks' non-finite flag and the attack's checks read together)
and none per APGD iteration on a fixed batch."""

from __future__ import annotations

import pytest
import torch

from tests.test_benchmarks import load


@pytest.mark.realpath
def test_a_training_step_reads_the_host_once_and_an_apgd_iteration_never():
    suite = load("gpu_suite")
    torch.manual_seed(0)
    result = suite.bench_syncs(suite.TINY, torch.device("cpu"), lambda _line: None)
    assert result["counted_with"].startswith("host reads")
    assert result["train_per_step"] <= 1, result
    assert result["apgd_fixed_batch_per_iteration"] == 0, result
    assert result["apgd_early_exit_per_iteration"] <= 1, result  # the 0%-accuracy check, by design


@pytest.mark.realpath
def test_the_counter_sees_each_kind_of_host_read():
    suite = load("gpu_suite")
    t = torch.arange(6.0)

    def reads():
        t.sum().item()
        t.tolist()
        bool(t.any())
        float(t.max())
        int(t.argmax())
        t[t > 2]
        t[torch.tensor([0, 1])]  # integer indexing reads nothing on the host

    assert suite.count_host_reads(reads) == 6
