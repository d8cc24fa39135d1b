"""How fast is the GPTQ solver, against the yardstick of one matrix multiplication on the same machine?

    python benchmarks/bench_gptq.py                 # the solver on a 4096x4096 Linear (INT4 g128, block 128)
    python benchmarks/bench_gptq.py --minigpt       # + the whole MiniGPT INT4 g64 GPTQ pipeline
    python benchmarks/bench_gptq.py --smollm2       # + the whole SmolLM2-135M pipeline (128 x 512 tokens)
    python benchmarks/bench_gptq.py --profile       # + where one solve's time goes, step by step

The solver's target is at most 2x the seconds of one 4096^3 float32 matmul, timed in the same process
(the paper's reference formulation is timed beside it; it spends most of its time in a per-column
Python loop and the explicit inverse of H). Each figure is the best of ``--repeats`` runs, solver and
matmul interleaved, because on a shared machine the slowest runs measure the neighbours. Pipelines run
in a child process each, so the peak memory printed (peak RSS) is that pipeline's alone.
"""
from __future__ import annotations

import os

# On a shared machine, OpenMP threads that spin while waiting for each other stall whenever a neighbour
# holds a core (measured here: the MiniGPT pipeline 14x slower). Waiting passively avoids that; set
# before torch loads OpenMP, and only when the caller has not chosen.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from quantlab.gptq import _weighted_row_norms, gptq_quantize  # noqa: E402
from quantlab.quant import Scheme, compute_scales, dequantize, quantize  # noqa: E402


