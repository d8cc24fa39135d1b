"""The spec schema: validating dataclasses built from YAML, and loading a spec file.

A spec is data only. Every key is checked against the dataclasses below before any work starts: each
section's field types are read from the dataclass annotations, each dataclass checks its own values in
``__post_init__``, and every mistake is a one-line ``SpecError`` naming the file, the line and the fix:
``specs/minigpt/pareto.yaml:12: unknown key 'schemas' in the spec; did you mean 'schemes'?``
The assertions under ``expect:`` are parsed by the checks in ``quantlab.spec.checks``, the schemes by
``quantlab.spec.schemes``; what a spec names outside itself (model, datasets, tasks, its name as a folder)
is checked by ``quantlab.spec.references``, without loading weights or data. A spec that validates can
run: nothing is refused later that could have been refused here.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from quantlab.accounting import KEEP_KINDS
from quantlab.metrics import LAYER_METRICS, is_metric, unknown_metric_hint
from quantlab.report.plots import PLOTS   # the report's one table of plot names (re-exported by quantlab.spec)
from quantlab.spec import references
from quantlab.spec.checks import SpecView, parse_expectations
from quantlab.spec.located import (Ctx, Located, SpecError, check_keys, dataclass_from, get_value, locate, plain,
                                   read_yaml)
from quantlab.spec.schemes import parse_schemes

DEFAULT_KEEP = list(KEEP_KINDS)
SWEEPABLE = ("calibration.samples", "calibration.seq_len", "calibration.heldout_samples", "calibration.dataset", "seed")
STRING_SWEEPS = ("calibration.dataset",)   # swept over names; the others over integers
# The pytest markers a spec may put on its tests: pytest.ini's (real_model, slow) and the ones quantlab's
# pytest plugin registers (quantlab_spec, real_model). An unregistered marker fails under --strict-markers
# and is a typo otherwise; to add one, register it in pytest.ini's markers and list it here.
MARKERS = ("real_model", "slow", "quantlab_spec")
SEED_RANGE = (0, 2 ** 64 - 1)   # what torch.Generator.manual_seed accepts

@dataclass
class CalibrationConfig:
    dataset: str = "shakespeare"
    samples: int = 128
    seq_len: int = 256
    batch_size: int = 8
    heldout_samples: int = 0   # windows of the validation split on which per-layer error is also measured

    def __post_init__(self):
        if self.heldout_samples < 0:
            raise ValueError("calibration.heldout_samples must be >= 0 (0 turns held-out error off)")
        if self.samples < 1:
            raise ValueError("calibration.samples must be >= 1 (e.g. 128)")
        if self.seq_len < 2:
            raise ValueError("calibration.seq_len must be >= 2 (e.g. 256 or 512)")
        if self.batch_size < 1:
            raise ValueError("calibration.batch_size must be >= 1")


@dataclass
class EvaluationConfig:
    dataset: str = "shakespeare"
    split: str = "test"
    seq_len: int = 256
    max_tokens: Optional[int] = 65536
    tasks: list = field(default_factory=list)
    task_items: Optional[int] = None   # score only the first N items of each task
    kl_divergence: bool = True
    length_normalize: bool = False
    batch_size: int = 8

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError("evaluation.seq_len must be >= 2")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"evaluation.max_tokens ({self.max_tokens}) must be at least seq_len ({self.seq_len})")
        if self.task_items is not None and self.task_items < 1:
            raise ValueError("evaluation.task_items must be >= 1, or omitted for all items")
        if self.split not in ("train", "validation", "test"):
            raise ValueError("evaluation.split must be train, validation or test")


@dataclass
class GoldenConfig:
    metrics: list = field(default_factory=list)
    tolerances: dict = field(default_factory=dict)   # metric -> {"rtol": x, "atol": y}
    layers: Optional[dict] = None                    # {"metric": "rel_loss", "rtol": .., "atol": ..}
    default_tolerance: dict = field(default_factory=lambda: {"rtol": 1e-4, "atol": 1e-8})


@dataclass
class ReportConfig:
    plots: list = field(default_factory=lambda: list(PLOTS))
    memory_budget_bytes: Optional[int] = None
    memory_budget_label: Optional[str] = None


@dataclass
class Spec:
    name: str
    source: str
    sha256: str
    raw: dict
    description: str = ""
    seed: int = 0
    model: str = "minigpt-shakespeare"
    offload: bool = False      # hf:PATH safetensors only: blocks read one at a time (quantlab.offload)
    device: str = "cpu"
    markers: list = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    keep: list = field(default_factory=lambda: list(DEFAULT_KEEP))
    schemes: dict = field(default_factory=dict)      # name -> SchemeConfig, in spec order
    baseline: str = "fp32"
    sweep: Optional[tuple] = None                    # (dotted key, [values])
    expect: list = field(default_factory=list)       # Expectation, '*' expanded
    golden: Optional[GoldenConfig] = None
    report: ReportConfig = field(default_factory=ReportConfig)
    export: list = field(default_factory=list)       # integer scheme names to export (issue 12)
    path: Optional[Path] = None                      # the spec file, when read from one

    def with_value(self, dotted_key: str, value) -> "Spec":
        """A copy of this spec with one sweepable value replaced (used for sweeps)."""
        spec = copy.deepcopy(self)
        if dotted_key == "seed":
            spec.seed = value
        else:
            section, key = dotted_key.split(".")
            setattr(getattr(spec, section), key, value)
        return spec


TOP_KEYS = {f.name for f in fields(Spec)} - {"source", "sha256", "raw", "path"}


def parse_size(value, source, line) -> int:
    """'64MB', '512 MiB', 1e9 -> bytes (a positive whole number)."""
    fix = "write a positive size such as 512MB or 2GiB"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpecError(f"memory budget {value!r} is not a size; {fix}", source, line)
    if isinstance(value, (int, float)):
        number, unit = value, "b"
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?i?B)\s*", value, re.IGNORECASE)
        if not m:
            raise SpecError(f"memory budget {value!r} is not a size; {fix}", source, line)
        number, unit = float(m.group(1)), m.group(2).lower()
    units = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
    if unit not in units:   # "iB" alone
        raise SpecError(f"memory budget {value!r} has an unknown unit; {fix}", source, line)
    if not math.isfinite(number) or int(number * units[unit]) < 1:
        raise SpecError(f"memory budget {value!r} is not a positive size; {fix}", source, line)
    return int(number * units[unit])


def _check_seed(seed, heldout_samples: int, ctx: Ctx, key, what: str) -> None:
    """A seed the generator takes; held-out windows are drawn with seed + 1, so that must fit too."""
    top = SEED_RANGE[1] - (1 if heldout_samples > 0 else 0)
    if not SEED_RANGE[0] <= seed <= top:
        why = " (held-out windows use seed + 1)" if heldout_samples > 0 else ""
        raise ctx.error(f"{what} {seed} is outside what torch.Generator takes{why}; use a seed in 0..{top}", key)


def _check_heldout_corpus(dataset: str, heldout_samples: int, ctx: Ctx, key) -> None:
    """Held-out windows are the calibration corpus's validation text: 'random' has none."""
    if dataset == "random" and heldout_samples > 0:
        raise ctx.error("calibration.heldout_samples needs the calibration corpus's validation text, and 'random' is "
                        "token ids; set heldout_samples: 0 or calibrate on a text corpus", key)


