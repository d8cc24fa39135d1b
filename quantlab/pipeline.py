"""One spec run: plan -> calibrate -> quantize -> evaluate -> results (a ``RunResult``, results.json).

Each scheme's result is computed once and stored in the scheme cache (quantlab.cache) under a key of
everything that determines it; the baseline is computed first, since every other scheme's KL divergence
and ppl_gap are measured against it. Sweeps rerun only the schemes a swept value changes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

import quantlab
from quantlab.cache import (SchemeCache, checkpoint_checksum, code_version, data_checksum, default_cache_dir, key_of,
                            result_versions)
from quantlab.results import HealthEvent, RunResult, SchemeResult, Sweep
from quantlab.spec import SchemeConfig, Spec, as_spec

log = logging.getLogger("quantlab")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``str()`` is the one line to show: what was cached, and that a rerun resumes."""


# ``quantlab.run`` returns a RunResult; the name the design brief and users know.
Results = RunResult


class SpecRun:
    """Holds what a spec run shares across schemes: the model, the token streams, the baseline."""

    def __init__(self, spec: Spec, cache: SchemeCache, progress: bool = False):
        self.spec, self.cache, self.progress = spec, cache, progress

    # --- shared inputs, built lazily (a fully cached run never loads the model) ------------------
    @cached_property
    def device(self) -> str:
        if self.spec.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.spec.device

    @cached_property
    def model(self):
        from quantlab.models import load_model

        log.info("loading %s%s", self.spec.model, " (offloaded: blocks read one at a time)" if self.spec.offload else "")
        if self.spec.offload:
            from quantlab.models.hf import load_hf
            from quantlab.models.registry import hf_path

            # Its quantizations keep their codes in files beside the cache's results (or in a temporary directory).
            scratch = self.cache.directory / "offload" if self.cache.enabled else None
            return load_hf(hf_path(self.spec.model), self.device, name=self.spec.model, offload=True, scratch=scratch)
        return load_model(self.spec.model, device=self.device)

    @cached_property
    def model_checksum(self) -> str:
        from quantlab.models import model_checksum

        return model_checksum(self.spec.model)

    def eval_tokens(self, spec: Spec) -> torch.Tensor:
        return self._eval_tokens_for(spec.evaluation.dataset, spec.evaluation.split)

    def _eval_tokens_for(self, dataset: str, split: str) -> torch.Tensor:
        cache = self.__dict__.setdefault("_eval_tokens", {})
        if (dataset, split) not in cache:
            from quantlab.data import load_text

            cache[(dataset, split)] = self.model.encode(load_text(dataset, split))
        return cache[(dataset, split)]

    def calibration(self, spec: Spec) -> torch.Tensor:
        from quantlab.data import calibration_windows, corpus_tokens

        c = spec.calibration
        cache = self.__dict__.setdefault("_calibration_tokens", {})
        if c.dataset not in cache:
            cache[c.dataset] = corpus_tokens(self.model, c.dataset, "train")   # encoded text, or random ids
        return calibration_windows(cache[c.dataset], c.samples, c.seq_len, spec.seed)

    def heldout(self, spec: Spec) -> Optional[torch.Tensor]:
        """Validation-split windows on which each layer's error is also measured (None when off)."""
        from quantlab.data import calibration_windows

        c = spec.calibration
        if c.heldout_samples == 0:
            return None
        tokens = self._eval_tokens_for(c.dataset, "validation")
        return calibration_windows(tokens, c.heldout_samples, c.seq_len, spec.seed + 1)

    def tasks(self, spec: Spec) -> dict:
        from quantlab.data import load_task

        limit = spec.evaluation.task_items
        return {name: load_task(name)[:limit] for name in spec.evaluation.tasks}

    def plan(self, spec: Spec):
        from quantlab.evaluate import EvalPlan

        e = spec.evaluation
        key = key_of([e.dataset, e.split, e.seq_len, e.max_tokens, e.tasks, e.kl_divergence, e.length_normalize])
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            plans[key] = EvalPlan(tokens=self.eval_tokens(spec), seq_len=e.seq_len, max_tokens=e.max_tokens,
                                  tasks=self.tasks(spec), kl=e.kl_divergence, length_normalize=e.length_normalize,
                                  batch_size=e.batch_size, device=self.device)
        return plans[key]

    def baseline_quantized(self, spec: Spec):
        """The baseline scheme's model under ``spec`` (a sweep point may calibrate it differently)."""
        store = self.__dict__.setdefault("_baseline_models", {})
        key = self.cache_key(spec, spec.schemes[spec.baseline])
        if key not in store:
            store[key] = self.quantize(spec, spec.schemes[spec.baseline])
        return store[key]

    def baseline_log_probs(self, spec: Spec):
        import shutil
        import tempfile
        import weakref

        from quantlab.cache import baseline_log_probs_path
        from quantlab.evaluate import BaselineLogProbs

        plan = self.plan(spec)
        store = self.__dict__.setdefault("_baselines", {})
        key = (id(plan), self.cache_key(spec, spec.schemes[spec.baseline]))
        if key not in store:
            # Stored once as a float16 file and streamed back for every scheme: in the cache directory
            # (reused by later runs), or without a cache in a temporary directory removed with this run.
            if self.cache.enabled:
                directory = self.cache.directory
            else:
                if "_baseline_tmp" not in self.__dict__:
                    self._baseline_tmp = Path(tempfile.mkdtemp(prefix="quantlab-baseline-"))
                    weakref.finalize(self, shutil.rmtree, self._baseline_tmp, ignore_errors=True)
                directory = self._baseline_tmp
            path = baseline_log_probs_path(directory, key[1], plan.windows_sha256(), plan.seq_len)
            store[key] = BaselineLogProbs(self.baseline_quantized(spec).model, plan, path=path)
        return store[key]

    # --- the fingerprint of the evaluation protocol ---------------------------------------------
    def fingerprint(self, spec: Spec) -> dict:
        e = spec.evaluation
        plan = self.plan(spec)
        return {
            "quantlab_version": quantlab.__version__,
            "model": spec.model,
            "dataset": e.dataset,
            "split": e.split,
            "normalisation": "none (raw text as shipped, UTF-8)",
            "tokenizer": self.model.tokenizer,
            "bos": "none added",
            **plan.fingerprint(),
            "baseline": spec.baseline,
            "scales": "float16, rounded up to the next float16 value; codes computed against the stored scale",
            "kept_modules": f"{', '.join(spec.keep)} stored and evaluated in float16 for integer schemes",
        }

    # --- one scheme --------------------------------------------------------------------------------
    def cache_key(self, spec: Spec, cfg: SchemeConfig) -> str:
        """The key of ``cfg``'s result under ``spec``: everything that determines it (module docstring)."""
        parts = {
            "code": code_version(), "versions": result_versions(), "model": spec.model,
            "model_sha": self.model_checksum, "scheme": cfg.describe(), "keep": spec.keep,
            "evaluation": vars(spec.evaluation), "device": self.device,
            # float32 reductions split differently over threads: GPTQ's codes move with the count
            "torch_threads": torch.get_num_threads(),
            "data": [data_checksum(spec.evaluation.dataset)] + [data_checksum(t, "task") for t in spec.evaluation.tasks],
        }
        if cfg.needs_calibration:
            parts.update(calibration=vars(spec.calibration), seed=spec.seed,
                         calibration_data=data_checksum(spec.calibration.dataset))
        if cfg.method == "checkpoint":
            parts["checkpoint_sha"] = checkpoint_checksum(cfg.checkpoint)
        if cfg.name != spec.baseline:
            parts["baseline"] = self.cache_key(spec, spec.schemes[spec.baseline])
        return key_of(parts)

    def quantize(self, spec: Spec, cfg: SchemeConfig):
        from quantlab.calibrate import quantize_model
        from quantlab.data import calibration_health

        if cfg.method == "checkpoint":
            return self.imported(cfg.checkpoint)
        calibration = self.calibration(spec) if cfg.needs_calibration else None
        quantized = quantize_model(
            self.model, cfg.quant_scheme(), calibration, method=cfg.method, keep=spec.keep,
            damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order, static_groups=cfg.static_groups,
            batch_size=spec.calibration.batch_size, heldout=self.heldout(spec) if calibration is not None else None,
            progress=self.progress, awq=cfg.awq and cfg.method == "gptq")
        quantized.health += calibration_health(calibration)   # too few distinct windows (quantlab.data)
        return quantized

    def imported(self, uri: str):
        """A checkpoint another tool (or quantlab's export) wrote, refused unless it is the spec's model."""
        from quantlab.models.checkpoint import load_checkpoint, mismatch

        quantized = load_checkpoint(uri, device=self.device)
        problem = mismatch(self.model, quantized.model, uri)
        if problem:
            raise ValueError(problem)
        return quantized

    def servable(self, name: str, cfg: SchemeConfig) -> Optional[dict]:
        """Whether the scheme's layout can be exported and served, per format (quantlab.export)."""
        if cfg.method in ("float", "checkpoint"):
            return None
        from quantlab.export import servability_table

        try:
            return servability_table(self.model, {name: cfg})[name]
        except ModuleNotFoundError:   # transformers comes with the [hf] extra: without it, nothing to say
            return None

    def scheme_result(self, spec: Spec, name: str) -> SchemeResult:
        cfg = spec.schemes[name]
        entry, cached = self.cache.get_or_compute(self.cache_key(spec, cfg),
                                                  lambda: self._compute(spec, name).to_json())
        if cached:
            log.info("%s: cached", name)
        return SchemeResult.from_json(entry)

    def _compute(self, spec: Spec, name: str) -> SchemeResult:
        from quantlab.evaluate import evaluate
        from quantlab.roofline import decode_workload

        cfg = spec.schemes[name]
        log.info("%s: %s", name, f"reading {cfg.checkpoint}" if cfg.method == "checkpoint"
                 else f"quantizing ({cfg.quant_scheme().describe()})")
        started = time.perf_counter()
        quantized = self.baseline_quantized(spec) if name == spec.baseline else self.quantize(spec, cfg)
        log.info("%s: evaluating", name)
        metrics = evaluate(quantized.model, self.plan(spec),
                           baseline=self.baseline_log_probs(spec) if spec.evaluation.kl_divergence else None)
        layers = {n: dict(info) for n, info in quantized.layers.items()}
        for n, qt in quantized.qtensors.items():
            layers.setdefault(n, {}).update(code_min=int(qt.codes.min()), code_max=int(qt.codes.max()))
        return SchemeResult(
            **metrics,
            **quantized.bytes,
            quantize_seconds=quantized.seconds if name != spec.baseline else 0.0,
            workload=decode_workload(quantized.model.module),
            codes=({"min": min(l["code_min"] for l in layers.values() if "code_min" in l),
                    "max": max(l["code_max"] for l in layers.values() if "code_max" in l)}
                   if quantized.qtensors else None),
            layers=layers,
            mean_rel_loss=_mean(l.get("rel_loss") for l in layers.values()),
            mean_rtn_rel_loss=_mean(l.get("rtn_rel_loss") for l in layers.values()),
            mean_heldout_rel_loss=_mean(l.get("heldout_rel_loss") for l in layers.values()),
            health=[HealthEvent(event=h["event"], layer=h.get("layer"), detail=h.get("detail", ""))
                    for h in quantized.health],
            versions=result_versions(),
            servable=self.servable(name, cfg),
            wall_seconds=time.perf_counter() - started,
        )


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# The run


