"""A model larger than memory: quantize (RTN, GPTQ) and evaluate a random ~2B Llama block by block (issue 13, item 5).

Writes a randomly initialised Llama-architecture model (transformers LlamaConfig, float32, seeded) as
sharded safetensors into a cache directory once (rewritten only when its configuration changes), with a
32,000-token byte-level BPE tokenizer trained on the Shakespeare training split. Then, each in a process
of its own so that peak resident memory is the run's own:

- offloaded (``load_hf(..., offload=True)``, quantlab.offload): load, RTN, GPTQ on a few calibration
  windows, and evaluation (perplexity, KL divergence from the float model) of the float baseline, RTN and GPTQ;
- fully loaded (the default path), the same steps, for comparison (``--modes offload`` skips it).

Each phase prints its seconds and its peak RSS (VmHWM, reset before the phase through
/proc/self/clear_refs), and each run its overall peak; the offloaded run's target is under 3 GB (``--size
2b``). A random model predicts nearly uniformly (perplexity near the vocabulary size): the point is memory
and time, and that the offloaded and fully loaded runs agree (their perplexities and KL are printed side by side).

    python benchmarks/bench_large_model.py --size 200m             # ~200M parameters, minutes
    python benchmarks/bench_large_model.py --size 2b               # 2.23B parameters (8.9 GB float32 on disk)
    python benchmarks/bench_large_model.py --size 2b --modes offload --cache-dir /tmp/quantlab-large
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),   # a smoke test of the script
    # ~200M: for trying the benchmark out; ~2B: the model (hidden 2560, 26 layers: 2.23B parameters).
    "200m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=16),
    "2b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=20,
               num_key_value_heads=20),
}
VOCAB = 32000
SEED = 0
INIT_STD = 0.02   # LlamaConfig's initializer_range: what from_config would draw


def config_of(size: str) -> dict:
    return dict(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0,
                eos_token_id=1, **SIZES[size])


# ----------------------------------------------------------------------------------------------
# The model on disk


def write_model(directory: Path, size: str) -> Path:
    """The random model of ``size`` in ``directory``/<config hash>: written unless already complete.
    Tensor by tensor, one shard per block, so writing it never holds more than one block either."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quantlab.data import load_text
    from quantlab.testing import tiny_tokenizer

    config_values = config_of(size)
    digest = hashlib.sha256(json.dumps({**config_values, "seed": SEED, "std": INIT_STD}, sort_keys=True).encode())
    path = directory / f"llama-{size}-{digest.hexdigest()[:12]}"
    done = path / "quantlab-bench-complete.json"
    if done.is_file() and json.loads(done.read_text()) == config_values:
        print(f"model: {path} (already written)")
        return path
    started = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**config_values)
    config.save_pretrained(path)
    text = load_text("shakespeare", "train")
    tokenizer = tiny_tokenizer(sentences=[text[i:i + 10_000] for i in range(0, len(text), 10_000)], vocab_size=VOCAB)
    tokenizer.save_pretrained(path)
    with init_empty_weights():
        module = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in module.named_parameters()]
    prefix = "model.layers."
    shards = [[n for n in names if not n.startswith(prefix)]]
    shards += [[n for n in names if n.startswith(f"{prefix}{b}.")] for b in range(config.num_hidden_layers)]
    shapes = dict((name, p.shape) for name, p in module.named_parameters())
    generator = torch.Generator().manual_seed(SEED)
    weight_map = {}
    for s, shard in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            shape = shapes[name]
            tensors[name] = (torch.ones(shape) if len(shape) == 1   # RMSNorm weights start at one
                             else torch.randn(shape, generator=generator) * INIT_STD)
            weight_map[name] = file
        save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
    total = sum(torch.Size(shape).numel() for shape in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 4}, "weight_map": weight_map}, indent=1))
    done.write_text(json.dumps(config_values))
    print(f"model: {path} written ({total / 1e9:.2f}B parameters, {total * 4 / 1e9:.1f} GB) "
          f"in {time.perf_counter() - started:.0f} s")
    return path


# ----------------------------------------------------------------------------------------------
# One run, in a process of its own