def _parse_sweep(data, ctx: Ctx, spec: "Spec", context: Optional[int]) -> Optional[tuple]:
    """``sweep: {key: [values]}``: each value is checked as if the spec had set it."""
    if data.get("sweep") is None:
        return None
    sw = data["sweep"]
    sctx = Ctx(ctx.source, sw if isinstance(sw, dict) else data)
    if not isinstance(sw, dict) or len(sw) != 1:
        raise ctx.error("sweep must map one key to a list of values, e.g. sweep: {calibration.samples: [4, 16, 64]}", "sweep")
    check_keys(sw, SWEEPABLE, sctx, "sweep")
    key, values = next(iter(sw.items()))
    kind, is_kind = (("dataset names", lambda v: isinstance(v, str)) if key in STRING_SWEEPS
                     else ("integers", lambda v: isinstance(v, int) and not isinstance(v, bool)))
    if not isinstance(values, list) or len(values) < 2 or not all(is_kind(v) for v in values):
        raise sctx.error(f"sweep {key} needs a list of at least two {kind}", key)
    if len(set(values)) != len(values):
        raise sctx.error(f"sweep {key} lists a value twice; list each value once", key)
    if not any(cfg.needs_calibration for cfg in spec.schemes.values()):
        raise sctx.error(f"sweep {key} changes no result: only GPTQ schemes draw calibration data (RTN and float "
                         "results do not depend on it); add a method: gptq scheme or remove the sweep", key)
    for v in values:
        if key == "seed":
            _check_seed(v, spec.calibration.heldout_samples, sctx, key, f"sweep {key} value")
            continue
        field_name = key.split(".")[1]
        if field_name == "dataset":
            references.check_dataset(v, sctx, key, f"sweep {key} value {v!r}")
            _check_heldout_corpus(v, spec.calibration.heldout_samples, sctx, key)
            continue
        try:
            dataclasses.replace(spec.calibration, **{field_name: v})
        except ValueError as e:
            raise sctx.error(f"sweep {key} value {v}: {e}", key) from None
        if field_name == "heldout_samples":
            _check_seed(spec.seed, v, ctx, "seed", "seed")
            _check_heldout_corpus(spec.calibration.dataset, v, sctx, key)
        if field_name == "seq_len":
            references.check_seq_len(v, context, spec.model, f"{key} (in the sweep)", sctx, key)
    return key, list(values)


