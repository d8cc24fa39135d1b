"""One spec run: plan -> calibrate -> quantize -> evaluate -> results (the results.json dict).

Each scheme's result is cached on disk under a key made of everything that determines it (the
scheme, the model's checksum, the calibration and evaluation settings, the seed when the scheme draws
calibration data, and quantlab's own source code), so a second run, or a run after editing one scheme,
recomputes only what changed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import quantlab
from quantlab.spec import SchemeConfig, Spec, as_spec

log = logging.getLogger("quantlab")

RESULTS_CACHE_ENV = "QUANTLAB_RESULTS_CACHE"


class Results(dict):
    """The results.json dict of one spec run (see DESIGN.md), with a few conveniences."""

    def scheme(self, name: str) -> dict:
        return self["results"][name]

    @property
    def schemes(self) -> list:
        return list(self["results"])


def default_cache_dir() -> Path:
    return Path(os.environ.get(RESULTS_CACHE_ENV, ".quantlab/cache"))


def code_version() -> str:
    """quantlab's version plus a hash of its source, so editing the engine invalidates cached results."""
    h = hashlib.sha256(quantlab.__version__.encode())
    root = Path(quantlab.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _finite(x):
    return x if not isinstance(x, float) or x == x and abs(x) != float("inf") else None


class SchemeCache:
    """Per-scheme results on disk as JSON, one file per key, written atomically."""

    def __init__(self, directory: Optional[Path], enabled: bool = True):
        self.directory = Path(directory) if directory else None
        self.enabled = enabled and self.directory is not None

    def get(self, key: str) -> Optional[dict]:
        if not self.enabled:
            return None
        path = self.directory / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict) -> None:
        if not self.enabled:
            return
        from quantlab.report import write_json

        self.directory.mkdir(parents=True, exist_ok=True)
        write_json(self.directory / f"{key}.json", value)


class SpecRun:
    """Holds what a spec run shares across schemes: the model, the token streams, the baseline."""

    def __init__(self, spec: Spec, cache: SchemeCache, progress: bool = False):
        self.spec, self.cache, self.progress = spec, cache, progress
        self.health: list = []

    # --- shared inputs, built lazily (a fully cached run never loads the model) ------------------
    @cached_property
    def device(self) -> str:
        if self.spec.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.spec.device

    @cached_property
    def model(self):
        from quantlab.models import load_model

        log.info("loading %s", self.spec.model)
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
        from quantlab.data import calibration_windows, load_text

        c = spec.calibration
        cache = self.__dict__.setdefault("_calibration_tokens", {})
        if c.dataset not in cache:
            cache[c.dataset] = self.model.encode(load_text(c.dataset, "train"))
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
        key = _key([e.dataset, e.split, e.seq_len, e.max_tokens, e.tasks, e.kl_divergence, e.length_normalize])
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            plans[key] = EvalPlan(tokens=self.eval_tokens(spec), seq_len=e.seq_len, max_tokens=e.max_tokens,
                                  tasks=self.tasks(spec), kl=e.kl_divergence, length_normalize=e.length_normalize,
                                  batch_size=e.batch_size, device=self.device)
        return plans[key]

    @cached_property
    def baseline_quantized(self):
        return self.quantize(self.spec, self.spec.schemes[self.spec.baseline])

    def baseline_log_probs(self, spec: Spec):
        from quantlab.evaluate import BaselineLogProbs

        plan = self.plan(spec)
        store = self.__dict__.setdefault("_baselines", {})
        if id(plan) not in store:
            store[id(plan)] = BaselineLogProbs(self.baseline_quantized.model, plan)
        return store[id(plan)]

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
        parts = {
            "code": code_version(), "model": spec.model, "model_sha": self.model_checksum, "scheme": cfg.describe(),
            "keep": spec.keep, "evaluation": vars(spec.evaluation), "device": self.device,
            "baseline": spec.schemes[spec.baseline].describe(),
        }
        if cfg.needs_calibration:
            parts.update(calibration=vars(spec.calibration), seed=spec.seed)
        return _key(parts)

    def quantize(self, spec: Spec, cfg: SchemeConfig):
        from quantlab.calibrate import quantize_model

        calibration = self.calibration(spec) if cfg.needs_calibration else None
        scheme = cfg.quant_scheme()
        quantized = quantize_model(
            self.model, scheme, calibration, method="rtn" if cfg.method == "float" else cfg.method,
            damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order, static_groups=cfg.static_groups,
            batch_size=spec.calibration.batch_size, heldout=self.heldout(spec) if calibration is not None else None,
            progress=self.progress)
        if cfg.method != "float":
            round_kept_modules(quantized.model, set(quantized.qtensors), spec.keep)
        return quantized

    def scheme_result(self, spec: Spec, name: str) -> dict:
        cfg = spec.schemes[name]
        key = self.cache_key(spec, cfg)
        cached = self.cache.get(key)
        if cached is not None:
            log.info("%s: cached", name)
            return cached
        from quantlab.evaluate import evaluate
        from quantlab.report import decode_workload

        log.info("%s: quantizing (%s)", name, cfg.quant_scheme().describe())
        started = time.perf_counter()
        quantized = self.baseline_quantized if name == spec.baseline else self.quantize(spec, cfg)
        quantize_seconds = quantized.seconds if name != spec.baseline else 0.0
        log.info("%s: evaluating", name)
        bytes_info = deployable_bytes(quantized, cfg.quant_scheme(), spec.keep)
        metrics = evaluate(quantized.model, self.plan(spec),
                           baseline=self.baseline_log_probs(spec) if spec.evaluation.kl_divergence else None,
                           bytes_info=bytes_info)
        layers = {n: {k: _finite(v) for k, v in info.items()} for n, info in quantized.layers.items()}
        for n, qt in quantized.qtensors.items():
            layers.setdefault(n, {}).update(code_min=int(qt.codes.min()), code_max=int(qt.codes.max()))
        result = {
            **{k: _finite(v) for k, v in metrics.items() if k != "tasks"},
            "tasks": metrics["tasks"],
            "quantize_seconds": quantize_seconds,
            "params_linear": bytes_info["params_linear"],
            "params_total": bytes_info["params_total"],
            "workload": decode_workload(quantized.model.module),
            "codes": ({"min": min(l["code_min"] for l in layers.values() if "code_min" in l),
                       "max": max(l["code_max"] for l in layers.values() if "code_max" in l)}
                      if quantized.qtensors else None),
            "layers": layers,
            "mean_rel_loss": _mean(l.get("rel_loss") for l in layers.values()),
            "mean_rtn_rel_loss": _mean(l.get("rtn_rel_loss") for l in layers.values()),
            "mean_heldout_rel_loss": _mean(l.get("heldout_rel_loss") for l in layers.values()),
            "health": [{"layer": h.get("layer"), "event": h["event"], "detail": h.get("detail", "")}
                       for h in quantized.health],
            "wall_seconds": time.perf_counter() - started,
        }
        self.cache.put(key, result)
        return result


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Kept modules and bytes


