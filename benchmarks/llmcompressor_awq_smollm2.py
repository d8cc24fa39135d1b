"""llm-compressor's AWQModifier on SmolLM2-135M, scored with quantlab's own evaluation (as specs/smollm2/methods.yaml).

Run in a virtual environment of its own, so llm-compressor's pins (transformers, compressed-tensors) stay
out of quantlab's:

    python -m venv --system-site-packages /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor
    /tmp/llmc/bin/python benchmarks/llmcompressor_awq_smollm2.py [--group-size 64] [--no-awq]

Same model, calibration windows (16 x 512 tokens of the Shakespeare train split, seed 0) and evaluation
(the test split's first 4,096 tokens in 512-token windows, KL against the float model) as the spec. The
grid is compressed-tensors' symmetric INT4 ([-8, 7], scale = absmax / 7.5) per group, not quantlab's
restricted [-7, 7]: say so beside any comparison. ``--no-awq`` is llm-compressor's plain RTN on that
grid (QuantizationModifier), the like-for-like reference. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--no-awq", action="store_true", help="RTN on the same grid (QuantizationModifier)")
    parser.add_argument("--duo-scaling", choices=["true", "false"], default="true")
    args = parser.parse_args()
    torch.manual_seed(0)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from quantlab.data import calibration_windows, load_text
    from quantlab.evaluate import BaselineLogProbs, EvalPlan, evaluate
    from quantlab.models.registry import load_model

    model = load_model("smollm2-135m")
    windows = calibration_windows(model.encode(load_text("shakespeare", "train")), 16, 512, 0)
    plan = EvalPlan(tokens=model.encode(load_text("shakespeare", "test")), seq_len=512, max_tokens=4096, kl=True,
                    batch_size=4)
    baseline = BaselineLogProbs(model, plan)
    float_metrics = evaluate(model, plan, baseline=baseline)

    config_groups = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}}}
    if args.no_awq:
        recipe = QuantizationModifier(config_groups=config_groups, ignore=["lm_head"])
    else:
        recipe = AWQModifier(config_groups=config_groups, ignore=["lm_head"], duo_scaling=args.duo_scaling == "true")
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    started = time.perf_counter()
    # oneshot insists on a processor whenever a dataset is given, even one already tokenized.
    oneshot(model=model.module, tokenizer=model.hf_tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=len(windows),
            max_seq_length=512, shuffle_calibration_samples=False, pipeline="sequential" if not args.no_awq else "independent")
    seconds = time.perf_counter() - started
    metrics = evaluate(model, plan, baseline=baseline)
    name = "RTN (QuantizationModifier)" if args.no_awq else f"AWQModifier (duo_scaling={args.duo_scaling})"
    print(f"SmolLM2-135M, llm-compressor {name}, INT4 [-8, 7] symmetric g{args.group_size}, 16 x 512 calibration")
    print(f"  fp32: ppl {float_metrics['ppl']:.3f}")
    print(f"  quantized: ppl {metrics['ppl']:.3f} (gap {metrics['ppl'] / float_metrics['ppl'] - 1:+.1%}), "
          f"KLD {metrics['kld_mean']:.4f}, top-1 {metrics['top1_agreement']:.3f}, oneshot {seconds:.0f} s")


if __name__ == "__main__":
    main()
