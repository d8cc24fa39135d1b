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

import copy
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
    in + out features (the vectors read and written), "n_matmuls", "linear_shapes": the distinct
    [out, in, count] of the nn.Linear layers other than the lm_head (the block Linears, which
    ``measure_lowbit_kernels`` times), largest first}.
    """
    from torch import nn

    head = getattr(module, "lm_head", None)
    if head is None and callable(getattr(module, "get_output_embeddings", None)):
        head = module.get_output_embeddings()
    params = elements = count = 0
    shapes = {}
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if m is not head:
                shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + 1
            out_features, in_features = m.weight.shape
        elif type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2:
            in_features, out_features = m.weight.shape
        else:
            continue
        params += out_features * in_features
        elements += out_features + in_features
        count += 1
    return {"params_matmul": params, "activation_elements": elements, "n_matmuls": count,
            "linear_shapes": [[o, i, n] for (o, i), n in sorted(shapes.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0]))]}


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


def measure_machine(seconds_budget: float = 2.0, linear_shapes=None) -> dict:
    """This machine's compute ceiling (best float32 matmul GFLOP/s) and bandwidth ceiling (best
    large-copy GB/s, counting the read and the write), each measured for about half the budget
    with torch's current thread count. Measured once per process and budget, then reused.
    Given the model's ``linear_shapes`` (``decode_workload``), it also holds ``lowbit_kernels``:
    ``measure_lowbit_kernels(linear_shapes)``, the measured speed of real low-bit kernels."""
    machine = dict(_measure_machine(float(seconds_budget)))
    if linear_shapes:
        machine["lowbit_kernels"] = measure_lowbit_kernels(linear_shapes)
    return machine


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


# The weight-only low-bit matmuls torch ships for CPU (as torchao's int8/int4 weight-only layouts call
# them), by the name the report uses: the aten operators each needs.
LOWBIT_OPS = {
    "int8": ("_weight_int8pack_mm",),
    "int4": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
}
# aten's CPU low-bit kernels are vectorised for bfloat16 activations (torchao's CPU layouts use them);
# with float32 activations they fall back to a scalar path several times slower than F.linear.
LOWBIT_ACTIVATION_DTYPE_NAME = "bfloat16"
KERNEL_LABELS = {"fp32": "fp32 F.linear", "int8": "int8 weight-only kernel", "int4": "INT4 packed kernel"}
INT4_GROUP_SIZES = (128, 64, 32)   # the group sizes aten's CPU int4 kernel takes, preferred first


def measure_lowbit_kernels(shapes, seconds_budget: float = 1.0) -> dict:
    """Measured speed of one batch-1 decode step through the block Linears, per kernel.

    For each [out, in, count] in ``shapes`` (``decode_workload``'s ``linear_shapes``) it times
    y = x W^T with x of shape (1, in) three ways in this process: float32 ``F.linear`` (the
    reference), aten's int8 weight-only kernel (``_weight_int8pack_mm(x, int8 (out, in) weight,
    (out,) scales)``) and its INT4 packed kernel (``_weight_int4pack_mm_for_cpu(x, packed,
    group_size, (in/group, out, 2) scales and zeros)`` on ``_convert_weight_to_int4pack_for_cpu``'s
    layout, groups of 128, 64 or 32 inputs), the low-bit ones with bfloat16 activations and scales,
    the inputs their vectorised CPU paths take. Each shape's time is the
    best of repeated runs, the budget shared evenly; the step's time is the sum over layers.

    Returns {"kernels": {name: {"op", "seconds_per_token", "tokens_per_second", "ratio_to_fp32",
    "flops", "bytes" (weights, scales and zeros plus the activation vectors), "intensity",
    "gflops" (achieved)}}, "unavailable": {name: reason}, "shapes", "threads", "method"}, or
    {"reason": ...} when there is nothing to measure. Measured once per process and arguments.
    """
    key = tuple(sorted((int(o), int(i), int(n)) for o, i, n in (shapes or ())))
    ops = tuple(sorted((name, tuple(needed)) for name, needed in LOWBIT_OPS.items()))
    return copy.deepcopy(_measure_lowbit_kernels(key, float(seconds_budget), ops))


@functools.cache
def _measure_lowbit_kernels(shapes: tuple, seconds_budget: float, ops: tuple) -> dict:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:   # pragma: no cover - torch is a dependency
        return {"reason": f"torch is not importable: {exc}"}
    LOWBIT_ACTIVATION_DTYPE = getattr(torch, LOWBIT_ACTIVATION_DTYPE_NAME)  # noqa: N806
    if not shapes:
        return {"reason": "no Linear shapes recorded for the model (results['model']['linear_shapes'])"}

    unavailable, builders = {}, {}
    for name, needed in ops:
        missing = [op for op in needed if not hasattr(torch.ops.aten, op)]
        if missing:
            unavailable[name] = f"torch {torch.__version__} has no aten.{', aten.'.join(missing)}"
    if "int4" not in unavailable:
        odd = [(o, i) for o, i, _ in shapes if not any(i % g == 0 for g in INT4_GROUP_SIZES) or o % 2]
        if odd:
            unavailable["int4"] = (f"aten's CPU int4 kernel needs in_features divisible by 32; "
                                   f"shape(s) {', '.join(f'{o}x{i}' for o, i in odd)} are not")

    generator = torch.Generator().manual_seed(0)
    names = ("fp32", *(n for n, _ in ops if n not in unavailable))
    # Tiny batch-1 matmuls can run slower on several threads than on one (the threads' hand-off
    # costs more than the work, worse on a busy machine), so each kernel runs at torch's thread
    # count and at 1 thread, and keeps the faster: what a deployment would set.
    thread_counts = sorted({1, torch.get_num_threads()}, reverse=True)
    per_call = seconds_budget / (len(shapes) * len(names) * len(thread_counts))
    timings = {(name, t): 0.0 for name in names for t in thread_counts}
    bytes_read = dict.fromkeys(names, 0)
    flops = 0
    groups = set()
    threads_before = torch.get_num_threads()
    try:
        for out_features, in_features, count in shapes:
            weight = torch.randn(out_features, in_features, generator=generator)
            x = torch.randn(1, in_features, generator=generator)
            x16 = x.to(LOWBIT_ACTIVATION_DTYPE)
            flops += count * 2 * out_features * in_features
            calls = {"fp32": (lambda w=weight, x=x: F.linear(x, w), 4 * weight.numel(), 4)}
            if "int8" in names:
                scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
                codes = torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8)
                scales = scales.to(LOWBIT_ACTIVATION_DTYPE)
                calls["int8"] = (lambda c=codes, s=scales, x=x16: torch.ops.aten._weight_int8pack_mm(x, c, s),
                                 codes.numel() + scales.numel() * scales.element_size(), x16.element_size())
            if "int4" in names:
                group = next(g for g in INT4_GROUP_SIZES if in_features % g == 0)
                groups.add(group)
                try:
                    packed, scales_zeros = _int4_pack(weight, group)
                except RuntimeError as exc:
                    unavailable["int4"] = f"aten refused to pack {out_features}x{in_features}: {_first_line(exc)}"
                else:
                    scales_zeros = scales_zeros.to(LOWBIT_ACTIVATION_DTYPE)
                    calls["int4"] = (lambda p=packed, sz=scales_zeros, g=group, x=x16:
                                     torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, sz),
                                     packed.numel() * packed.element_size()
                                     + scales_zeros.numel() * scales_zeros.element_size(), x16.element_size())
            for name, (call, weight_bytes, activation_bytes) in calls.items():
                if name in unavailable:
                    continue
                try:
                    for threads in thread_counts:
                        torch.set_num_threads(threads)
                        timings[name, threads] += count * _best_time_per_call(call, per_call)
                except RuntimeError as exc:    # a kernel that refuses this shape or this CPU
                    unavailable[name] = f"aten refused {out_features}x{in_features}: {_first_line(exc)}"
                    continue
                bytes_read[name] += count * (weight_bytes + activation_bytes * (in_features + out_features))
    finally:
        torch.set_num_threads(threads_before)

    best = {name: min(thread_counts, key=lambda t: (timings[name, t], -t)) for name in names}
    reference = timings["fp32", best["fp32"]]
    kernels = {}
    for name in names:
        if name in unavailable:
            continue
        seconds = timings[name, best[name]]
        kernels[name] = {"op": {"fp32": "torch.nn.functional.linear", "int8": "aten._weight_int8pack_mm",
                                "int4": "aten._weight_int4pack_mm_for_cpu"}[name],
                         "seconds_per_token": seconds, "tokens_per_second": 1 / seconds,
                         "ratio_to_fp32": reference / seconds, "flops": flops, "bytes": bytes_read[name],
                         "intensity": flops / bytes_read[name], "gflops": flops / seconds / 1e9,
                         "threads": best[name],
                         "seconds_per_token_by_threads": {str(t): timings[name, t] for t in thread_counts}}
    if "int4" in kernels:
        kernels["int4"]["group_size"] = sorted(groups)
    return {"kernels": kernels, "unavailable": unavailable, "shapes": [list(s) for s in shapes],
            "method": "best of repeated batch-1 matmuls (x: 1 x in; float32 for F.linear, bfloat16 for the low-bit "
                      "kernels) per Linear shape, "
                      f"summed over the block Linears, at {' and '.join(map(str, thread_counts))} thread(s), "
                      "each kernel at its faster thread count; same process"}


def _first_line(exc) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


def _int4_pack(weight, group_size: int):
    """``weight`` (out, in) as aten's CPU int4 layout: asymmetric 4-bit codes per group of
    ``group_size`` inputs packed by ``_convert_weight_to_int4pack_for_cpu`` (int32 codes 0..15 in,
    uint8 (out, in/2) out), and the (in/group, out, 2) float32 scales and zeros the kernel reads,
    where a weight is (code - 8) * scale + zero (torchao's convention)."""
    import torch

    out_features, in_features = weight.shape
    grouped = weight.reshape(out_features, in_features // group_size, group_size)
    low, high = grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    codes = torch.round((grouped - low) / scale).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    zero = low + 8 * scale
    scales_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scales_zeros


def _best_time_per_call(operation, seconds: float) -> float:
    """Seconds per call of a fast ``operation``: the best, within ``seconds`` (at least one timed
    loop after a warm-up), of loops long enough (about 0.2 ms) for the timer's resolution not to matter."""
    start = time.perf_counter()
    operation()
    first = max(time.perf_counter() - start, 1e-7)
    inner = max(1, min(1000, int(2e-4 / first)))
    best, deadline = math.inf, time.perf_counter() + seconds
    while best == math.inf or time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(inner):
            operation()
        best = min(best, (time.perf_counter() - start) / inner)
    return best