def _parse_report(data, ctx: Ctx) -> ReportConfig:
    report_map = data.get("report") or Located()
    rctx = Ctx(ctx.source, report_map)
    check_keys(report_map, {"plots", "memory_budget"}, rctx, "report")
    plots = get_value(report_map, "plots", list, list(PLOTS), rctx, "report")
    for p in plots:
        if p not in PLOTS:
            raise rctx.error(f"unknown plot {p!r}; choose from {', '.join(PLOTS)}", "plots")
    budget = report_map.get("memory_budget")
    return ReportConfig(plots=list(plots),
                        memory_budget_bytes=None if budget is None else parse_size(budget, ctx.source, rctx.line("memory_budget")),
                        memory_budget_label=None if budget is None else str(budget))


def _check_markers(markers: list, ctx: Ctx) -> None:
    for m in markers:
        if not isinstance(m, str):
            raise ctx.error(f"markers must be a list of marker names, got {m!r}; write e.g. markers: [real_model]", "markers")
        if m not in MARKERS:
            raise ctx.error(f"marker {m!r} is not registered (registered: {', '.join(MARKERS)}); to use it, add it to "
                            "pytest.ini's markers and to MARKERS in quantlab/spec/schema.py", "markers")


def _check_export(data, ctx: Ctx, schemes: dict) -> list:
    names = get_value(data, "export", list, [], ctx, "the spec")
    for n in names:
        if not isinstance(n, str) or n not in schemes:
            raise ctx.error(f"export lists {n!r}, which is not defined under schemes; defined: {', '.join(schemes)}", "export")
        if not schemes[n].is_integer:
            why = ("an AWQ scheme (its input scales are not folded into the weights)" if schemes[n].awq else
                   "a mixed scheme (a grid per layer)" if schemes[n].mixed is not None else f"a {schemes[n].method} scheme")
            raise ctx.error(f"export lists {n!r}, {why}; only integer schemes (method rtn or gptq, one grid, without "
                            "awq) can be exported", "export")
    if len(set(names)) != len(names):
        raise ctx.error("export lists a scheme twice; list each scheme once", "export")
    return list(names)