def realistic_hessian(n: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """H = X^T X / n_tokens for activations shaped like an LLM's: a low-rank shared component, channel
    scales spread log-normally, and a few outlier channels 20x larger."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, n // 16, generator=g) @ torch.randn(n // 16, n, generator=g) / 8
    X = X + torch.randn(n_tokens, n, generator=g)
    channel_scale = torch.exp(0.5 * torch.randn(n, generator=g))
    channel_scale[torch.randperm(n, generator=g)[: max(1, n // 512)]] *= 20
    X = X * channel_scale
    return X.T @ X / n_tokens


def solver_flops(out_features: int, n: int, block_size: int) -> float:
    """Arithmetic of this solver: Cholesky of H (n^3/3), lazy batch updates (out n^2), in-block updates
    (out n B) and the rel_loss denominator ||W R||^2 (out n^2); multiply-adds count as 2 flops."""
    return n ** 3 / 3 + 2 * out_features * n ** 2 + out_features * n * block_size


def best_seconds(run, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def reference_gptq(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, block_size: int = 128) -> torch.Tensor:
    """The paper's reference formulation, for timing only: the inverse Hessian through Cholesky,
    cholesky_inverse and a second Cholesky, then a Python loop over columns with lazy batch updates.
    Returns the dequantized weight."""
    W = W.clone()
    n = W.shape[1]
    H = H + 0.01 * H.diagonal().mean() * torch.eye(n)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, E1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        for i in range(i2 - i1):
            if (i1 + i) % scheme.group_size == 0:
                scales, _ = compute_scales(W[:, i1 + i:i1 + i + scheme.group_size], scheme)
            q = dequantize(quantize(W1[:, i], scales[:, 0], None, scheme.qmin, scheme.qmax), scales[:, 0], None)
            Q[:, i1 + i] = q
            E1[:, i] = (W1[:, i] - q) / U[i1 + i, i1 + i]
            W1[:, i:] -= E1[:, i:i + 1] @ U[i1 + i:i1 + i + 1, i1 + i:i2]
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q


def bench_solver(n: int, repeats: int, with_reference: bool, with_profile: bool = False) -> None:
    scheme, block_size = Scheme(4, group_size=128), 128
    H = realistic_hessian(n, n_tokens=2 * n)
    W = torch.randn(n, n, generator=torch.Generator().manual_seed(1)) * 0.02
    A, B = torch.randn(n, n), torch.randn(n, n)
    A @ B                                                          # warm up BLAS threads
    times = {"matmul": [], "solver": [], "denominator": [], "reference": []}
    result = None
    for _ in range(repeats):
        times["matmul"] += best_seconds(lambda: A @ B, 1)
        started = time.perf_counter()
        result = gptq_quantize(W, H, scheme, block_size=block_size)
        times["solver"].append(time.perf_counter() - started)
        R = torch.linalg.cholesky(H.flip(0, 1) + 0.01 * H.diagonal().mean() * torch.eye(n)).flip(0, 1)
        times["denominator"] += best_seconds(lambda: _weighted_row_norms(W, R), 1)
        if with_reference:
            times["reference"] += best_seconds(lambda: reference_gptq(W, H, scheme, block_size), 1)
    best = {k: min(v) for k, v in times.items() if v}
    runs = {k: ", ".join(f"{t:.2f}" for t in v) for k, v in times.items()}
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"GPTQ solver, {n}x{n} Linear, {scheme.describe()}, block {block_size}, realistic correlated H")
    print(f"  solver seconds   {best['solver']:8.3f}   (runs: {runs['solver']})")
    print(f"    of which the rel_loss denominator tr(W H W^T): {best['denominator']:.3f} s")
    print(f"  solver GFLOP/s   {solver_flops(n, n, block_size) / best['solver'] / 1e9:8.1f}")
    print(f"  matmul {n}^3 s   {best['matmul']:8.3f}   (runs: {runs['matmul']}), "
          f"{2 * n ** 3 / best['matmul'] / 1e9:.1f} GFLOP/s")
    print(f"  ratio            {best['solver'] / best['matmul']:8.2f}x  (target <= 2x)")
    if with_reference:
        print(f"  reference formulation {best['reference']:.3f} s = {best['reference'] / best['matmul']:.2f}x matmul "
              f"(runs: {runs['reference']})")
    print(f"  rel_loss {result.rel_loss:.3e}, damp {result.damp:g}, health {result.health}")
    if with_profile:
        profile_solver(W, H, scheme, block_size, best["matmul"])


# The solver's steps, named by the function that does the work (a torch call is named by its caller).
STEPS = {
    "_upper_factor": "Cholesky of H (blocked: quantlab.gptq.upper_cholesky)",
    "upper_cholesky": "Cholesky of H (blocked: quantlab.gptq.upper_cholesky)",
    "_weighted_row_norms": "rel_loss denominator ||W R||^2",
    "round": "column loop: rounding to the grid",
    "_Grid.__init__": "group scales: grids prepared for the loop",
    "compute_scales": "group scales (quant.compute_scales)",
    "_range_scales": "group scales (quant.compute_scales)",
    "fp16_ceil": "group scales (quant.compute_scales)",
    "gptq_quantize": "setup: checks, copies, reordering",
    "_validate": "setup: checks, copies, reordering",
    "all_finite": "setup: checks, copies, reordering",
}
SOLVE_CALLS = {   # torch calls made by _solve itself, by a part of the profiler's name for them
    "'addmm_'": "products: lazy batch updates",
    "'addr_'": "column loop: rank-1 updates inside a block (in pieces)",
    "method sub ": "column loop: errors w - q",
    "solve_triangular": "dynamic groups: loss-optimal weights w_S + G_S R_SS^-1",
}


def _step(function: tuple, caller: tuple) -> str:
    """The solver step a profiled call belongs to: a Python function's own time goes to its step, a
    torch call's time to its caller's."""
    filename, _, name = function
    is_python = filename not in ("~", "") and not name.startswith("<")
    where = function if is_python else caller
    where_name = where[2]
    if where_name == "_solve":
        if is_python:
            return "column loop: Python interpreter"
        for call, step in SOLVE_CALLS.items():
            if call in name:
                return step
        return "_solve: per-block buffers, sums and code conversion"
    for function_name, step in STEPS.items():
        if where_name == function_name.split(".")[-1]:
            return step
    return "other"


def profile_solver(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, block_size: int, matmul_seconds: float) -> None:
    """Print where one solve's time goes (cProfile, whose own overhead per call inflates the column loop
    a little), each step beside the matmul it is measured against."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    gptq_quantize(W, H, scheme, block_size=block_size)
    profiler.disable()
    total = time.perf_counter() - started
    steps: dict = {}
    for function, (_, _, own, _, callers) in pstats.Stats(profiler).stats.items():
        if not callers:
            steps["other"] = steps.get("other", 0.0) + own
        for caller, (_, _, own_from_caller, _) in callers.items():
            step = _step(function, caller)
            steps[step] = steps.get(step, 0.0) + own_from_caller
    print(f"  where one solve's time goes (cProfile, {total:.3f} s in all = {total / matmul_seconds:.2f}x matmul):")
    for step, seconds in sorted(steps.items(), key=lambda item: -item[1]):
        if seconds >= 0.0005:
            print(f"    {seconds:7.3f} s  {seconds / matmul_seconds:5.2f}x matmul  {step}")


