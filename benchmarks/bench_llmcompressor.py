"""quantlab's GPTQ calibration + quantization against llm-compressor's ``oneshot`` on the same work (issue 13, item 1).

SmolLM2-135M (float32, quantlab.models.registry.load_model), INT4 symmetric group-64 GPTQ on 128 x 512
Shakespeare train windows (seed 0, built as benchmarks/bench_calibrate.py builds them), batch 8 on both
sides, timed one after the other in one process:

- quantlab: ``quantize_model(model, Scheme(4, group_size=64), calibration, method="gptq", batch_size=8)``
  (one-pass calibration, true-sequential within each block: a block's input groups are quantized in order);
- llm-compressor: ``oneshot`` with a GPTQModifier (weights int4 symmetric, strategy group, group 64,
  targets Linear, lm_head ignored, block_size 128, dampening_frac 0.01 as quantlab's) on a deep copy of the
  same float module, given the same windows as a datasets.Dataset of input_ids (no tokenizer pass),
  num_calibration_samples = windows, max_seq_length = seq len, no shuffling, pipeline "sequential" (its
  default for GPTQ: each decoder layer is run over every batch with hooks to collect Hessians, its Linears
  are quantized, then the layer is run again without hooks to propagate the quantized outputs).

llm-compressor's pins (transformers<=5.17.0, compressed-tensors==0.19.0) conflict with quantlab's, so it
runs from a virtual environment of its own; quantlab's tests never need it:

    python -m venv /tmp/llmc
    /tmp/llmc/bin/pip install torch==2.13.0    # resolves to the local CPU wheel torch-2.13.0+cpu (pip's
                                               # find-links); check with --dry-run that no CUDA build comes
    /tmp/llmc/bin/pip install llmcompressor==0.14.0.1   # pins transformers<=5.17.0, compressed-tensors==0.19.0
    /tmp/llmc/bin/pip install pyyaml safetensors tqdm filelock numpy gguf
    /tmp/llmc/bin/pip install -e /work/main --no-deps
    flock /tmp/quantlab-heavy.lock /tmp/llmc/bin/python benchmarks/bench_llmcompressor.py [--act-order off|on|both]

(``python -m venv --system-site-packages /tmp/llmc`` then the llmcompressor line works as well, taking torch
and quantlab's light dependencies from the system Python; ``/tmp/llmc/bin/pip list`` should show torch
2.13.0+cpu.) On a loaded 2-core machine expect ~10 minutes for llm-compressor alone: its per-column GPTQ
loop takes seconds per Linear whatever the number of calibration tokens.

For each configuration (``--act-order off``: act-order off on both sides, llm-compressor ``actorder=None``;
``on``: quantlab ``act_order=True, static_groups=True`` against llm-compressor ``actorder="static"``) it prints:
- reference: one forward pass of the calibration set through the blocks (bench_calibrate.reference_pass);
- each tool's wall seconds, their ratio to the reference pass, and block passes (Linear work over one
  pass's Linear work, counted by a forward hook on every nn.Linear call that computed its output, as
  bench_calibrate counts; llm-compressor's meta-device lm_head calls are not counted);
- quantlab seconds / llm-compressor seconds (issue 13's target: <= 0.5);
- Shakespeare test perplexity (8 windows of 512 tokens) of the float model and of both quantized models,
  with KL divergence to the float model and top-1 agreement (``--no-eval`` skips it);
- versions and the process's peak RSS.
Prints figures; asserts nothing. Grids differ: quantlab's restricted INT4 grid is [-7, 7] (scale absmax / 7),
compressed-tensors' symmetric INT4 is [-8, 7]; and quantlab stores the kept float modules (embeddings,
norms, lm_head) in float16 where llm-compressor leaves them float32.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_calibrate import linear_work, reference_pass  # noqa: E402


CONFIGURATIONS = {
    "off": ("gptq", {}, None),
    "on": ("gptq act-order + static", {"act_order": True, "static_groups": True}, "static"),
}


def run_quantlab(model, calibration, batch_size: int, options: dict):
    """(wall seconds, Linear MACs, QuantizedModel) of quantlab's GPTQ on ``calibration``."""
    from quantlab.calibrate import quantize_model
    from quantlab.quant import Scheme

    with linear_work() as work:
        started = time.perf_counter()
        quantized = quantize_model(model, Scheme(4, group_size=64), calibration, method="gptq",
                                   batch_size=batch_size, **options)
        seconds = time.perf_counter() - started
    return seconds, work["macs"], quantized


def prepared_copy(model, prefix: str):
    """A copy of the float module that oneshot accepts, and the temporary directory holding its config.

    oneshot re-reads the config from module.config.name_or_path (validate_model) and refuses a model
    "quantized in another format": transformers marks a GGUF-loaded model's config quant_method "gguf",
    though its weights are dequantized float32 here, and quantlab's GGUF cache directory has no
    config.json. So the copy's config drops that mark and points at a temporary copy of itself."""
    module = copy.deepcopy(model.module)
    if getattr(module.config, "quantization_config", None) is not None:
        del module.config.quantization_config
    if getattr(module, "hf_quantizer", None) is not None:
        module.hf_quantizer = None
    config_dir = tempfile.mkdtemp(prefix=prefix)
    module.config.save_pretrained(config_dir)
    module.config._name_or_path = config_dir
    return module, config_dir


