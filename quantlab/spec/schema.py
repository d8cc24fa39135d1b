"""The spec schema: validating dataclasses built from YAML, and loading a spec file.

A spec is data only. Every key is checked against the dataclasses below before any work starts: each
section's field types are read from the dataclass annotations, each dataclass checks its own values in
``__post_init__``, and every mistake is a one-line ``SpecError`` naming the file, the line and the fix:
``specs/minigpt/pareto.yaml:12: unknown key 'schemas' in the spec; did you mean 'schemes'?``
The assertions under ``expect:`` are parsed by the checks in ``quantlab.spec.checks``.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from quantlab.accounting import KEEP_KINDS
from quantlab.calibrate import METHODS
from quantlab.metrics import LAYER_METRICS, is_metric, unknown_metric_hint
from quantlab.quant import FLOAT_DTYPES, PRESETS, FloatScheme, Scheme
from quantlab.spec.checks import SpecView, parse_expectations
from quantlab.spec.located import (Ctx, Located, SpecError, check_keys, get_value, locate, plain, read_yaml)

DEFAULT_KEEP = list(KEEP_KINDS)
PLOTS = ("pareto", "accuracy", "calibration_size", "per_layer", "roofline")
SWEEPABLE = ("calibration.samples", "calibration.seq_len", "calibration.heldout_samples", "seed")

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
class SchemeConfig:
    """One scheme: a float dtype, or an integer grid plus the method that picks the codes."""

    name: str
    method: str = "rtn"
    dtype: Optional[str] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None
    granularity: Optional[str] = None
    symmetric: bool = True
    grid: str = "restricted"
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        if self.dtype is not None:
            if self.bits is not None:
                raise ValueError(f"scheme {self.name!r} sets both dtype and bits; a scheme is either a float dtype or an integer grid")
            self.method = "float"
        elif self.bits is None:
            raise ValueError(f"scheme {self.name!r} needs bits (integer grid) or dtype ({', '.join(FLOAT_DTYPES)})")
        if self.method not in METHODS:
            raise ValueError(f"scheme {self.name!r}: method must be rtn or gptq, got {self.method!r}")
        if self.method == "float" and self.dtype is None:
            raise ValueError(f"scheme {self.name!r}: method float needs dtype")
        if self.method != "gptq" and (self.act_order or self.static_groups):
            raise ValueError(f"scheme {self.name!r}: act_order/static_groups only apply to method: gptq")
        if not 0 <= self.damp < 1:
            raise ValueError(f"scheme {self.name!r}: damp must be in [0, 1), e.g. 0.01")
        if self.block_size < 1:
            raise ValueError(f"scheme {self.name!r}: block_size must be >= 1, e.g. 128")
        self.quant_scheme()  # validates bits/granularity/group_size with the quantizer's own rules

    def quant_scheme(self):
        if self.dtype is not None:
            return FloatScheme(self.dtype)
        return Scheme(self.bits, group_size=self.group_size, granularity=self.granularity,
                      symmetric=self.symmetric, grid=self.grid)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def describe(self) -> dict:
        d = {"method": self.method, "scheme": self.quant_scheme().describe()}
        if self.dtype is None:
            d.update(bits=self.bits, group_size=self.group_size, granularity=self.quant_scheme().granularity,
                     symmetric=self.symmetric, grid=self.grid)
        if self.method == "gptq":
            d.update(act_order=self.act_order, static_groups=self.static_groups, damp=self.damp, block_size=self.block_size)
        return d


SCHEME_KEYS = {f.name for f in fields(SchemeConfig)} - {"name"} | {"preset"}


def preset_fields(name: str) -> dict:
    """The SchemeConfig fields a preset of ``quant.PRESETS`` stands for; a spec may extend a preset:
    ``int4-g64-gptq: {preset: int4-g64, method: gptq}``."""
    preset = PRESETS[name]
    if isinstance(preset, FloatScheme):
        return {"dtype": preset.dtype}
    out = {"bits": preset.bits, "granularity": preset.granularity}
    if preset.group_size is not None:
        out["group_size"] = preset.group_size
    return out
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


def field_types(cls) -> dict:
    """{field: (the Python type a YAML value must have, whether null is allowed)}, read from the
    dataclass annotations (``Optional[int]`` -> (int, True), ``list`` -> (list, False))."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) is typing.Union and len(args) == 1
        out[f.name] = (args[0] if optional else hint, optional)
    return out


def _dataclass_from(cls, mapping, ctx: Ctx, what: str, exclude=(), **extra):
    """Build a validating dataclass from a YAML mapping, turning its ValueErrors into SpecErrors."""
    mapping = mapping if mapping is not None else Located()
    types = {k: t for k, t in field_types(cls).items() if k not in exclude and k not in extra}
    check_keys(mapping, set(types), ctx, what)
    kwargs = {}
    for key, (typ, optional) in types.items():
        if key in mapping:
            # null is a value only where the field is Optional (max_tokens: null = the whole split)
            kwargs[key] = None if optional and mapping[key] is None else get_value(mapping, key, typ, None, ctx, what)
    try:
        return cls(**extra, **kwargs)
    except ValueError as e:
        bad = next((k for k in kwargs if k in str(e)), None)
        line = mapping.line_of(bad) if isinstance(mapping, Located) and bad else getattr(mapping, "line", None)
        raise SpecError(f"{e}", ctx.source, line) from None


