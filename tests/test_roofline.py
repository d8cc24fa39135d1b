"""The roofline's inputs: the work of one decode step, its intensity, and this machine's ceilings."""
import pytest
import torch

from quantlab.roofline import decode_intensity, decode_workload, measure_machine


def test_decode_workload_counts_every_matmul_and_its_input_and_output_vectors():
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False))
    assert decode_workload(module) == {"params_matmul": 8 * 16 + 16 * 4, "activation_elements": (8 + 16) + (16 + 4),
                                       "n_matmuls": 2}


def test_decode_intensity_explains_what_is_missing():
    with pytest.raises(ValueError, match="params_linear"):
        decode_intensity({"bytes_total": 100}, {})


def test_measure_machine_reports_positive_ceilings_and_is_measured_once():
    first = measure_machine(seconds_budget=0.1)
    assert first["peak_gflops"] > 0 and first["bandwidth_gbs"] > 0
    first["peak_gflops"] = -1.0  # the caller's copy: the cache must not see this
    assert measure_machine(seconds_budget=0.1)["peak_gflops"] > 0
    assert measure_machine(seconds_budget=0.1)["bandwidth_gbs"] == first["bandwidth_gbs"]