def exact_condition_number(H: torch.Tensor) -> float:
    """lambda_max / lambda_min from a float64 eigendecomposition (what h_cond cost before the estimate)."""
    eigenvalues = torch.linalg.eigvalsh(H.to(torch.float64))
    return float(eigenvalues[-1]) / max(float(eigenvalues[0]), float(eigenvalues[-1]) * torch.finfo(torch.float64).eps)


def bench_pipeline(name: str) -> dict:
    """Quantize a model end to end with GPTQ INT4 g64; seconds and the process's peak RSS."""
    from quantlab import calibrate
    from quantlab.data import calibration_windows, load_text
    from quantlab.models.registry import load_model

    # The per-layer statistics (h_cond and the rest), timed where the pipeline computes them.
    statistics_seconds = [0.0]
    summarize = calibrate.InputStatistics._summarize

    hessians = []   # kept to compare h_cond with the exact eigendecomposition afterwards

    def timed_summarize(self):
        started = time.perf_counter()
        try:
            return summarize(self)
        finally:
            statistics_seconds[0] += time.perf_counter() - started
            hessians.append(self.hessian.clone())

    calibrate.InputStatistics._summarize = timed_summarize
    condition_number = calibrate.condition_number
    estimate_seconds = 0.0

    def timed_condition_number(H):
        nonlocal estimate_seconds
        started = time.perf_counter()
        try:
            return condition_number(H)
        finally:
            estimate_seconds += time.perf_counter() - started

    calibrate.condition_number = timed_condition_number
    started = time.perf_counter()
    model = load_model({"minigpt": "minigpt-shakespeare", "smollm2": "smollm2-135m"}[name])
    seq_len = min(512, model.max_seq_len)
    calibration = calibration_windows(model.encode(load_text("shakespeare", "train")), 128, seq_len, 0)
    loaded = time.perf_counter()
    quantized = calibrate.quantize_model(model, Scheme(4, group_size=64), calibration, method="gptq")
    done = time.perf_counter()
    exact_started = time.perf_counter()
    exact = [exact_condition_number(H) for H in hessians]
    exact_seconds = time.perf_counter() - exact_started
    ratios = [condition_number(H) / value for H, value in zip(hessians, exact)]
    return {
        "model": model.name, "calibration": f"{calibration.shape[0]} x {calibration.shape[1]} tokens",
        "load_seconds": round(loaded - started, 1), "quantize_seconds": round(done - loaded, 1),
        "statistics_seconds": round(statistics_seconds[0], 2),
        "statistics_share": f"{statistics_seconds[0] / (done - loaded):.1%}",
        "statistics_with_eigvalsh_h_cond_seconds": round(statistics_seconds[0] - estimate_seconds + exact_seconds, 2),
        "h_cond_estimate_over_exact": f"{min(ratios):.6f}..{max(ratios):.6f} ({len(ratios)} Hessians)",
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "mean_rel_loss": quantized.mean("rel_loss"), "mean_rtn_rel_loss": quantized.mean("rtn_rel_loss"),
        "health_events": len(quantized.health),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="n for the n x n Linear (default 4096)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-solver", action="store_true", help="skip the solver benchmark")
    parser.add_argument("--reference", action="store_true",
                        help="also time the paper's reference formulation (inverse Hessian, per-column loop)")
    parser.add_argument("--profile", action="store_true", help="also print where one solve's time goes")
    parser.add_argument("--minigpt", action="store_true", help="time the MiniGPT INT4 g64 GPTQ pipeline")
    parser.add_argument("--smollm2", action="store_true", help="time the SmolLM2-135M INT4 g64 GPTQ pipeline")
    parser.add_argument("--pipeline-child", choices=["minigpt", "smollm2"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.pipeline_child:
        print(json.dumps(bench_pipeline(args.pipeline_child)))
        return
    if not args.no_solver:
        bench_solver(args.size, args.repeats, args.reference, args.profile)
    for name in [n for n in ("minigpt", "smollm2") if getattr(args, n)]:
        child = subprocess.run([sys.executable, __file__, "--pipeline-child", name],
                               capture_output=True, text=True, check=True)
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"GPTQ pipeline, INT4 g64: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
