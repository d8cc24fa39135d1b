"""quantlab's in-process quantization beside the same quantization written to disk and read back, on SmolLM2-135M.

    python benchmarks/interop_smollm2.py                  # exports in a temporary folder, removed afterwards
    python benchmarks/interop_smollm2.py --out exports/   # keeps the exports (and the spec that reads them)

Exports INT4 g64 RTN as compressed-tensors (``quantlab export``'s code path) and INT4 g32 RTN as GGUF Q4_0
(tokenizer files saved beside the .gguf, which holds no tokenizer metadata), writes a spec whose schemes are
the in-process ones beside ``{checkpoint: hf:...}`` and ``{checkpoint: gguf:...}``, runs it with quantlab.run
under specs/smollm2/pareto.yaml's protocol (calibration, evaluation windows, seed; no tasks, for time) and
prints perplexity, KL divergence against fp32 and bytes side by side. It asserts nothing: it shows what
``specs/smollm2/interop.yaml`` cannot, since a checkpoint path must exist when a spec is loaded.

RTN rather than GPTQ for speed: the file layout is the same as GPTQ's without act-order.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PARETO = ROOT / "specs" / "smollm2" / "pareto.yaml"
IN_PROCESS = {"int4-g64": {"bits": 4, "group_size": 64, "method": "rtn"},     # preset int4-g64, restricted grid
              "int4-g32": {"bits": 4, "group_size": 32, "method": "rtn"}}     # Q4_0's block size


def interop_spec(base: dict, hf_dir: Path, gguf_file: Path) -> dict:
    """pareto.yaml's model and protocol with the in-process schemes and the checkpoints that hold them."""
    evaluation = {**base["evaluation"], "tasks": []}
    evaluation.pop("task_items", None)
    return {
        "description": "quantlab in process vs its own exports read back (benchmarks/interop_smollm2.py)",
        "seed": base["seed"], "model": base["model"], "calibration": base["calibration"], "evaluation": evaluation,
        "schemes": {"fp32": "fp32",
                    "int4-g64": IN_PROCESS["int4-g64"], "int4-g64-hf-export": {"checkpoint": f"hf:{hf_dir}"},
                    "int4-g32": IN_PROCESS["int4-g32"], "int4-g32-gguf-q4_0": {"checkpoint": f"gguf:{gguf_file}"}},
        "baseline": "fp32",
        "expect": [],
        "report": {"plots": []},
    }


def export_both(base_spec, out: Path) -> tuple[Path, Path]:
    from quantlab import export
    from quantlab.cache import SchemeCache
    from quantlab.pipeline import SpecRun
    from quantlab.spec import parse_spec

    spec = parse_spec({**base_spec, "schemes": {"fp32": "fp32", **IN_PROCESS}, "expect": []}, str(PARETO),
                      name="smollm2/interop-export")
    runner = SpecRun(spec, SchemeCache(None, enabled=False))
    hf_dir = export.export_compressed_tensors(runner.quantize(spec, spec.schemes["int4-g64"]), out / "int4-g64").path
    gguf_file = out / "gguf" / "int4-g32.gguf"
    export.export_gguf(runner.quantize(spec, spec.schemes["int4-g32"]), gguf_file)
    runner.model.hf_tokenizer.save_pretrained(gguf_file.parent)   # the GGUF holds no tokenizer metadata
    return hf_dir, gguf_file


def table(results) -> str:
    rows = [f"{'scheme':24s} {'ppl':>9s} {'KLD vs fp32':>12s} {'top-1 agree':>11s} {'bytes_total':>13s} "
            f"{'bytes_linear':>13s} {'bytes_on_disk':>14s}"]
    for name, r in results["results"].items():
        def num(key, fmt):
            value = r.get(key)
            return format(value, fmt) if value is not None else "-"
        rows.append(f"{name:24s} {num('ppl', '9.4f')} {num('kld_mean', '12.5f')} {num('top1_agreement', '11.4f')} "
                    f"{num('bytes_total', '13,d')} {num('bytes_linear', '13,d')} {num('bytes_on_disk', '14,d')}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="keep the exports and the spec here (default: a temporary folder)")
    args = parser.parse_args(argv)
    from quantlab.pipeline import run

    base = yaml.safe_load(PARETO.read_text())
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="quantlab-interop-"))
    try:
        hf_dir, gguf_file = export_both(base, out)
        spec_file = out / "interop.yaml"
        spec_file.write_text(yaml.safe_dump(interop_spec(base, hf_dir, gguf_file), sort_keys=False))
        results = run(str(spec_file), use_cache=False)
        print(table(results))
        print(json.dumps({name: {k: r.get(k) for k in ("ppl", "kld_mean", "bytes_total", "bytes_on_disk")}
                          for name, r in results["results"].items()}))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