def run(spec, *, out_dir=None, use_cache: bool = True, cache_dir=None, progress: bool = False) -> RunResult:
    """Run a spec (a path, a dict or a Spec) and return its RunResult; with ``out_dir``, also write
    results.json, manifest.json, the plots and report.html there. Ctrl-C raises RunInterrupted."""
    spec = as_spec(spec)
    cache = SchemeCache(cache_dir or default_cache_dir(), use_cache)
    try:
        return _run(spec, cache, out_dir, progress)
    except KeyboardInterrupt:
        where = f"{cache.writes} new result(s) stored in {cache.directory}" if cache.enabled else "nothing cached"
        raise RunInterrupted(f"interrupted while running {spec.source}: {where}; every stored result is "
                             "whole, and a rerun resumes from them") from None


def _run(spec: Spec, cache: SchemeCache, out_dir, progress: bool) -> RunResult:
    from quantlab.report.provenance import manifest
    from quantlab.roofline import measure_machine

    started = time.perf_counter()
    runner = SpecRun(spec, cache, progress)
    per_scheme = {}
    for name in _baseline_first(spec):
        per_scheme[name] = runner.scheme_result(spec, name)
    per_scheme = _with_gaps({name: per_scheme[name] for name in spec.schemes}, per_scheme[spec.baseline])

    sweeps = []
    if spec.sweep is not None:
        key, values = spec.sweep
        points = []
        for value in values:
            variant = spec.with_value(key, value)
            point = {}
            for name, cfg in spec.schemes.items():
                if runner.cache_key(variant, cfg) != runner.cache_key(spec, cfg):
                    log.info("sweep %s=%s: %s", key, value, name)
                    point[name] = runner.scheme_result(variant, name)
                else:  # this value does not change the scheme (RTN under a calibration sweep)
                    point[name] = per_scheme[name]
            points.append(_with_gaps(point, point.get(spec.baseline) or per_scheme[spec.baseline]))
        sweeps.append(Sweep(key=key, values=tuple(values), results=tuple(points)))

    health = [dataclasses.replace(event, scheme=name) for name, r in per_scheme.items() for event in r.health]
    first = per_scheme[spec.baseline]
    run_manifest = manifest(spec.name, spec.sha256, spec.seed)
    results = RunResult(
        spec=spec.name,
        spec_sha256=spec.sha256,
        source=spec.source,
        seed=spec.seed,
        baseline=spec.baseline,
        model={"name": spec.model, "params_linear": first.params_linear, "params_total": first.params_total,
               **first.workload},
        fingerprint=_cached_fingerprint(runner, spec),
        schemes={name: cfg.describe() for name, cfg in spec.schemes.items()},
        results=per_scheme,
        sweeps=tuple(sweeps),
        health=tuple(health),
        report={"plots": spec.report.plots, "memory_budget_bytes": spec.report.memory_budget_bytes,
                "memory_budget_label": spec.report.memory_budget_label,
                "ppl_gap_thresholds": [{"scheme": e.scheme, "op": e.op, "threshold": e.threshold, "line": e.line}
                                       for e in spec.expect if e.kind == "compare" and e.metric == "ppl_gap"
                                       and isinstance(e.threshold, (int, float))]},
        seconds=time.perf_counter() - started,
        versions=run_manifest["versions"], git=run_manifest["git"], timestamp=run_manifest["timestamp"],
        machine={**run_manifest["machine"], **measure_machine(linear_shapes=first.workload.get("linear_shapes"))},
        manifest=run_manifest,
    )
    if out_dir is not None:
        write_outputs(results, spec, out_dir)
    return results