def reset_peak() -> None:
    """Reset the kernel's resident-memory high-water mark (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run(model_dir: Path, mode: str, args) -> dict:
    """One mode's run; its scratch files (the baseline's log-probs, an offloaded model's codes) are
    removed at the end, so repeated runs do not pile them up in the cache directory."""
    scratch = Path(args.cache_dir) / f"scratch-{mode}-{os.getpid()}"
    try:
        return _run_phases(model_dir, mode, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_phases(model_dir: Path, mode: str, args, scratch: Path) -> dict:
    import torch

    from quantlab.calibrate import quantize_model
    from quantlab.data import calibration_windows, load_text
    from quantlab.evaluate import BaselineLogProbs, EvalPlan, evaluate
    from quantlab.models.hf import load_hf
    from quantlab.quant import FloatScheme, Scheme

    phases, overall = {}, 0

    def phase(name, fn):
        nonlocal overall
        reset_peak()
        started = time.perf_counter()
        out = fn()
        seconds, peak = time.perf_counter() - started, peak_bytes()
        overall = max(overall, peak)
        phases[name] = {"seconds": seconds, "peak_rss_gb": peak / 1e9}
        print(f"  [{mode}] {name:<14} {seconds:8.1f} s   peak RSS {peak / 1e9:6.2f} GB", flush=True)
        return out

    model = phase("load", lambda: load_hf(model_dir, offload=mode == "offload", scratch=scratch))
    scheme = Scheme(bits=4, granularity="group", group_size=args.group_size)

    def data():
        # Tokenizing the whole 4.4 MB training split peaks near 0.8 GB above the model (the fast
        # tokenizer's encodings) and glibc keeps some of it afterwards: handed back here, so that the
        # phases after it are not measured on top of it. Its own peak counts in the run's.
        calibration = calibration_windows(model.encode(load_text("shakespeare", "train")),
                                          args.calibration_windows, args.seq_len, SEED)
        plan = EvalPlan(model.encode(load_text("shakespeare", "test")), seq_len=args.seq_len,
                        max_tokens=args.eval_windows * args.seq_len, batch_size=args.batch_size)
        return calibration, plan

    calibration, plan = phase("data", data)
    _malloc_trim()
    # As a spec run goes: the baseline's log-probs first (stored in a file), then each scheme quantized,
    # evaluated against them and let go.
    base = quantize_model(model, FloatScheme("float32"), None)
    scratch.mkdir(parents=True, exist_ok=True)
    baseline = phase("baseline", lambda: BaselineLogProbs(base.model, plan, path=scratch / "baseline.npy"))
    metrics = {}
    for name, method, tokens in (("rtn", "rtn", None), ("gptq", "gptq", calibration)):
        quantized = phase(f"quantize {name}", lambda: quantize_model(model, scheme, tokens, method=method,
                                                                     batch_size=args.batch_size))
        m = phase(f"evaluate {name}", lambda: evaluate(quantized.model, plan, baseline=baseline))
        metrics[name] = {k: m[k] for k in ("ppl", "ppl_gap", "kld_mean", "top1_agreement", "nan_count")}
        print(f"  [{mode}] {name}: ppl {m['ppl']:.2f}  ppl_gap {m['ppl_gap']:.5f}  kld_mean {m['kld_mean']:.6f}",
              flush=True)
        quantized = None   # let go of its codes before the next scheme, as a spec run does
    n_params = sum(p.numel() for p in model.module.parameters())
    return {"mode": mode, "params": n_params, "phases": phases, "peak_rss_gb": overall / 1e9, "metrics": metrics,
            "torch_threads": torch.get_num_threads(),
            "blocks_loaded": model.offload.loads if model.offload is not None else None,
            "most_resident_blocks": model.offload.most_resident if model.offload is not None else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="2b")
    parser.add_argument("--cache-dir", default="/tmp/quantlab-large-model",
                        help="where the random model is written once, and the runs' scratch files")
    parser.add_argument("--modes", default="offload,full", help="comma-separated: offload, full")
    parser.add_argument("--calibration-windows", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--target-gb", type=float, default=3.0, help="the offloaded run's peak RSS target")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)   # internal: one mode, in this process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_one:
        print("RESULT " + json.dumps(run(Path(args.model_dir), args.run_one, args)), flush=True)
        return 0

    model_dir = write_model(Path(args.cache_dir), args.size)
    results = {}
    for mode in args.modes.split(","):
        print(f"{mode}: running in a fresh process", flush=True)
        command = [sys.executable, __file__, "--run-one", mode, "--model-dir", str(model_dir)] + [
            a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
        result = [line for line in lines if line.startswith("RESULT ")]
        if proc.returncode != 0 or not result:
            print(f"{mode}: failed (exit {proc.returncode})")
            continue
        results[mode] = json.loads(result[0][len("RESULT "):])

    print(f"\n{args.size}: INT4 g{args.group_size}, GPTQ on {args.calibration_windows} x {args.seq_len} windows, "
          f"evaluation on {args.eval_windows} x {args.seq_len}")
    keys = ["load", "data", "baseline", "quantize rtn", "evaluate rtn", "quantize gptq", "evaluate gptq"]
    header = f"{'':<16}" + "".join(f"{mode + ' s':>12}{mode + ' GB':>12}" for mode in results)
    print(header)
    for key in keys:
        print(f"{key:<16}" + "".join(f"{r['phases'][key]['seconds']:12.1f}{r['phases'][key]['peak_rss_gb']:12.2f}"
                                     for r in results.values()))
    for mode, r in results.items():
        print(f"{mode}: {r['params'] / 1e9:.2f}B parameters, peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"blocks loaded {r['blocks_loaded']}, most resident at once {r['most_resident_blocks']}; "
              + "; ".join(f"{n} ppl {m['ppl']:.3f} kld {m['kld_mean']:.6f}" for n, m in r["metrics"].items()))
    if "offload" in results:
        peak = results["offload"]["peak_rss_gb"]
        verdict = "met" if peak < args.target_gb else "NOT met"
        print(f"offloaded peak RSS {peak:.2f} GB: target < {args.target_gb} GB {verdict}")
    if len(results) == 2:
        o, f = results["offload"], results["full"]
        total = lambda r: sum(p["seconds"] for p in r["phases"].values())   # noqa: E731
        print(f"offloaded / fully loaded: peak RSS {o['peak_rss_gb'] / f['peak_rss_gb']:.2f}x, "
              f"seconds {total(o) / total(f):.2f}x ({total(o):.0f} s vs {total(f):.0f} s)")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