def run_llmcompressor(model, calibration, batch_size: int, actorder):
    """(wall seconds, Linear MACs, quantized transformers module, pipeline name) of llm-compressor's oneshot."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    module, config_dir = prepared_copy(model, prefix="bench_llmc_")
    config_groups = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}
    recipe = GPTQModifier(config_groups=config_groups, ignore=["lm_head"], actorder=actorder,
                          block_size=128, dampening_frac=0.01)
    dataset = Dataset.from_dict({"input_ids": calibration.tolist()})
    pipeline = "sequential"
    with linear_work() as work:
        started = time.perf_counter()
        oneshot(model=module, tokenizer=getattr(model, "hf_tokenizer", None), dataset=dataset, recipe=recipe,
                num_calibration_samples=calibration.shape[0], max_seq_length=calibration.shape[1],
                shuffle_calibration_samples=False, batch_size=batch_size, pipeline=pipeline)
        seconds = time.perf_counter() - started
    shutil.rmtree(config_dir, ignore_errors=True)
    return seconds, work["macs"], module, pipeline


def print_rows(rows: list, reference_seconds: float, one_pass: int) -> None:
    print()
    print(f"{'configuration':26} {'tool':15} {'wall s':>8} {'x pass':>7} {'passes':>7} {'ppl':>8} {'KLD':>7} "
          f"{'top-1':>6}")
    for row in rows:
        for tool, key in (("quantlab", "ql"), ("llm-compressor", "lc")):
            seconds, macs = row[key]
            metrics = row.get(f"{key}_eval")
            quality = (f"{metrics['ppl']:8.3f} {metrics['kld_mean']:7.4f} {metrics['top1_agreement']:6.3f}"
                       if metrics else f"{'-':>8} {'-':>7} {'-':>6}")
            print(f"{row['label']:26} {tool:15} {seconds:8.1f} {seconds / reference_seconds:7.2f} "
                  f"{macs / one_pass:7.2f} {quality}")
        ratio = row["ql"][0] / row["lc"][0]
        print(f"{row['label']:26} quantlab / llm-compressor wall time {ratio:.2f} (target <= 0.5)", flush=True)


def main(argv=None) -> None:
    from quantlab.data import calibration_windows, load_text
    from quantlab.models.registry import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--act-order", choices=["off", "on", "both"], default="off")
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    args = parser.parse_args(argv)

    import llmcompressor
    import compressed_tensors
    import transformers

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    seq_len = min(args.seq_len, model.max_seq_len)
    calibration = calibration_windows(model.encode(load_text("shakespeare", "train")), args.windows, seq_len, 0)
    print(f"{model.name}: {calibration.shape[0]} x {calibration.shape[1]} calibration tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}")

    plan = baseline = None
    if not args.no_eval:
        from quantlab.evaluate import BaselineLogProbs, EvalPlan, evaluate

        plan = EvalPlan(tokens=model.encode(load_text("shakespeare", "test")), seq_len=512, max_tokens=8 * 512,
                        kl=True, batch_size=4)
        baseline = BaselineLogProbs(model, plan)
        float_metrics = evaluate(model, plan, baseline=baseline)
        print(f"float32: Shakespeare test ppl {float_metrics['ppl']:.3f} (8 x 512 tokens)")

    reference_seconds, one_pass = reference_pass(model, calibration, args.batch_size)
    print(f"reference: one forward pass of the calibration set through the blocks {reference_seconds:.1f} s")

    chosen = ["off", "on"] if args.act_order == "both" else [args.act_order]
    rows = []
    for key in chosen:
        label, options, actorder = CONFIGURATIONS[key]
        ql_seconds, ql_macs, quantized = run_quantlab(model, calibration, args.batch_size, options)
        print(f"[{label}] quantlab quantize_model: {ql_seconds:.1f} s", flush=True)
        lc_seconds, lc_macs, lc_module, pipeline = run_llmcompressor(model, calibration, args.batch_size, actorder)
        print(f"[{label}] llm-compressor oneshot (GPTQModifier actorder={actorder}, pipeline {pipeline}): "
              f"{lc_seconds:.1f} s", flush=True)
        row = {"label": label, "ql": (ql_seconds, ql_macs), "lc": (lc_seconds, lc_macs), "pipeline": pipeline}
        if plan is not None:
            from quantlab.models.hf import wrap_hf

            row["ql_eval"] = evaluate(quantized.model, plan, baseline=baseline)
            lc_model = wrap_hf(lc_module, getattr(model, "hf_tokenizer", None), f"{model.name} llm-compressor")
            row["lc_eval"] = evaluate(lc_model, plan, baseline=baseline)
            del lc_model
        del quantized, lc_module
        rows.append(row)
        print_rows([row], reference_seconds, one_pass)   # each configuration's figures as soon as it is done

    print_rows(rows, reference_seconds, one_pass)
    if plan is not None:
        print(f"float32 ppl {float_metrics['ppl']:.3f}")
    print(f"reference pass {reference_seconds:.1f} s; llm-compressor pipeline: {rows[0]['pipeline']}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