def parse_spec(data, source: str = "<spec>", name: Optional[str] = None, text: Optional[str] = None) -> Spec:
    """Validate a spec mapping (from YAML or a dict) and build a Spec. Raises SpecError."""
    data = locate(data)
    ctx = Ctx(source, data)
    if not isinstance(data, dict):
        raise SpecError("a spec must be a YAML mapping with at least model and schemes", source, getattr(data, "line", 1))
    check_keys(data, TOP_KEYS, ctx, "the spec")
    if "schemes" not in data:
        raise SpecError("the spec has no schemes; add e.g. schemes: {fp32: {dtype: float32}, int4-g64: {bits: 4, group_size: 64}}",
                        source, getattr(data, "line", 1))
    digest = hashlib.sha256((text if text is not None else repr(plain(data))).encode()).hexdigest()
    default_name = name or (Path(source).stem if not source.startswith("<") else "spec")
    name = get_value(data, "name", str, default_name, ctx, "the spec")
    if not re.fullmatch(r"[\w.\-/]+", name):
        raise ctx.error(f"name {name!r} may only use letters, digits, '-', '_', '.', '/'", "name")
    references.check_name(name, ctx)

    schemes = parse_schemes(data["schemes"], Ctx(source, data))
    baseline = get_value(data, "baseline", str, "fp32" if "fp32" in schemes else next(iter(schemes)), ctx, "the spec")
    if baseline not in schemes:
        raise ctx.error(f"baseline {baseline!r} is not one of the schemes ({', '.join(schemes)})", "baseline")

    model = get_value(data, "model", str, "minigpt-shakespeare", ctx, "the spec")
    context = references.model_context(model, ctx)
    cal_map, eval_map = data.get("calibration"), data.get("evaluation")
    cctx, ectx = Ctx(source, cal_map or data), Ctx(source, eval_map or data)
    calibration = dataclass_from(CalibrationConfig, cal_map, cctx, "calibration")
    evaluation = dataclass_from(EvaluationConfig, eval_map, ectx, "evaluation")
    references.check_dataset(calibration.dataset, cctx, "dataset", "calibration.dataset")
    references.check_dataset(evaluation.dataset, ectx, "dataset", "evaluation.dataset")
    if evaluation.dataset == "random":
        raise ectx.error("evaluation.dataset 'random' is token ids, not text, and has nothing to score; it is "
                         "calibration data only: evaluate on shakespeare, verbs or your own text", "dataset")
    _check_heldout_corpus(calibration.dataset, calibration.heldout_samples, cctx, "dataset")
    references.check_tasks(evaluation.tasks, ectx)
    references.check_seq_len(calibration.seq_len, context, model, "calibration.seq_len", cctx, "seq_len")
    references.check_seq_len(evaluation.seq_len, context, model, "evaluation.seq_len", ectx, "seq_len")
    markers = get_value(data, "markers", list, [], ctx, "the spec")
    _check_markers(markers, ctx)

    spec = Spec(
        name=name, source=source, sha256=digest, raw=plain(data),
        description=get_value(data, "description", str, "", ctx, "the spec"),
        seed=get_value(data, "seed", int, 0, ctx, "the spec"),
        model=model,
        offload=_parse_offload(data, ctx, model),
        device=get_value(data, "device", str, "cpu", ctx, "the spec", check=lambda d: d in ("cpu", "cuda", "auto"),
                    fix="use cpu, cuda or auto"),
        markers=markers, calibration=calibration, evaluation=evaluation,
        keep=get_value(data, "keep", list, list(DEFAULT_KEEP), ctx, "the spec"),
        schemes=schemes, baseline=baseline, report=_parse_report(data, ctx), export=_check_export(data, ctx, schemes),
    )
    _check_seed(spec.seed, calibration.heldout_samples, ctx, "seed", "seed")
    spec.sweep = _parse_sweep(data, ctx, spec, context)
    for k in spec.keep:
        if k not in DEFAULT_KEEP:
            raise ctx.error(f"keep entry {k!r} is unknown; keep lists module kinds left in float16: {', '.join(DEFAULT_KEEP)}", "keep")
    view = SpecView(schemes, spec.sweep, heldout_samples=calibration.heldout_samples,
                    kl_divergence=evaluation.kl_divergence, tasks=tuple(evaluation.tasks), baseline=baseline)
    spec.expect = parse_expectations(data.get("expect"), Ctx(source, data), view)
    if data.get("golden") is not None:
        spec.golden = _parse_golden(data["golden"], Ctx(source, data["golden"] if isinstance(data["golden"], dict) else data))
    return spec


