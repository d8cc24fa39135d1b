"""What does one scheme's evaluation cost, against the yardstick of one forward pass of the evaluation set?

    python benchmarks/bench_evaluate.py             # MiniGPT: 256 windows x 256 tokens of Shakespeare's test split
    python benchmarks/bench_evaluate.py --smollm2   # + SmolLM2-135M (49,152-token vocabulary; slow, ~6 GB file)

With the baseline's log-probs stored once in a float16 file (quantlab.evaluate.BaselineLogProbs with a
path, what a spec run does) a scheme's evaluation is its own forward pass plus reading the baseline
back and the KL divergence: the target is at most 1.1x one forward pass. The old fallback above the
1 GiB in-memory limit (the baseline recomputed for every scheme, ~2x) is timed beside it. The scheme
evaluated is INT4 g64 RTN as the pipeline evaluates it: block-major (quantlab.evaluate.window_logits),
each block's weights swapped into the float model once per pass (quantlab.swap). Beside the float
model's batch-by-batch pass are timed its block-major pass and the scheme's batch-by-batch pass with
its weights swapped in around every call (tasks off, so the figures are the window pass alone). Each
figure is the best of ``--repeats`` runs, interleaved.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench_gptq.py: shared machines

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from quantlab.evaluate import BaselineLogProbs, EvalPlan, evaluate, next_token_log_probs, window_logits  # noqa: E402

SETUPS = {"minigpt": ("minigpt-shakespeare", 256, 65536), "smollm2": ("smollm2-135m", 512, 65536)}


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@torch.inference_mode()
def forward_pass(model, plan: EvalPlan) -> None:
    """One forward pass of the evaluation set, batch by batch, logits to log-probs (what any scheme needs)."""
    windows = plan.windows()
    for start in range(0, len(windows), plan.batch_size):
        next_token_log_probs(model.logits(windows[start:start + plan.batch_size]))


@torch.inference_mode()
def block_major_pass(model, plan: EvalPlan) -> None:
    """The same pass as evaluation runs it (quantlab.evaluate.window_logits: block-major for a model
    that names its head), logits to log-probs."""
    for _, _, logits in window_logits(model, plan.windows(), plan.batch_size, plan.device):
        next_token_log_probs(logits)


def bench(name: str, repeats: int) -> None:
    from quantlab.data import load_text
    from quantlab.models.registry import load_model

    model_name, seq_len, max_tokens = SETUPS[name]
    model = load_model(model_name)
    plan = EvalPlan(model.encode(load_text("shakespeare", "test")), seq_len=seq_len, max_tokens=max_tokens,
                    kl=True, batch_size=8)
    from quantlab.calibrate import quantize_model
    from quantlab.quant import PRESETS

    scheme = quantize_model(model, PRESETS["int4-g64"], None).model   # swapped in per call, no copy
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        path = Path(tmp) / "baseline.f16.npy"
        # Stored whatever its size (SmolLM2's is 6.4 GB): the file is what is measured. A spec run stores
        # up to BaselineLogProbs' max_file_bytes and recomputes above it.
        write = timed(lambda: BaselineLogProbs(model, plan, path=path, max_file_bytes=1 << 40))
        stored = BaselineLogProbs(model, plan, path=path, max_file_bytes=1 << 40)
        recomputed = BaselineLogProbs(model, plan, max_cached_bytes=0)
        size = path.stat().st_size + stored.top1_path.stat().st_size
        forward, block_major, swapped, from_file, recompute = [], [], [], [], []
        for _ in range(repeats):
            forward.append(timed(lambda: forward_pass(model, plan)))
            block_major.append(timed(lambda: block_major_pass(model, plan)))
            swapped.append(timed(lambda: forward_pass(scheme, plan)))
            from_file.append(timed(lambda: evaluate(scheme, plan, stored)))
            recompute.append(timed(lambda: evaluate(scheme, plan, recomputed)))
        del stored
    f, b, w, s, r = min(forward), min(block_major), min(swapped), min(from_file), min(recompute)
    tokens = plan.windows().numel()
    print(f"{name}: {plan.windows().shape[0]} windows x {seq_len} tokens ({tokens:,}), "
          f"vocabulary {model.vocab_size:,}, torch threads {torch.get_num_threads()}, best of {repeats}")
    print(f"  one forward pass of the evaluation set : {f:8.3f} s   (the float model, batch by batch)")
    print(f"  the same pass, block-major             : {b:8.3f} s   ratio {b / f:5.2f}  (as evaluation runs it)")
    print(f"  batch by batch, INT4 weights swapped in : {w:8.3f} s   ratio {w / f:5.2f}  (swapped per batch)")
    print(f"  baseline file written once              : {write:8.3f} s   size {size / 2**20:,.1f} MiB "
          f"({size:,} bytes: float16 log-probs + int32 argmax)")
    print(f"  scheme evaluation, baseline from file   : {s:8.3f} s   ratio to one forward pass {s / f:5.2f}"
          f"  (target <= 1.1; {s / b:4.2f} of the block-major pass)")
    print(f"  scheme evaluation, baseline recomputed  : {r:8.3f} s   ratio to one forward pass {r / f:5.2f}"
          "  (the old fallback)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (slow; writes a ~6 GB file)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in ["minigpt"] + (["smollm2"] if args.smollm2 else []):
        bench(name, args.repeats)


if __name__ == "__main__":
    main()
