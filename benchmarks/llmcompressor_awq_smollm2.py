"""llm-compressor's AWQModifier on SmolLM2-135M, scored with quantlab's own evaluation (as specs/smollm2/methods.yaml).

Run in a virtual environment of its own, so llm-compressor's pins (transformers, compressed-tensors) stay
out of quantlab's (benchmarks/bench_llmcompressor.py says how to make /tmp/llmc):

    flock /tmp/quantlab-heavy.lock /tmp/llmc/bin/python benchmarks/llmcompressor_awq_smollm2.py \\
        [--group-size 64] [--duo-scaling true|false|both] [--no-awq]
    /tmp/llmc/bin/python benchmarks/llmcompressor_awq_smollm2.py --model hf:DIR --windows 4 --seq-len 64   # smoke test

Same model, calibration windows (16 x 512 tokens of the Shakespeare train split, seed 0, batches of 4)
and evaluation (the test split's first 4,096 tokens in 512-token windows, KL against the float model,
quantlab.evaluate on the quantized module) as the spec. The grid is compressed-tensors' symmetric INT4
per group ([-8, 7], scale = absmax / 7.5, minmax observer), not quantlab's restricted [-7, 7] (scale
absmax / 7): say so beside any comparison. ``--no-awq`` is llm-compressor's plain RTN on that grid
(QuantizationModifier alone), the like-for-like reference for what AWQ adds. The AWQ recipe is the one the
deprecated ``llmcompressor.modifiers.awq.AWQModifier`` expands to: the transform AWQModifier (default
mappings for Llama: input_layernorm -> q/k/v, v_proj -> o_proj, post_attention_layernorm -> gate/up,
up_proj -> down_proj; n_grid 20) then a QuantizationModifier. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import shutil
import time

import torch

from bench_llmcompressor import prepared_copy  # benchmarks/ is the script's directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--no-awq", action="store_true", help="RTN on the same grid (QuantizationModifier alone)")
    parser.add_argument("--duo-scaling", choices=["true", "false", "both"], default="true")
    parser.add_argument("--model", default="smollm2-135m", help="a quantlab model name or hf:PATH (a smoke test)")
    parser.add_argument("--windows", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)

    import compressed_tensors
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from quantlab.data import calibration_windows, load_text
    from quantlab.evaluate import BaselineLogProbs, EvalPlan, evaluate
    from quantlab.models.hf import wrap_hf
    from quantlab.models.registry import load_model

    model = load_model(args.model)
    windows = calibration_windows(model.encode(load_text("shakespeare", "train")), args.windows, args.seq_len, 0)
    plan = EvalPlan(tokens=model.encode(load_text("shakespeare", "test")), seq_len=args.seq_len,
                    max_tokens=8 * args.seq_len, kl=True, batch_size=4)
    baseline = BaselineLogProbs(model, plan)
    float_metrics = evaluate(model, plan, baseline=baseline)

    config_groups = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}}}
    quantize = QuantizationModifier(config_groups=config_groups, ignore=["lm_head"])
    duo = {"true": True, "false": False, "both": "both"}[args.duo_scaling]
    recipe = [quantize] if args.no_awq else [AWQModifier(duo_scaling=duo), quantize]
    dataset = Dataset.from_dict({"input_ids": windows.tolist()})
    if not torch.cuda.is_available():
        # AWQModifier pins each cached batch before its grid search (for non-blocking host-to-device copies);
        # on a CPU-only torch pin_memory raises "Cannot access accelerator device", and there is no copy to
        # speed up, so pinning is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    module, config_dir = prepared_copy(model, prefix="llmc_awq_")
    started = time.perf_counter()
    try:
        # oneshot insists on a processor whenever a dataset is given, even one already tokenized.
        oneshot(model=module, tokenizer=getattr(model, "hf_tokenizer", None), dataset=dataset, recipe=recipe,
                num_calibration_samples=len(windows), max_seq_length=windows.shape[1],
                shuffle_calibration_samples=False, batch_size=4, pipeline="sequential")
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    quantized = wrap_hf(module, getattr(model, "hf_tokenizer", None), f"{model.name} llm-compressor")
    metrics = evaluate(quantized, plan, baseline=baseline)
    name = "RTN (QuantizationModifier)" if args.no_awq else f"AWQModifier (duo_scaling={args.duo_scaling})"
    print(f"{model.name}, llm-compressor {llmcompressor.__version__} (compressed-tensors "
          f"{compressed_tensors.__version__}) {name}, INT4 [-8, 7] symmetric g{args.group_size}, "
          f"{args.windows} x {args.seq_len} calibration, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  fp32: ppl {float_metrics['ppl']:.3f}")
    print(f"  quantized: ppl {metrics['ppl']:.3f} (gap {metrics['ppl'] / float_metrics['ppl'] - 1:+.1%}), "
          f"KLD {metrics['kld_mean']:.4f}, top-1 {metrics['top1_agreement']:.3f}, oneshot {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