def parse_size(value, source, line) -> int:
    """'64MB', '512 MiB', 1e9 -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)\s*", str(value), re.IGNORECASE)
    if not m:
        raise SpecError(f"memory budget {value!r} is not a size; write e.g. 512MB or 2GiB", source, line)
    units = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
    return int(float(m.group(1)) * units[m.group(2).lower()])


def _parse_schemes(mapping, ctx: Ctx) -> dict:
    if not isinstance(mapping, dict) or not mapping:
        raise ctx.error("schemes must be a non-empty mapping of name -> scheme (e.g. fp32: {dtype: float32})", "schemes")
    out = {}
    for name, body in mapping.items():
        line = mapping.line_of(name) if isinstance(mapping, Located) else None
        if isinstance(body, str):  # `int4-g64: int4-g64` names a preset
            body = Located({"preset": body})
            body.line, body.key_lines = line, {"preset": line}
        if body is None and name in PRESETS:
            body = Located({"preset": name})
            body.line, body.key_lines = line, {"preset": line}
        if not isinstance(body, dict):
            raise SpecError(f"scheme {name!r} must be a mapping like {{bits: 4, group_size: 64}} or a preset name "
                            f"({', '.join(PRESETS)})", ctx.source, line)
        check_keys(body, SCHEME_KEYS, ctx, f"scheme {name!r}")
        merged = Located()
        merged.line, merged.key_lines = getattr(body, "line", line), dict(getattr(body, "key_lines", {}))
        if "preset" in body:
            preset = body["preset"]
            if preset not in PRESETS:
                close = difflib.get_close_matches(str(preset), PRESETS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known presets: {', '.join(PRESETS)}"
                raise SpecError(f"unknown preset {preset!r} for scheme {name!r}; {hint}", ctx.source, body.line_of("preset"))
            merged.update(preset_fields(preset))
            for k in preset_fields(preset):
                merged.key_lines[k] = body.line_of("preset")
        merged.update({k: v for k, v in body.items() if k != "preset"})
        out[str(name)] = _dataclass_from(SchemeConfig, merged, ctx, f"scheme {name!r}", name=str(name))
    return out


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

    schemes = _parse_schemes(data["schemes"], Ctx(source, data))
    baseline = get_value(data, "baseline", str, "fp32" if "fp32" in schemes else next(iter(schemes)), ctx, "the spec")
    if baseline not in schemes:
        raise ctx.error(f"baseline {baseline!r} is not one of the schemes ({', '.join(schemes)})", "baseline")

    sweep = None
    if data.get("sweep") is not None:
        sw = data["sweep"]
        sctx = Ctx(source, sw if isinstance(sw, dict) else data)
        if not isinstance(sw, dict) or len(sw) != 1:
            raise ctx.error("sweep must map one key to a list of values, e.g. sweep: {calibration.samples: [4, 16, 64]}", "sweep")
        key, values = next(iter(sw.items()))
        check_keys(sw, SWEEPABLE, sctx, "sweep")
        if not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise sctx.error(f"sweep {key} needs a list of at least two integers", key)
        sweep = (key, list(values))

    report_map = data.get("report") or Located()
    rctx = Ctx(source, report_map)
    check_keys(report_map, {"plots", "memory_budget"}, rctx, "report")
    plots = get_value(report_map, "plots", list, list(PLOTS), rctx, "report")
    for p in plots:
        if p not in PLOTS:
            raise rctx.error(f"unknown plot {p!r}; choose from {', '.join(PLOTS)}", "plots")
    budget = report_map.get("memory_budget")
    report = ReportConfig(plots=list(plots),
                          memory_budget_bytes=None if budget is None else parse_size(budget, source, rctx.line("memory_budget")),
                          memory_budget_label=None if budget is None else str(budget))

    spec = Spec(
        name=name, source=source, sha256=digest, raw=plain(data),
        description=get_value(data, "description", str, "", ctx, "the spec"),
        seed=get_value(data, "seed", int, 0, ctx, "the spec"),
        model=get_value(data, "model", str, "minigpt-shakespeare", ctx, "the spec"),
        device=get_value(data, "device", str, "cpu", ctx, "the spec", check=lambda d: d in ("cpu", "cuda", "auto"),
                    fix="use cpu, cuda or auto"),
        markers=get_value(data, "markers", list, [], ctx, "the spec"),
        calibration=_dataclass_from(CalibrationConfig, data.get("calibration"),
                                    Ctx(source, data.get("calibration") or data), "calibration"),
        evaluation=_dataclass_from(EvaluationConfig, data.get("evaluation"),
                                   Ctx(source, data.get("evaluation") or data), "evaluation"),
        keep=get_value(data, "keep", list, list(DEFAULT_KEEP), ctx, "the spec"),
        schemes=schemes, baseline=baseline, sweep=sweep, report=report,
    )
    for k in spec.keep:
        if k not in DEFAULT_KEEP:
            raise ctx.error(f"keep entry {k!r} is unknown; keep lists module kinds left in float16: {', '.join(DEFAULT_KEEP)}", "keep")
    spec.expect = parse_expectations(data.get("expect"), Ctx(source, data), SpecView(schemes, sweep))
    if data.get("golden") is not None:
        spec.golden = _parse_golden(data["golden"], Ctx(source, data["golden"] if isinstance(data["golden"], dict) else data))
    return spec


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
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or math.isnan(v):
                raise ctx.error(f"{what}.{k} must be a non-negative number, got {v!r}", k)
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


