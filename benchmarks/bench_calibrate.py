"""Where a whole-model GPTQ run spends its time: block passes, solves, statistics, against one forward pass.

    python benchmarks/bench_calibrate.py                      # SmolLM2-135M, 128 x 512 Shakespeare windows
    python benchmarks/bench_calibrate.py --model minigpt      # the trained MiniGPT, seconds

For INT4 g64 GPTQ (plain, and act-order + static groups) it prints:
- reference: one forward pass of the calibration set through the blocks (first-block inputs, then every
  block on every batch), timed in the same process: the floor a sequential pipeline cannot beat;
- quantize seconds and their ratio to the reference;
- block passes: the Linear work the run did (tokens x in x out summed over every Linear call) over the
  Linear work of one pass; 1.0 is every Linear once per token;
- solve seconds (the GPTQ solves, summed over layers), statistics seconds (condition numbers, input
  spreads, the RTN loss beside GPTQ's) and their share of the quantize time;
- Hessian seconds: accumulating H = X^T X / n, 2 x tokens x in^2 flops per input group, which for a
  Llama block (the down projection reads the 3x wider MLP activations) is about as many flops as the
  block's forward pass, so about one pass of the total whatever the pipeline;
- the process's peak RSS and page faults; ``--trim-budget-mib`` sets how much freed memory the paused
  block runs may keep before it is handed back (quantlab.paused.RETAINED_BYTES): 0 trims at every pause
  that grew the resident set, which costs page faults; a large budget, memory.
Speeds are ratios to the reference pass, with seconds beside them: machines differ, ratios less so.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch
from torch import nn

MODELS = {"smollm2": "smollm2-135m", "minigpt": "minigpt-shakespeare"}
CONFIGURATIONS = {"gptq": {}, "gptq act-order + static": {"act_order": True, "static_groups": True}}


@contextlib.contextmanager
def linear_work():
    """Counts tokens x in x out over every nn.Linear call that computed an output while the block is
    open: {"macs": n}. Counted after the call, so a call stopped by a hook, or one that returns a
    meta-device placeholder (llm-compressor's lm_head while calibrating), is no work."""
    counted = {"macs": 0}

    def count(module, args, output):
        if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor) and output.device.type != "meta":
            x = args[0]
            counted["macs"] += x.numel() // x.shape[-1] * module.in_features * module.out_features

    handle = nn.modules.module.register_module_forward_hook(count)
    try:
        yield counted
    finally:
        handle.remove()


@contextlib.contextmanager
def timed_statistics():
    """Seconds spent in the per-layer statistics that are not the quantization itself ({"seconds": s})
    and in accumulating the Hessians X^T X ({"hessian": s})."""
    from quantlab import calibrate

    spent = {"seconds": 0.0, "hessian": 0.0}
    originals = {"relative_loss": calibrate.relative_loss}
    summarize, add = calibrate.InputStatistics._summarize, calibrate.InputStatistics.add

    def timing(function, key="seconds"):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - started
        return wrapper

    calibrate.relative_loss = timing(calibrate.relative_loss)
    calibrate.InputStatistics._summarize = timing(summarize)
    calibrate.InputStatistics.add = timing(add, "hessian")
    try:
        yield spent
    finally:
        calibrate.relative_loss = originals["relative_loss"]
        calibrate.InputStatistics._summarize = summarize
        calibrate.InputStatistics.add = add


def reference_pass(model, calibration: torch.Tensor, batch_size: int) -> tuple:
    """(seconds, Linear MACs) of one forward pass of ``calibration`` through every block."""
    from quantlab.calibrate import _first_block_inputs, _next_block_inputs

    with torch.no_grad(), linear_work() as work:
        started = time.perf_counter()
        batches = _first_block_inputs(model, calibration, batch_size)
        for b in range(len(model.blocks)):
            batches = _next_block_inputs(model, b, batches)
        seconds = time.perf_counter() - started
    return seconds, work["macs"]


def main(argv=None) -> None:
    from quantlab import paused
    from quantlab.calibrate import quantize_model
    from quantlab.data import calibration_windows, load_text
    from quantlab.models.registry import load_model
    from quantlab.quant import Scheme

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--configurations", nargs="+", choices=sorted(CONFIGURATIONS), default=sorted(CONFIGURATIONS))
    parser.add_argument("--trim-budget-mib", type=int, default=None,
                        help="freed memory the paused runs may keep (default: quantlab.paused.RETAINED_BYTES)")
    args = parser.parse_args(argv)
    if args.trim_budget_mib is not None:
        paused.RETAINED_BYTES = args.trim_budget_mib << 20

    model = load_model(MODELS[args.model])
    seq_len = min(args.seq_len, model.max_seq_len)
    calibration = calibration_windows(model.encode(load_text("shakespeare", "train")), args.windows, seq_len, 0)
    print(f"{model.name}: {calibration.shape[0]} x {calibration.shape[1]} calibration tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads, trim budget {paused.RETAINED_BYTES >> 20} MiB")
    reference_seconds, one_pass = reference_pass(model, calibration, args.batch_size)
    print(f"reference: one forward pass through the blocks {reference_seconds:.1f} s")
    print(f"{'configuration':26} {'quantize s':>10} {'x pass':>7} {'passes':>7} {'hessian s':>9} {'solve s':>8} "
          f"{'stats s':>8} {'stats %':>8}")
    for label in args.configurations:
        options = CONFIGURATIONS[label]
        with linear_work() as work, timed_statistics() as statistics:
            quantized = quantize_model(model, Scheme(4, group_size=64), calibration, method="gptq",
                                       batch_size=args.batch_size, **options)
        solve = sum(layer["seconds"] for layer in quantized.layers.values())
        print(f"{label:26} {quantized.seconds:10.1f} {quantized.seconds / reference_seconds:7.2f} "
              f"{work['macs'] / one_pass:7.2f} {statistics['hessian']:9.1f} {solve:8.1f} {statistics['seconds']:8.1f} "
              f"{100 * statistics['seconds'] / quantized.seconds:7.1f}%")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB, {usage.ru_minflt / 1e6:.2f}M page faults")


if __name__ == "__main__":
    main()