def _parse_offload(data, ctx: Ctx, model: str) -> bool:
    """``offload: true``: read the model's blocks from its safetensors files one at a time (quantlab.offload)."""
    offload = get_value(data, "offload", bool, False, ctx, "the spec")
    if offload:
        from quantlab.models.registry import HF_PREFIX, hf_path
        from quantlab.offload import offload_problem

        if not model.startswith(HF_PREFIX):
            raise ctx.error(f"offload applies to hf:PATH models stored as safetensors; {model} is built in and "
                            "loaded whole: remove offload", "offload")
        problem = offload_problem(hf_path(model))
        if problem:
            raise ctx.error(problem, "offload")
    return offload


def _parse_golden(g, ctx: Ctx) -> GoldenConfig:
    check_keys(g, {"metrics", "layers", "default_tolerance"}, ctx, "golden")
    metrics = g.get("metrics") or {}
    if isinstance(metrics, list):
        metrics = {m: None for m in metrics}
    if not isinstance(metrics, dict):
        raise ctx.error("golden.metrics must map metric -> tolerance, e.g. {ppl: {rtol: 0.001}}", "metrics")
    tolerances = {}
    for m, tol in metrics.items():
        if not is_metric(m):
            raise ctx.error(f"golden metric {m!r} is unknown; {unknown_metric_hint(m)}", "metrics")
        if tol is not None:
            tolerances[m] = _tolerance(tol, Ctx(ctx.source, tol if isinstance(tol, dict) else g), f"golden.metrics.{m}")
    layers = None
    if g.get("layers") is not None:
        lay = g["layers"]
        lctx = Ctx(ctx.source, lay if isinstance(lay, dict) else g)
        check_keys(lay, {"metric", "rtol", "atol"}, lctx, "golden.layers")
        layers = {"metric": get_value(lay, "metric", str, "rel_loss", lctx, "golden.layers",
                                 check=lambda v: v in LAYER_METRICS, fix=f"use one of {', '.join(LAYER_METRICS)}"),
                  **_tolerance({k: v for k, v in lay.items() if k in ("rtol", "atol")}, lctx, "golden.layers")}
    default = _tolerance(g.get("default_tolerance") or {"rtol": 1e-4, "atol": 1e-8}, ctx, "golden.default_tolerance")
    return GoldenConfig(metrics=list(metrics), tolerances=tolerances, layers=layers, default_tolerance=default)


def _tolerance(tol, ctx: Ctx, what: str) -> dict:
    check_keys(tol, {"rtol", "atol"}, ctx, what)
    out = {}
    for k in ("rtol", "atol"):
        if k in tol:
            v = tol[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ctx.error(f"{what}.{k} must be a finite non-negative number, got {v!r}; write e.g. 0.001", k)
            out[k] = float(v)
    return out


def spec_name_for(path: Path) -> str:
    """Default spec name: its path under a `specs/` folder without the suffix (specs/minigpt/pareto.yaml -> minigpt/pareto)."""
    parts = Path(path).resolve().with_suffix("").parts
    if "specs" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("specs"):])
    return Path(path).stem


def load_spec(path, display: Optional[str] = None) -> Spec:
    """Read and validate a spec file. Raises SpecError (file:line: message) on any user mistake.
    ``display`` is how the file is named in messages (default: the path as given)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read the spec ({e.strerror}); check the path", display or str(path)) from None
    source = display or str(path)
    data = read_yaml(text, source)
    if data is None:
        raise SpecError("the spec is empty; it needs at least model and schemes", source, 1)
    spec = parse_spec(data, source, name=spec_name_for(path), text=text)
    spec.path = path.resolve()
    return spec


def as_spec(spec) -> Spec:
    """A Spec from a Spec, a path, or a dict."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    if isinstance(spec, dict):
        return parse_spec(spec, "<dict>", name=spec.get("name", "spec"))
    raise TypeError(f"a spec is a path, a dict or a Spec, got {type(spec).__name__}")