def write_outputs(results: RunResult, spec: Spec, out_dir) -> dict:
    """results.json, manifest.json, plots and a standalone report.html in out_dir, and the checkpoint
    of every scheme the spec's ``export:`` lists under out_dir/export/<scheme>; returns their paths."""
    from quantlab.report import write_report_files

    if spec.export:
        results = dataclasses.replace(results, exports=export_schemes(spec, Path(out_dir) / "export"))
    return write_report_files(results, Path(out_dir), spec.report.plots,
                              memory_budget_bytes=spec.report.memory_budget_bytes)


def export_schemes(spec: Spec, directory: Path) -> dict:
    """Write each ``export:`` scheme as a compressed-tensors checkpoint in directory/<scheme>. The result
    cache holds numbers, not weights, so each exported scheme is quantized again here: deterministic,
    it gives the codes that were evaluated."""
    from quantlab.export import export_compressed_tensors

    runner = SpecRun(spec, SchemeCache(None, enabled=False))
    exports = {}
    for name in spec.export:
        log.info("%s: exporting to %s", name, directory / name)
        quantized = runner.quantize(spec, spec.schemes[name])
        info = export_compressed_tensors(quantized, directory / name, overwrite=True)
        exports[name] = {"format": info.format, "path": str(info.path), "bytes_on_disk": info.bytes_on_disk,
                         "bytes_total": quantized.bytes["bytes_total"]}
    return exports


def _baseline_first(spec: Spec) -> list:
    return [spec.baseline] + [n for n in spec.schemes if n != spec.baseline]


def _with_gaps(per_scheme: dict, baseline: SchemeResult) -> dict:
    """Every scheme with ppl_gap measured against the baseline where the evaluation left it empty."""
    return {name: result.with_gap_to(baseline) for name, result in per_scheme.items()}


def _cached_fingerprint(runner: SpecRun, spec: Spec) -> dict:
    """The fingerprint is cached like a scheme result, so a fully cached run never loads the model. Its
    key holds everything the fingerprint is computed from: the evaluation settings and data, the model,
    the baseline, the kept modules, the code and the libraries."""
    key = "fingerprint-" + key_of({
        "code": code_version(), "versions": result_versions(), "model": spec.model,
        "model_sha": runner.model_checksum, "evaluation": vars(spec.evaluation), "baseline": spec.baseline,
        "keep": spec.keep, "data": data_checksum(spec.evaluation.dataset),
    })
    return runner.cache.get_or_compute(key, lambda: runner.fingerprint(spec))[0]
