"""The roofline model of one decode step: how fast can a quantized model generate a token here?

At batch 1, decoding a token multiplies one activation vector by every weight matrix, so each
weight byte is read once and used for two FLOPs (a multiply and an add). The step's arithmetic
intensity (FLOPs per byte moved) is therefore tiny, and on any CPU or GPU it sits far left of the
ridge point (peak FLOP/s divided by bandwidth): decode is memory-bound, and its time is roughly
the bytes read divided by the bandwidth. That is why a 4-bit model decodes up to ~8x faster than
a float32 one even though it does the same arithmetic.

Simplifications, stated once: attention over the KV cache is left out (a short context costs
little next to the weights); the whole embedding table is counted as read (true when the lm_head
shares it, an upper bound otherwise); dequantization FLOPs are not counted.
"""
from __future__ import annotations

import functools
import math
import time

# Deployed low-bit kernels (W4A16, W8A16) run float16 activations; counting every scheme's
# activations at the same width keeps the comparison about the weight format.
ACTIVATION_BYTES_PER_ELEMENT = 2


def decode_workload(module) -> dict:
    """Per-token matmul work of a torch model at batch 1, for ``results["model"]``.

    Counts every nn.Linear (and Hugging Face's GPT-2 ``Conv1D``, which stores its weight
    transposed), the lm_head included: a tied lm_head is still a matmul each token.
    Returns {"params_matmul": weights multiplied per token, "activation_elements": sum of
    in + out features (the vectors read and written), "n_matmuls"}.
    """
    from torch import nn

    params = elements = count = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            out_features, in_features = m.weight.shape
        elif type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2:
            in_features, out_features = m.weight.shape
        else:
            continue
        params += out_features * in_features
        elements += out_features + in_features
        count += 1
    return {"params_matmul": params, "activation_elements": elements, "n_matmuls": count}


def decode_intensity(scheme_result: dict, model: dict, *,
                     activation_bytes_per_element: int = ACTIVATION_BYTES_PER_ELEMENT) -> dict:
    """Arithmetic intensity of one batch-1 decode step for one scheme.

    ``scheme_result`` is ``results["results"][scheme]`` (needs ``bytes_total``: codes, scales,
    zeros and the float16 embeddings/norms, i.e. every weight byte read per token). ``model`` is
    ``results["model"]``: ``params_matmul`` (else ``params_linear``) gives the FLOPs;
    ``activation_elements`` (from ``decode_workload``) gives the activation traffic. Without it,
    the Linear weights are treated as ``n_matmuls`` (default 1) square matrices, whose activation
    vectors are 2 * side long each.

    Returns {"flops", "bytes_weights", "bytes_activations", "bytes", "intensity"} (FLOP/byte).
    """
    params = model.get("params_matmul") or model.get("params_linear")
    if not params:
        raise ValueError("decode_intensity needs results['model']['params_linear'] (or 'params_matmul'), "
                         "the number of weights multiplied per token; the pipeline records it from "
                         "accounting.deployable_bytes / roofline.decode_workload")
    bytes_weights = scheme_result.get("bytes_total")
    if bytes_weights is None:
        raise ValueError("decode_intensity needs the scheme's bytes_total; it is null for this scheme")
    elements = model.get("activation_elements")
    if elements is None:
        n_matmuls = model.get("n_matmuls") or 1
        elements = 2 * math.sqrt(n_matmuls * params)
    flops = 2 * params
    bytes_activations = elements * activation_bytes_per_element
    total = bytes_weights + bytes_activations
    return {"flops": flops, "bytes_weights": bytes_weights, "bytes_activations": bytes_activations,
            "bytes": total, "intensity": flops / total}


def attainable_gflops(intensity: float, machine: dict) -> float:
    """The roofline: min(compute ceiling, bandwidth * intensity), in GFLOP/s."""
    return min(machine["peak_gflops"], machine["bandwidth_gbs"] * intensity)


def ridge_intensity(machine: dict) -> float:
    """The intensity (FLOP/byte) where the bandwidth ceiling meets the compute ceiling."""
    return machine["peak_gflops"] / machine["bandwidth_gbs"]


def decode_seconds(point: dict, machine: dict) -> float:
    """Roofline time of one decode step: the slower of doing the FLOPs and moving the bytes."""
    return max(point["flops"] / (machine["peak_gflops"] * 1e9), point["bytes"] / (machine["bandwidth_gbs"] * 1e9))


def measure_machine(seconds_budget: float = 2.0) -> dict:
    """This machine's compute ceiling (best float32 matmul GFLOP/s) and bandwidth ceiling (best
    large-copy GB/s, counting the read and the write), each measured for about half the budget
    with torch's current thread count. Measured once per process and budget, then reused."""
    return dict(_measure_machine(float(seconds_budget)))


@functools.cache
def _measure_machine(seconds_budget: float) -> tuple:
    import torch

    # 1024^3 matmuls are big enough to reach BLAS peak, small enough to repeat within the budget.
    side = 1024
    a = torch.randn(side, side, generator=torch.Generator().manual_seed(0))
    b = torch.randn(side, side, generator=torch.Generator().manual_seed(1))
    matmul_seconds = _best_time(lambda: torch.mm(a, b), seconds_budget / 2)
    peak_gflops = 2 * side ** 3 / matmul_seconds / 1e9

    # 64 MiB is larger than the last-level cache of common CPUs, so the copy streams from DRAM.
    src = torch.ones(16 * 2 ** 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_seconds = _best_time(lambda: dst.copy_(src), seconds_budget / 2)
    bandwidth_gbs = 2 * src.numel() * src.element_size() / copy_seconds / 1e9

    return tuple({
        "peak_gflops": peak_gflops,
        "bandwidth_gbs": bandwidth_gbs,
        "threads": torch.get_num_threads(),
        "method": f"best float32 {side}x{side} matmul; best copy of {src.numel() * src.element_size() >> 20} MiB "
                  "(read + write)",
    }.items())


def _best_time(operation, seconds: float) -> float:
    """Fastest of repeated runs of ``operation`` within ``seconds`` (after one warm-up run):
    the minimum filters out interruptions by other processes on a shared machine."""
    operation()
    best, runs = math.inf, 0
    deadline = time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        operation()
        best = min(best, time.perf_counter() - start)
        runs += 1
    return best