def module_kind(module: nn.Module, name: str, block_prefixes) -> Optional[str]:
    """'embeddings', 'norms' or 'lm_head' for the float modules a spec's `keep` talks about."""
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if "norm" in type(module).__name__.lower():
        return "norms"
    if isinstance(module, nn.Linear) and not any(name.startswith(p + ".") for p in block_prefixes):
        return "lm_head"
    return None


def float_element_bytes(model, keep, scheme) -> dict:
    """id(parameter) -> bytes per element for every parameter that is not a quantized Linear weight:
    4 under a float32 scheme; otherwise 2 for the `keep` kinds and Linear biases, 4 for kinds left out
    of `keep` (a spec that drops lm_head from keep keeps it in float32)."""
    from quantlab.quant import FloatScheme

    if isinstance(scheme, FloatScheme):
        size = 4 if scheme.dtype == "float32" else 2
        return {id(p): size for p in model.module.parameters()}
    prefixes = [model.block_prefix(i) for i in range(len(model.blocks))]
    sizes = {}
    for name, module in model.module.named_modules():
        kind = module_kind(module, name, prefixes)
        for p in module.parameters(recurse=False):
            sizes.setdefault(id(p), 2 if kind is None or kind in keep else 4)
    return sizes


def round_kept_modules(model, quantized_linears: set, keep) -> None:
    """Round the float parameters stored in float16 (see float_element_bytes) through float16, so the
    evaluated model is the deployed one. Called on the quantized copy only."""
    sizes = float_element_bytes(model, keep, None)
    quantized = {id(model.module.get_submodule(n).weight) for n in quantized_linears}
    with torch.no_grad():
        for p in model.module.parameters():
            if id(p) not in quantized and sizes.get(id(p)) == 2:
                p.copy_(p.to(torch.float16).to(p.dtype))


