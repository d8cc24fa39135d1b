"""The roofline's inputs: the work of one decode step, its intensity, and this machine's ceilings."""
import pytest
import torch

from quantlab import roofline
from quantlab.roofline import decode_intensity, decode_workload, measure_lowbit_kernels, measure_machine


def test_decode_workload_counts_every_matmul_and_its_input_and_output_vectors():
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False))
    assert decode_workload(module) == {"params_matmul": 8 * 16 + 16 * 4, "activation_elements": (8 + 16) + (16 + 4),
                                       "n_matmuls": 2, "linear_shapes": [[16, 8, 1], [4, 16, 1]]}


def test_decode_workload_lists_the_block_linear_shapes_without_the_lm_head(minigpt):
    shapes = decode_workload(minigpt.module)["linear_shapes"]
    blocks = [tuple(m.weight.shape) for name, m in minigpt.module.named_modules()
              if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert sorted((o, i) for o, i, _ in shapes) == sorted(set(blocks)) and sum(n for *_, n in shapes) == len(blocks)


def test_decode_intensity_explains_what_is_missing():
    with pytest.raises(ValueError, match="params_linear"):
        decode_intensity({"bytes_total": 100}, {})


def test_measure_machine_reports_positive_ceilings_and_is_measured_once():
    first = measure_machine(seconds_budget=0.1)
    assert first["peak_gflops"] > 0 and first["bandwidth_gbs"] > 0
    first["peak_gflops"] = -1.0  # the caller's copy: the cache must not see this
    assert measure_machine(seconds_budget=0.1)["peak_gflops"] > 0
    assert measure_machine(seconds_budget=0.1)["bandwidth_gbs"] == first["bandwidth_gbs"]


SMALL_SHAPES = [[64, 128, 2], [128, 64, 1]]


def test_measure_lowbit_kernels_times_each_kernel_on_the_given_shapes():
    measured = measure_lowbit_kernels(SMALL_SHAPES, seconds_budget=0.2)
    assert measured["shapes"] == sorted(SMALL_SHAPES) and "fp32" in measured["kernels"]
    for name, kernel in measured["kernels"].items():
        assert kernel["seconds_per_token"] > 0 and kernel["tokens_per_second"] > 0 and kernel["ratio_to_fp32"] > 0
        assert kernel["flops"] == 2 * (2 * 64 * 128 + 128 * 64) and kernel["bytes"] > 0 and kernel["gflops"] > 0
    # torch 2.13's CPU build has both; a build without one reports why instead (next test).
    for name in ("int8", "int4"):
        assert name in measured["kernels"] or name in measured["unavailable"]
    if "int4" in measured["kernels"]:
        assert measured["kernels"]["int4"]["bytes"] < measured["kernels"]["int8"]["bytes"] < measured["kernels"]["fp32"]["bytes"]


def test_a_missing_kernel_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setitem(roofline.LOWBIT_OPS, "int4", ("_no_such_int4_kernel",))
    measured = measure_lowbit_kernels(SMALL_SHAPES, seconds_budget=0.1)
    assert "int4" not in measured["kernels"] and "_no_such_int4_kernel" in measured["unavailable"]["int4"]
    assert measured["kernels"]["fp32"]["tokens_per_second"] > 0


def test_no_shapes_means_nothing_measured_and_says_why():
    measured = measure_lowbit_kernels([], seconds_budget=0.1)
    assert "kernels" not in measured and "linear_shapes" in measured["reason"]
