"""How well do the mixed-precision sensitivity proxies rank layers? Against the true single-layer KL increase.

    python benchmarks/bench_sensitivity.py                  # MiniGPT, candidates int3-g64 int4-g64 int8-per-channel
    python benchmarks/bench_sensitivity.py --smollm2 --layers 21   # SmolLM2-135M, every 10th Linear (slow)
    python benchmarks/bench_sensitivity.py --method gptq   # GPTQ's error (act-order, static groups) instead of RTN's

For every block Linear and candidate scheme: quantize only that layer (with RTN, or with ``--method gptq``
GPTQ against the float model's calibration H, as a mixed scheme under GPTQ measures it), and measure the KL
divergence of the model's next-token distribution from the float model's on Shakespeare's test split
(``--eval-windows`` windows). The proxies of quantlab.mixed.layer_sensitivity (output_error and
kl_estimate, measured on ``--calibration`` training windows) are then ranked against it: Spearman's
rank correlation over all (layer, candidate) pairs, and within each candidate (which layers are most
sensitive at a fixed width: what the knapsack trades). Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import time

import torch

from quantlab.gptq import gptq_quantize
from quantlab.mixed import PROXIES, layer_sensitivity, sensitivity_statistics, spearman
from quantlab.quant import PRESETS, Scheme, quantize_rtn

SOLVER = dict(damp=0.01, block_size=128, act_order=True, static_groups=True)   # the SmolLM2 catalogue's GPTQ
CANDIDATES = {"int3-g64": Scheme(3, group_size=64), "int4-g64": PRESETS["int4-g64"],
              "int8-per-channel": PRESETS["int8-per-channel"]}


@torch.no_grad()
def log_probs(model, windows, batch_size=8):
    return torch.cat([torch.log_softmax(model.logits(windows[i:i + batch_size]), dim=-1)
                      for i in range(0, len(windows), batch_size)])


@torch.no_grad()
def single_layer_kl(model, name, scheme, windows, reference, H=None) -> float:
    """The KL increase when only ``name`` is quantized: RTN, or GPTQ against ``H`` (SOLVER) when given."""
    weight = model.module.get_submodule(name).weight
    original = weight.detach().clone()
    try:
        if H is None:
            quantized = quantize_rtn(original, scheme).dequantize()
        else:
            quantized = gptq_quantize(original.float(), H, scheme, **SOLVER).qtensor.dequantize()
        weight.copy_(quantized.to(weight.dtype))
        lp = log_probs(model, windows)
    finally:
        weight.copy_(original)
    return float((reference.exp() * (reference - lp)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--layers", type=int, default=0, help="measure only this many Linears, evenly spaced (0: all)")
    parser.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="the error measured and applied")
    args = parser.parse_args()
    torch.manual_seed(0)

    from quantlab.data import calibration_windows, load_text
    from quantlab.models.registry import load_model

    model_name, seq_len = ("smollm2-135m", 512) if args.smollm2 else ("minigpt-shakespeare", 256)
    model = load_model(model_name)
    calibration = calibration_windows(model.encode(load_text("shakespeare", "train")), args.calibration, seq_len, 0)
    test = model.encode(load_text("shakespeare", "test"))
    windows = test[: args.eval_windows * seq_len].reshape(args.eval_windows, seq_len)

    started = time.perf_counter()
    solver = SOLVER if args.method == "gptq" else None
    proxies = layer_sensitivity(model, calibration, CANDIDATES, solver=solver)
    proxy_seconds = time.perf_counter() - started
    names = list(proxies)
    if args.layers:
        names = names[:: max(1, len(names) // args.layers)]
    reference = log_probs(model, windows)
    started = time.perf_counter()
    hessians = {n: H for n, (H, _) in sensitivity_statistics(model, calibration).items()} if solver else {}
    true = {(n, c): single_layer_kl(model, n, s, windows, reference, hessians.get(n))
            for n in names for c, s in CANDIDATES.items()}
    true_seconds = time.perf_counter() - started

    print(f"{model_name}, {args.method} error: {len(names)} Linears x {len(CANDIDATES)} candidates; proxies from {args.calibration} x "
          f"{seq_len} calibration tokens in {proxy_seconds:.1f} s (one forward+backward); true single-layer KL on "
          f"{args.eval_windows} x {seq_len} test tokens in {true_seconds:.1f} s "
          f"({true_seconds / max(proxy_seconds, 1e-9):.0f}x the proxies)")
    print(f"{'layer':28s} {'candidate':17s} {'true KL':>10s} {'kl_estimate':>12s} {'output_error':>13s}")
    for (n, c), kl in true.items():
        print(f"{n:28s} {c:17s} {kl:10.3e} {proxies[n][c]['kl_estimate']:12.3e} {proxies[n][c]['output_error']:13.3e}")
    keys = list(true)
    print("Spearman rank correlation with the true single-layer KL increase:")
    for proxy in PROXIES:
        overall = spearman([true[k] for k in keys], [proxies[k[0]][k[1]][proxy] for k in keys])
        within = {c: spearman([true[(n, c)] for n in names], [proxies[n][c][proxy] for n in names]) for c in CANDIDATES}
        print(f"  {proxy:13s} all pairs {overall:+.3f}; within a candidate: "
              + ", ".join(f"{c} {v:+.3f}" for c, v in within.items()))


if __name__ == "__main__":
    main()