def deployable_bytes(quantized, scheme, keep) -> dict:
    """bytes_total / bytes_linear / params: quantized Linears at their packed size, float parameters at
    their stored size (float_element_bytes), tied parameters counted once."""
    module = quantized.model.module
    sizes = float_element_bytes(quantized.model, keep, scheme)
    seen, bytes_linear, params_linear, bytes_other, params_other = set(), 0, 0, 0, 0
    for name in quantized.model.all_linear_names():
        weight = module.get_submodule(name).weight
        seen.add(id(weight))
        params_linear += weight.numel()
        qtensor = quantized.qtensors.get(name)
        bytes_linear += qtensor.nbytes if qtensor is not None else weight.numel() * sizes[id(weight)]
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            bytes_other += p.numel() * sizes.get(id(p), 2)
            params_other += p.numel()
    return {"bytes_linear": bytes_linear, "bytes_total": bytes_linear + bytes_other,
            "params_linear": params_linear, "params_total": params_linear + params_other}


# ---------------------------------------------------------------------------------------------
# The run


def run(spec, *, out_dir=None, use_cache: bool = True, cache_dir=None, progress: bool = False) -> Results:
    """Run a spec (a path, a dict or a Spec) and return its Results; with ``out_dir``, also write
    results.json, manifest.json and the plots there."""
    from quantlab.report import manifest, measure_machine

    spec = as_spec(spec)
    started = time.perf_counter()
    runner = SpecRun(spec, SchemeCache(cache_dir or default_cache_dir(), use_cache), progress)
    per_scheme = {}
    for name in _baseline_first(spec):
        per_scheme[name] = runner.scheme_result(spec, name)
    _fill_gaps(per_scheme, spec.baseline)

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
            _fill_gaps(point, spec.baseline, per_scheme.get(spec.baseline))
            points.append(point)
        sweeps.append({"key": key, "values": values, "results": points})

    health = [{"scheme": name, **event} for name, r in per_scheme.items() for event in r.get("health", [])]
    first = per_scheme[spec.baseline]
    results = Results({
        "spec": spec.name,
        "spec_sha256": spec.sha256,
        "source": spec.source,
        "seed": spec.seed,
        "baseline": spec.baseline,
        "model": {"name": spec.model, "params_linear": first.get("params_linear"),
                  "params_total": first.get("params_total"), **(first.get("workload") or {})},
        "fingerprint": _cached_fingerprint(runner, spec),
        "schemes": {name: cfg.describe() for name, cfg in spec.schemes.items()},
        "results": per_scheme,
        "sweeps": sweeps,
        "health": health,
        "report": {"plots": spec.report.plots, "memory_budget_bytes": spec.report.memory_budget_bytes,
                   "memory_budget_label": spec.report.memory_budget_label},
        "seconds": time.perf_counter() - started,
    })
    run_manifest = manifest(spec.name, spec.sha256, spec.seed)
    results.update(versions=run_manifest["versions"], git=run_manifest["git"], timestamp=run_manifest["timestamp"],
                   machine={**run_manifest["machine"], **measure_machine()}, manifest=run_manifest)
    if out_dir is not None:
        write_outputs(results, spec, out_dir)
    return results


def write_outputs(results: Results, spec: Spec, out_dir) -> dict:
    """results.json, manifest.json, plots and a standalone report.html in out_dir."""
    from quantlab.report import write_report_files

    results.paths = write_report_files(results, Path(out_dir), spec.report.plots,
                                       memory_budget_bytes=spec.report.memory_budget_bytes)
    return results.paths


def _baseline_first(spec: Spec) -> list:
    return [spec.baseline] + [n for n in spec.schemes if n != spec.baseline]


def _fill_gaps(per_scheme: dict, baseline: str, baseline_result: Optional[dict] = None) -> None:
    """ppl_gap relative to the baseline's ppl on the same windows, when evaluate() left it empty."""
    from quantlab.evaluate import ppl_gap

    base = per_scheme.get(baseline) or baseline_result
    if base is None:
        return
    for result in per_scheme.values():
        if result.get("ppl_gap") is None:
            result["ppl_gap"] = _finite(ppl_gap(result.get("ppl"), base.get("ppl")))


def _cached_fingerprint(runner: SpecRun, spec: Spec) -> dict:
    """The fingerprint is cached like a scheme result, so a fully cached run never loads the model."""
    key = "fingerprint-" + _key([code_version(), spec.model, runner.model_checksum, vars(spec.evaluation)])
    cached = runner.cache.get(key)
    if cached is None:
        cached = runner.fingerprint(spec)
        runner.cache.put(key, cached)
    return cached
