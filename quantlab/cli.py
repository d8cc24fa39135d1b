"""The `quantlab` command line: run, validate, and list models and datasets — the same engine as the
pytest plugin, without pytest."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from quantlab import __version__


def _spec_paths(paths) -> list:
    """Files as given; folders expanded to their *.yaml / *.yml files, sorted."""
    out = []
    for p in map(Path, paths):
        out += sorted(q for q in p.rglob("*") if q.suffix in (".yaml", ".yml")) if p.is_dir() else [p]
    return out


def cmd_validate(args) -> int:
    from quantlab.spec import SpecError, load_spec

    failed = 0
    for path in _spec_paths(args.specs):
        try:
            spec = load_spec(path)
            print(f"ok    {path}: {spec.name}, {len(spec.schemes)} schemes, {len(spec.expect)} assertions")
        except SpecError as e:
            failed += 1
            print(f"error {e}")
    return 1 if failed else 0


def cmd_run(args) -> int:
    from quantlab.pipeline import RunInterrupted, run
    from quantlab.report import assertion_entry, interpretation, metrics_table_text, rewrite_report_page
    from quantlab.spec import SpecError, check, load_spec

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    status = 0
    fanned = None
    if args.ray is not None:
        try:
            fanned = _fan_out_on_ray(args)
        except (ModuleNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted while the schemes ran on Ray: every stored result is whole, and a rerun "
                  "resumes from them", file=sys.stderr)
            return 130
    for path in _spec_paths(args.specs):
        try:
            spec = load_spec(path)
        except SpecError as e:
            print(f"error {e}", file=sys.stderr)
            status = 1
            continue
        if fanned is not None and fanned.errors_for(spec):
            from quantlab.distributed import failure_message

            # Running it here would compute the failed schemes on this machine: report them instead.
            print(f"\n== {spec.name}: not run\nerror {failure_message(spec, fanned.errors_for(spec))}", file=sys.stderr)
            status = 1
            continue
        out = Path(args.out) / spec.name
        try:
            results = run(spec, out_dir=out, use_cache=not args.no_cache, progress=not args.quiet)
        except RunInterrupted as e:
            print(f"\n{e}", file=sys.stderr)
            return 130   # the shell's code for Ctrl-C
        print(f"\n== {spec.name} ({results['seconds']:.1f} s) -> {out}")
        print(metrics_table_text(results))
        for sentence in interpretation(results, spec.report.memory_budget_bytes):
            print(f"  * {sentence}")
        entries = []
        for exp in spec.expect:
            outcome = check(exp, results, spec)
            mark, failed = verdict(outcome.passed, exp.xfail)
            status = 1 if failed else status
            print(f"  {mark} {outcome.message}" + (f" (expected to fail: {exp.xfail})" if exp.xfail else ""))
            entries.append(assertion_entry(exp, outcome, mark, source=spec.source))
        # The run wrote report.html before the assertions were judged: write it again with their outcomes.
        rewrite_report_page(out, entries, memory_budget_bytes=spec.report.memory_budget_bytes)
    return status


def _fan_out_on_ray(args):
    """Compute the uncached schemes of every valid spec as Ray tasks into the cache (quantlab.distributed);
    the runs that follow read them from it. Malformed specs are left to the run loop to report."""
    from quantlab.distributed import fan_out
    from quantlab.spec import SpecError, load_spec

    if args.no_cache:
        raise ValueError("--ray needs the results cache (workers leave their results there): drop --no-cache")
    if args.ray != "local" and Path(args.ray).exists():
        raise ValueError(f"--ray took {args.ray} as the cluster's address; put the spec paths before --ray, "
                         "or write --ray=ADDRESS")
    specs = []
    for path in _spec_paths(args.specs):
        try:
            specs.append(load_spec(path))
        except SpecError:
            pass
    fanned = fan_out(specs, args.ray, progress=not args.quiet)
    done = sum(f.computed for f in fanned.finished)
    print(f"ray: {len(fanned.units)} task(s) in {fanned.seconds:.1f} s, {done} result(s) stored, "
          f"{len(fanned.failures)} failed", file=sys.stderr)
    return fanned


def verdict(passed: bool, xfail) -> tuple[str, bool]:
    """(the mark to print, whether it fails the run), as pytest judges a strict xfail: an expected
    failure that holds is XFAIL; one that passes is XPASS(strict), a failure, so no threshold is loosened
    silently."""
    if xfail:
        return ("XPASS(strict)", True) if passed else ("XFAIL", False)
    return ("PASS ", False) if passed else ("FAIL ", True)


def cmd_export(args) -> int:
    """Quantize one scheme of a spec exactly as ``quantlab run`` does and write it as a deployable
    checkpoint. Servability is checked before anything is quantized or written."""
    from quantlab import export
    from quantlab.cache import SchemeCache
    from quantlab.pipeline import SpecRun
    from quantlab.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        print(f"error {e}", file=sys.stderr)
        return 1
    if args.scheme not in spec.schemes:
        print(f"error: {args.spec} has no scheme {args.scheme!r}; defined: {', '.join(spec.schemes)}", file=sys.stderr)
        return 2
    cfg = spec.schemes[args.scheme]
    # No result cache: an export needs the quantized weights themselves, which the cache never stores.
    runner = SpecRun(spec, SchemeCache(None, enabled=False))
    key = {export.COMPRESSED_TENSORS: "compressed_tensors", export.GGUF: "gguf"}[args.format]
    ok, reason = export.servability_table(runner.model, {args.scheme: cfg})[args.scheme][key]
    if not ok:
        print(f"error: {args.scheme} of {spec.model} cannot be exported as {args.format}: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.format == export.GGUF:
        target = out / f"{args.scheme}.gguf"
        if target.exists() and not args.overwrite:
            print(f"error: {target} already exists; pass --overwrite or choose another --out", file=sys.stderr)
            return 1
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: {out} already exists and is not empty; pass --overwrite or choose another --out",
              file=sys.stderr)
        return 1
    quantized = runner.quantize(spec, cfg)
    try:
        if args.format == export.GGUF:
            info = export.export_gguf(quantized, target)
        else:
            info = export.export_compressed_tensors(quantized, out, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    where = info.path.parent if args.format == export.GGUF else info.path
    weights = ", ".join(f for f in info.files if f.endswith((".safetensors", ".gguf")))
    bytes_total = quantized.bytes.get("bytes_total")
    print(f"{where}")
    print(f"  {'on disk':<12} {info.bytes_on_disk:>14,} B  {weights}")
    if bytes_total is not None:
        # Side by side, as they differ: the file also holds what the accounting leaves out (headers,
        # metadata, shape tensors) and the kept float tensors (embeddings, norms, lm_head) in the module's
        # own dtype, float32 for an hf: model, where the accounting counts them as float16.
        ratio = info.bytes_on_disk / bytes_total
        print(f"  {'bytes_total':<12} {bytes_total:>14,} B  quantlab's byte accounting (on disk {ratio:.3f}x)")
    return 0


def cmd_models(args) -> int:
    from quantlab.models import list_models

    for name, description in list_models().items():
        print(f"{name:24s} {description}")
    return 0


def cmd_datasets(args) -> int:
    from quantlab.data import list_datasets, list_tasks

    print("datasets (calibration.dataset, evaluation.dataset):")
    for name, description in list_datasets().items():
        print(f"  {name:22s} {description}")
    print("tasks (evaluation.tasks):")
    for name, description in list_tasks().items():
        print(f"  {name:22s} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"quantlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run specs: results.json, manifest.json and plots per spec")
    p.add_argument("specs", nargs="+", help="spec files or folders")
    p.add_argument("--out", default=".quantlab/out", help="output folder (default: .quantlab/out)")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of reusing cached results")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="compute the uncached schemes and sweep points as tasks on a Ray cluster (ADDRESS, e.g. "
                        "auto or ray://head:10001; none: a local one) into the shared results cache, then run "
                        "from it; needs quantlab[ray]")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check specs without running them")
    p.add_argument("specs", nargs="+")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("export", help="quantize one scheme of a spec and write it as a deployable checkpoint")
    p.add_argument("spec", help="spec file")
    p.add_argument("--scheme", required=True, help="the scheme to export (a name under the spec's schemes)")
    p.add_argument("--out", required=True, help="output folder: the model directory (compressed-tensors), "
                                                "or the folder that receives SCHEME.gguf (gguf)")
    p.add_argument("--format", choices=["compressed-tensors", "gguf"], default="compressed-tensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.set_defaults(func=cmd_export)
    sub.add_parser("models", help="list the models quantlab can load").set_defaults(func=cmd_models)
    sub.add_parser("datasets", help="list the datasets and tasks").set_defaults(func=cmd_datasets)
    return parser


def main(argv=None) -> int:
    # OpenMP threads that spin while they wait slow GPTQ's many small per-column steps badly on a busy
    # machine (benchmarks/bench_gptq.py measures the solver). Set for this command's process only, and
    # before torch is imported; a library import never changes the host process's settings.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
