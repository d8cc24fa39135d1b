"""YAML experiment specs: schema, validation with file:line errors, and the assertion language.

A spec is data only: it is read with ``yaml.safe_load`` semantics, every key is checked against the
dataclasses below before any work starts, and assertions are comparisons interpreted here, never
evaluated code. A user mistake raises ``SpecError`` whose message is one line:
``specs/minigpt/pareto.yaml:12: unknown key 'schemas' in the spec; did you mean 'schemes'?``
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from quantlab.quant import FLOAT_DTYPES, FloatScheme, Scheme

# ---------------------------------------------------------------------------------------------
# Errors and YAML with line numbers


class SpecError(ValueError):
    """A spec the user must fix. ``str()`` is a single line naming the file and line."""

    def __init__(self, message: str, source: str = "<spec>", line: Optional[int] = None):
        self.source, self.line, self.message = source, line, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


class Located(dict):
    """A YAML mapping that remembers the line of itself and of each key (1-based)."""

    line: Optional[int] = None
    key_lines: dict

    def line_of(self, key) -> Optional[int]:
        return self.key_lines.get(key, self.line)


class LocatedList(list):
    line: Optional[int] = None
    item_lines: list


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps node marks, so errors can point at the offending line."""


def _construct_mapping(loader, node):
    loader.flatten_mapping(node)
    mapping = Located()
    mapping.line, mapping.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            raise SpecError(f"mapping keys must be plain scalars, got {type(key).__name__}",
                            loader.name, key_node.start_mark.line + 1)
        if key in mapping:
            raise SpecError(f"duplicate key {key!r}; remove one of them", loader.name, key_node.start_mark.line + 1)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = key_node.start_mark.line + 1
    return mapping


def _construct_sequence(loader, node):
    seq = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    seq.line, seq.item_lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
    return seq


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def read_yaml(text: str, source: str) -> Any:
    loader = _LineLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(f"invalid YAML: {e.problem or e.context}; check indentation and quoting", source, line) from None
    except yaml.YAMLError as e:
        raise SpecError(f"invalid YAML: {e}", source) from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------
# Validation helpers


class _Ctx:
    """Where we are in the spec: file, and the mapping whose keys are being checked."""

    def __init__(self, source: str, mapping: Optional[dict] = None, path: str = "the spec"):
        self.source, self.mapping, self.path = source, mapping, path

    def line(self, key=None):
        m = self.mapping
        if isinstance(m, Located):
            return m.line_of(key) if key is not None else m.line
        return None

    def error(self, message: str, key=None) -> SpecError:
        return SpecError(message, self.source, self.line(key))


def _check_keys(mapping: dict, allowed, ctx: _Ctx, what: str):
    if not isinstance(mapping, dict):
        raise ctx.error(f"{what} must be a mapping (key: value lines), got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(sorted(allowed))}"
            raise SpecError(f"unknown key {key!r} in {what}; {hint}", ctx.source,
                            mapping.line_of(key) if isinstance(mapping, Located) else None)


def _get(mapping: dict, key, types, default, ctx: _Ctx, what: str, check=None, fix: str = ""):
    if key not in mapping or mapping[key] is None and default is not None:
        return copy.deepcopy(default)
    value = mapping[key]
    line = mapping.line_of(key) if isinstance(mapping, Located) else None
    if types is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if types is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types))):
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in _tuple(types))
        raise SpecError(f"{what}.{key} must be {names}, got {value!r}{'; ' + fix if fix else ''}", ctx.source, line)
    if check is not None and not check(value):
        raise SpecError(f"{what}.{key} = {value!r} is invalid; {fix}", ctx.source, line)
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a mapping"}


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


# ---------------------------------------------------------------------------------------------
# The schema

DEFAULT_KEEP = ["embeddings", "lm_head", "norms"]
PLOTS = ("pareto", "accuracy", "calibration_size", "per_layer", "roofline")
METHODS = ("rtn", "gptq", "float")
SWEEPABLE = ("calibration.samples", "calibration.seq_len", "calibration.heldout_samples", "seed")

# Metrics an assertion or golden file can name (per scheme). `tasks.<task>.acc` is also allowed.
METRICS = {
    "ppl": "perplexity on the evaluation split",
    "ppl_stderr": "standard error of ppl",
    "ppl_gap": "ppl / baseline ppl - 1",
    "kld_mean": "mean KL divergence from the baseline's next-token distribution",
    "kld_median": "median KL divergence",
    "kld_p99": "99th percentile KL divergence",
    "top1_agreement": "share of positions where the top-1 token matches the baseline's",
    "nan_count": "NaN/Inf values in weights and logits",
    "bytes_total": "deployable bytes of the whole model",
    "bytes_linear": "deployable bytes of the quantized Linear layers",
    "bits_per_weight": "bytes_linear * 8 / quantized parameters",
    "quantize_seconds": "wall seconds to quantize",
    "eval_tokens": "tokens scored for perplexity",
    "mean_rel_loss": "mean over layers of GPTQ/RTN relative loss tr(D H D^T)/tr(W H W^T)",
    "mean_rtn_rel_loss": "mean over layers of the RTN relative loss on the same Hessians",
    "mean_heldout_rel_loss": "mean over layers of the relative loss on held-out inputs (calibration.heldout_samples)",
}
OPERATORS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
             ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def _is_metric(name) -> bool:
    return isinstance(name, str) and (name in METRICS or re.fullmatch(r"tasks\.[\w-]+\.(acc|acc_stderr|n)", name) is not None)


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
# Shorthands for the seed schemes; a spec may write `int4-g64: {preset: int4-g64, method: gptq}`.
SCHEME_PRESETS = {
    "fp32": {"dtype": "float32"},
    "fp16": {"dtype": "float16"},
    "int8-per-tensor": {"bits": 8, "granularity": "tensor"},
    "int8-per-channel": {"bits": 8, "granularity": "channel"},
    "int4-g64": {"bits": 4, "group_size": 64},
    "int4-g128": {"bits": 4, "group_size": 128},
}


@dataclass
class Expectation:
    """One assertion. ``kind`` is 'compare' or a check name; ``scheme`` is one scheme (``*`` expanded)."""

    kind: str
    line: Optional[int]
    scheme: Optional[str] = None
    metric: Optional[str] = None
    op: Optional[str] = None
    threshold: Any = None          # a number, or {"metric", "scheme"} for a comparison against a scheme
    options: dict = field(default_factory=dict)
    xfail: Optional[str] = None

    @property
    def id(self) -> str:
        if self.kind == "compare":
            rhs = self.threshold
            rhs = f"{rhs['metric']}[{rhs['scheme']}]" if isinstance(rhs, dict) else f"{rhs:g}" if isinstance(rhs, (int, float)) else str(rhs)
            return f"{self.metric}[{self.scheme}] {self.op} {rhs}"
        target = self.scheme or ",".join(self.options.get("schemes", [])) or "all"
        return f"{self.kind}[{target}]"


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


def _dataclass_from(cls, mapping, ctx: _Ctx, what: str, types: dict, **extra):
    """Build a validating dataclass from a YAML mapping, turning its ValueErrors into SpecErrors."""
    mapping = mapping if mapping is not None else Located()
    _check_keys(mapping, set(types), ctx, what)
    kwargs = {}
    for key, typ in types.items():
        if key in mapping:
            kwargs[key] = _get(mapping, key, typ, None, ctx, what)
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


def _parse_schemes(mapping, ctx: _Ctx) -> dict:
    if not isinstance(mapping, dict) or not mapping:
        raise ctx.error("schemes must be a non-empty mapping of name -> scheme (e.g. fp32: {dtype: float32})", "schemes")
    types = {"method": str, "dtype": str, "bits": int, "group_size": int, "granularity": str, "symmetric": bool,
             "grid": str, "act_order": bool, "static_groups": bool, "damp": float, "block_size": int, "preset": str}
    out = {}
    for name, body in mapping.items():
        line = mapping.line_of(name) if isinstance(mapping, Located) else None
        if isinstance(body, str):  # `int4-g64: int4-g64` names a preset
            body = Located({"preset": body})
            body.line, body.key_lines = line, {"preset": line}
        if body is None and name in SCHEME_PRESETS:
            body = Located({"preset": name})
            body.line, body.key_lines = line, {"preset": line}
        if not isinstance(body, dict):
            raise SpecError(f"scheme {name!r} must be a mapping like {{bits: 4, group_size: 64}} or a preset name "
                            f"({', '.join(SCHEME_PRESETS)})", ctx.source, line)
        _check_keys(body, SCHEME_KEYS, ctx, f"scheme {name!r}")
        merged = Located()
        merged.line, merged.key_lines = getattr(body, "line", line), dict(getattr(body, "key_lines", {}))
        if "preset" in body:
            preset = body["preset"]
            if preset not in SCHEME_PRESETS:
                close = difflib.get_close_matches(str(preset), SCHEME_PRESETS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known presets: {', '.join(SCHEME_PRESETS)}"
                raise SpecError(f"unknown preset {preset!r} for scheme {name!r}; {hint}", ctx.source, body.line_of("preset"))
            merged.update(SCHEME_PRESETS[preset])
            for k in SCHEME_PRESETS[preset]:
                merged.key_lines[k] = body.line_of("preset")
        merged.update({k: v for k, v in body.items() if k != "preset"})
        out[str(name)] = _dataclass_from(SchemeConfig, merged, ctx, f"scheme {name!r}",
                                         {k: v for k, v in types.items() if k != "preset"}, name=str(name))
    return out


def _parse_expectations(items, ctx: _Ctx, schemes: dict, sweep) -> list:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ctx.error("expect must be a list of assertions, each starting with '- '", "expect")
    out = []
    for i, item in enumerate(items):
        line = items.item_lines[i] if isinstance(items, LocatedList) else None
        if not isinstance(item, dict):
            raise SpecError("each expectation must be a mapping, e.g. {metric: ppl_gap, scheme: int4-g64, '<': 0.15}",
                            ctx.source, line)
        out.extend(_parse_expectation(item, _Ctx(ctx.source, item, "expect"), schemes, sweep))
    return out


def _scheme_names(item, key, ctx, schemes, allow_star=True) -> list:
    value = item.get(key)
    if value == "*" and allow_star:
        return list(schemes)
    names = value if isinstance(value, list) else [value]
    for n in names:
        if n not in schemes:
            close = difflib.get_close_matches(str(n), list(schemes), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"defined schemes: {', '.join(schemes)}"
            raise ctx.error(f"{key} {n!r} is not defined under schemes; {hint}", key)
    return names


def _parse_expectation(item: dict, ctx: _Ctx, schemes: dict, sweep) -> list:
    line = ctx.line()
    xfail = item.get("xfail")
    if xfail is not None and not isinstance(xfail, str):
        raise ctx.error("xfail must be a sentence saying why the assertion is expected to fail", "xfail")
    check = item.get("check", "compare")
    if check == "compare":
        _check_keys(item, {"metric", "scheme", "xfail", *OPERATORS}, ctx, "a metric assertion")
        if "metric" not in item or "scheme" not in item:
            raise ctx.error("a metric assertion needs metric and scheme, e.g. {metric: ppl_gap, scheme: int4-g64, '<': 0.15}")
        if not _is_metric(item["metric"]):
            close = difflib.get_close_matches(str(item["metric"]), list(METRICS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known metrics: {', '.join(METRICS)}, tasks.<task>.acc"
            raise ctx.error(f"unknown metric {item['metric']!r}; {hint}", "metric")
        ops = [k for k in item if k in OPERATORS]
        if len(ops) != 1:
            raise ctx.error("a metric assertion needs exactly one comparison: one of " + ", ".join(repr(o) for o in OPERATORS)
                            + " (quote it in YAML: '<': 0.15)")
        op, rhs = ops[0], item[ops[0]]
        if isinstance(rhs, dict):
            rctx = _Ctx(ctx.source, rhs)
            _check_keys(rhs, {"metric", "scheme", "times", "plus"}, rctx, "a comparison against another scheme")
            if not _is_metric(rhs.get("metric")):
                raise rctx.error(f"unknown metric {rhs.get('metric')!r} on the right-hand side", "metric")
            _scheme_names(rhs, "scheme", rctx, schemes, allow_star=False)
            rhs = {"metric": rhs["metric"], "scheme": rhs["scheme"], "times": float(rhs.get("times", 1.0)),
                   "plus": float(rhs.get("plus", 0.0))}
        elif isinstance(rhs, bool) or not isinstance(rhs, (int, float)):
            raise ctx.error(f"the threshold after {op!r} must be a number or {{metric, scheme}}, got {rhs!r}", op)
        return [Expectation("compare", line, s, item["metric"], op, rhs, xfail=xfail)
                for s in _scheme_names(item, "scheme", ctx, schemes)]

    if check == "grid":
        _check_keys(item, {"check", "scheme", "range", "xfail"}, ctx, "check: grid")
        rng = item.get("range")
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
            raise ctx.error("check: grid needs range: [min, max] of integer codes, e.g. [-7, 7]", "range")
        names = _scheme_names(item, "scheme", ctx, schemes)
        return [Expectation("grid", line, s, options={"range": list(rng)}, xfail=xfail)
                for s in names if schemes[s].method != "float" or item.get("scheme") != "*"]

    if check == "pareto_frontier":
        _check_keys(item, {"check", "schemes", "ppl_rtol", "xfail"}, ctx, "check: pareto_frontier")
        names = _scheme_names(item, "schemes", ctx, schemes)
        # Schemes whose perplexities differ by less than ppl_rtol are equally good: FP16 or INT8 landing
        # 0.01% below FP32 by rounding luck does not push FP32 off the frontier.
        rtol = _get(item, "ppl_rtol", float, 0.001, ctx, "check: pareto_frontier",
                    check=lambda v: 0 <= v < 1, fix="ppl_rtol is a relative tolerance, e.g. 0.001")
        return [Expectation("pareto_frontier", line, s, options={"schemes": [s], "ppl_rtol": rtol}, xfail=xfail)
                for s in names]

    if check == "health":
        _check_keys(item, {"check", "scheme", "max_damp", "allow_rtn_fallback", "require_calibration_tokens", "xfail"},
                    ctx, "check: health")
        opts = {"max_damp": _get(item, "max_damp", float, None, ctx, "check: health"),
                "allow_rtn_fallback": _get(item, "allow_rtn_fallback", bool, False, ctx, "check: health"),
                "require_calibration_tokens": _get(item, "require_calibration_tokens", bool, True, ctx, "check: health")}
        names = [s for s in _scheme_names(item, "scheme", ctx, schemes)
                 if schemes[s].method == "gptq" or item.get("scheme") != "*"]
        return [Expectation("health", line, s, options=opts, xfail=xfail) for s in names]

    if check in ("monotone", "spread"):
        allowed = {"check", "metric", "scheme", "over", "xfail"} | ({"direction", "slack"} if check == "monotone" else {"<=", "<"})
        _check_keys(item, allowed, ctx, f"check: {check}")
        if sweep is None:
            raise ctx.error(f"check: {check} needs a sweep in the spec (e.g. sweep: {{calibration.samples: [4, 16, 64]}})", "check")
        over = item.get("over", sweep[0])
        if over != sweep[0]:
            raise ctx.error(f"over: {over!r} does not match the spec's sweep key {sweep[0]!r}", "over")
        if not _is_metric(item.get("metric")):
            raise ctx.error(f"check: {check} needs metric, one of {', '.join(METRICS)}", "metric")
        opts = {"over": over}
        if check == "monotone":
            direction = _get(item, "direction", str, "decreasing", ctx, "check: monotone",
                             check=lambda v: v in ("decreasing", "increasing"), fix="use decreasing or increasing")
            opts.update(direction=direction, slack=_get(item, "slack", float, 0.0, ctx, "check: monotone",
                                                         check=lambda v: v >= 0, fix="slack is a relative tolerance >= 0"))
            return [Expectation("monotone", line, s, item["metric"], options=opts, xfail=xfail)
                    for s in _scheme_names(item, "scheme", ctx, schemes)]
        ops = [k for k in ("<=", "<") if k in item]
        if len(ops) != 1 or isinstance(item[ops[0]], bool) or not isinstance(item[ops[0]], (int, float)):
            raise ctx.error("check: spread needs one bound, e.g. '<=': 0.5 (max - min over the sweep)")
        return [Expectation("spread", line, s, item["metric"], ops[0], float(item[ops[0]]), options=opts, xfail=xfail)
                for s in _scheme_names(item, "scheme", ctx, schemes)]

    raise ctx.error(f"unknown check {check!r}; use one of grid, pareto_frontier, health, monotone, spread "
                    "(or omit check for a metric comparison)", "check")


def parse_spec(data, source: str = "<spec>", name: Optional[str] = None, text: Optional[str] = None) -> Spec:
    """Validate a spec mapping (from YAML or a dict) and build a Spec. Raises SpecError."""
    data = _locate(data)
    ctx = _Ctx(source, data)
    if not isinstance(data, dict):
        raise SpecError("a spec must be a YAML mapping with at least model and schemes", source, getattr(data, "line", 1))
    _check_keys(data, TOP_KEYS, ctx, "the spec")
    if "schemes" not in data:
        raise SpecError("the spec has no schemes; add e.g. schemes: {fp32: {dtype: float32}, int4-g64: {bits: 4, group_size: 64}}",
                        source, getattr(data, "line", 1))
    digest = hashlib.sha256((text if text is not None else repr(_plain(data))).encode()).hexdigest()
    default_name = name or (Path(source).stem if not source.startswith("<") else "spec")
    name = _get(data, "name", str, default_name, ctx, "the spec")
    if not re.fullmatch(r"[\w.\-/]+", name):
        raise ctx.error(f"name {name!r} may only use letters, digits, '-', '_', '.', '/'", "name")

    schemes = _parse_schemes(data["schemes"], _Ctx(source, data))
    baseline = _get(data, "baseline", str, "fp32" if "fp32" in schemes else next(iter(schemes)), ctx, "the spec")
    if baseline not in schemes:
        raise ctx.error(f"baseline {baseline!r} is not one of the schemes ({', '.join(schemes)})", "baseline")

    sweep = None
    if data.get("sweep") is not None:
        sw = data["sweep"]
        sctx = _Ctx(source, sw if isinstance(sw, dict) else data)
        if not isinstance(sw, dict) or len(sw) != 1:
            raise ctx.error("sweep must map one key to a list of values, e.g. sweep: {calibration.samples: [4, 16, 64]}", "sweep")
        key, values = next(iter(sw.items()))
        _check_keys(sw, SWEEPABLE, sctx, "sweep")
        if not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise sctx.error(f"sweep {key} needs a list of at least two integers", key)
        sweep = (key, list(values))

    report_map = data.get("report") or Located()
    rctx = _Ctx(source, report_map)
    _check_keys(report_map, {"plots", "memory_budget"}, rctx, "report")
    plots = _get(report_map, "plots", list, list(PLOTS), rctx, "report")
    for p in plots:
        if p not in PLOTS:
            raise rctx.error(f"unknown plot {p!r}; choose from {', '.join(PLOTS)}", "plots")
    budget = report_map.get("memory_budget")
    report = ReportConfig(plots=list(plots),
                          memory_budget_bytes=None if budget is None else parse_size(budget, source, rctx.line("memory_budget")),
                          memory_budget_label=None if budget is None else str(budget))

    spec = Spec(
        name=name, source=source, sha256=digest, raw=_plain(data),
        description=_get(data, "description", str, "", ctx, "the spec"),
        seed=_get(data, "seed", int, 0, ctx, "the spec"),
        model=_get(data, "model", str, "minigpt-shakespeare", ctx, "the spec"),
        device=_get(data, "device", str, "cpu", ctx, "the spec", check=lambda d: d in ("cpu", "cuda", "auto"),
                    fix="use cpu, cuda or auto"),
        markers=_get(data, "markers", list, [], ctx, "the spec"),
        calibration=_dataclass_from(CalibrationConfig, data.get("calibration"), _Ctx(source, data.get("calibration") or data),
                                    "calibration", {"dataset": str, "samples": int, "seq_len": int, "batch_size": int,
                                                     "heldout_samples": int}),
        evaluation=_dataclass_from(EvaluationConfig, data.get("evaluation"), _Ctx(source, data.get("evaluation") or data),
                                   "evaluation", {"dataset": str, "split": str, "seq_len": int, "max_tokens": int,
                                                  "tasks": list, "task_items": int, "kl_divergence": bool, "length_normalize": bool,
                                                  "batch_size": int}),
        keep=_get(data, "keep", list, list(DEFAULT_KEEP), ctx, "the spec"),
        schemes=schemes, baseline=baseline, sweep=sweep, report=report,
    )
    for k in spec.keep:
        if k not in DEFAULT_KEEP:
            raise ctx.error(f"keep entry {k!r} is unknown; keep lists module kinds left in float16: {', '.join(DEFAULT_KEEP)}", "keep")
    spec.expect = _parse_expectations(data.get("expect"), _Ctx(source, data), schemes, sweep)
    if data.get("golden") is not None:
        spec.golden = _parse_golden(data["golden"], _Ctx(source, data["golden"] if isinstance(data["golden"], dict) else data))
    return spec


def _parse_golden(g, ctx: _Ctx) -> GoldenConfig:
    _check_keys(g, {"metrics", "layers", "default_tolerance"}, ctx, "golden")
    metrics = g.get("metrics") or {}
    if isinstance(metrics, list):
        metrics = {m: None for m in metrics}
    if not isinstance(metrics, dict):
        raise ctx.error("golden.metrics must map metric -> tolerance, e.g. {ppl: {rtol: 0.001}}", "metrics")
    tolerances = {}
    for m, tol in metrics.items():
        if not _is_metric(m):
            close = difflib.get_close_matches(str(m), list(METRICS), n=1)
            raise ctx.error(f"golden metric {m!r} is unknown" + (f"; did you mean {close[0]!r}?" if close else ""), "metrics")
        if tol is not None:
            tolerances[m] = _tolerance(tol, _Ctx(ctx.source, tol if isinstance(tol, dict) else g), f"golden.metrics.{m}")
    layers = None
    if g.get("layers") is not None:
        lay = g["layers"]
        lctx = _Ctx(ctx.source, lay if isinstance(lay, dict) else g)
        _check_keys(lay, {"metric", "rtol", "atol"}, lctx, "golden.layers")
        layers = {"metric": _get(lay, "metric", str, "rel_loss", lctx, "golden.layers",
                                 check=lambda v: v in ("rel_loss", "rtn_rel_loss"), fix="use rel_loss or rtn_rel_loss"),
                  **_tolerance({k: v for k, v in lay.items() if k in ("rtol", "atol")}, lctx, "golden.layers")}
    default = _tolerance(g.get("default_tolerance") or {"rtol": 1e-4, "atol": 1e-8}, ctx, "golden.default_tolerance")
    return GoldenConfig(metrics=list(metrics), tolerances=tolerances, layers=layers, default_tolerance=default)


def _tolerance(tol, ctx: _Ctx, what: str) -> dict:
    _check_keys(tol, {"rtol", "atol"}, ctx, what)
    out = {}
    for k in ("rtol", "atol"):
        if k in tol:
            v = tol[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or math.isnan(v):
                raise ctx.error(f"{what}.{k} must be a non-negative number, got {v!r}", k)
            out[k] = float(v)
    return out


def _locate(obj):
    """Plain dicts/lists (a spec given as a Python dict) -> Located containers without line numbers."""
    if isinstance(obj, dict) and not isinstance(obj, Located):
        located = Located({k: _locate(v) for k, v in obj.items()})
        located.line, located.key_lines = None, {}
        return located
    if isinstance(obj, list) and not isinstance(obj, LocatedList):
        located = LocatedList(_locate(v) for v in obj)
        located.line, located.item_lines = None, [None] * len(located)
        return located
    return obj


def _plain(obj):
    """Located containers -> plain dicts/lists (for hashing and JSON)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


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


# ---------------------------------------------------------------------------------------------
# The assertion language: an Expectation checked against a results dict (the results.json shape)


@dataclass
class Outcome:
    passed: bool
    message: str          # one line: what was measured, against what, and by how much
    measured: Any = None


def metric_value(results: dict, scheme: str, metric: str):
    """A scheme's metric from results["results"], following dotted paths (tasks.verb_tense.acc)."""
    value = results["results"][scheme]
    for part in metric.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def check(exp: Expectation, results: dict, spec: Spec) -> Outcome:
    """Evaluate one expectation. Never raises for a missing metric: that is a failed outcome."""
    where = f"{spec.source}:{exp.line}" if exp.line else spec.source
    outcome = _CHECKS[exp.kind](exp, results)
    outcome.message = f"{where}: {outcome.message}"
    return outcome


def _compare(exp: Expectation, results: dict) -> Outcome:
    measured = metric_value(results, exp.scheme, exp.metric)
    if isinstance(exp.threshold, dict):
        rhs = exp.threshold
        other = metric_value(results, rhs["scheme"], rhs["metric"])
        if other is None:
            return Outcome(False, f"{rhs['metric']} of {rhs['scheme']} was not computed, so it cannot be compared")
        threshold = other * rhs["times"] + rhs["plus"]
        against = f"{rhs['metric']} of {rhs['scheme']} ({_fmt(threshold)})"
    else:
        threshold, against = exp.threshold, _fmt(exp.threshold)
    if measured is None:
        return Outcome(False, f"{exp.metric} of {exp.scheme} was not computed (null); enable it in evaluation")
    if isinstance(measured, float) and math.isnan(measured):
        return Outcome(False, f"{exp.metric} of {exp.scheme} is NaN", measured)
    ok = OPERATORS[exp.op](measured, threshold)
    margin = threshold - measured if exp.op in ("<", "<=") else measured - threshold
    return Outcome(ok, f"{exp.metric} of {exp.scheme} = {_fmt(measured)} {'' if ok else 'is not '}{exp.op} {against}"
                       f" (margin {_fmt(margin)})", measured)


def _grid(exp: Expectation, results: dict) -> Outcome:
    codes = results["results"][exp.scheme].get("codes")
    lo, hi = exp.options["range"]
    if not codes:
        return Outcome(False, f"{exp.scheme} has no integer codes (a float scheme?): nothing to check against [{lo}, {hi}]")
    ok = codes["min"] == lo and codes["max"] == hi
    return Outcome(ok, f"codes of {exp.scheme} span [{codes['min']}, {codes['max']}]"
                       f"{'' if ok else ', expected exactly'} [{lo}, {hi}]", [codes["min"], codes["max"]])


def _pareto(exp: Expectation, results: dict) -> Outcome:
    from quantlab.report import pareto_frontier

    rtol = exp.options["ppl_rtol"]
    frontier = pareto_frontier(results, ppl_rtol=rtol)
    ok = exp.scheme in frontier
    return Outcome(ok, f"{exp.scheme} is {'' if ok else 'not '}on the bytes/ppl Pareto frontier with perplexities "
                       f"within {rtol:g} counted equal (frontier: {', '.join(frontier)})", frontier)


def _health(exp: Expectation, results: dict) -> Outcome:
    events = [e for e in results.get("health", []) if e.get("scheme") == exp.scheme]
    problems = []
    if not exp.options["allow_rtn_fallback"]:
        problems += [f"{e['layer']} fell back to RTN ({e.get('detail', '')})" for e in events if e["event"] == "rtn_fallback"]
    if exp.options["require_calibration_tokens"]:
        problems += [f"{e['layer']} saw no calibration tokens" for e in events if e["event"] == "no_calibration_tokens"]
    problems += [f"{e['layer']}: NaN ({e.get('detail', '')})" for e in events if e["event"] == "nan"]
    max_damp = exp.options["max_damp"]
    if max_damp is not None:
        layers = results["results"][exp.scheme].get("layers") or {}
        problems += [f"{name} needed damp {info['damp']:.3g} > {max_damp:g}" for name, info in layers.items()
                     if info.get("damp") is not None and info["damp"] > max_damp]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        return Outcome(False, f"{exp.scheme} is unhealthy: {shown}", problems)
    return Outcome(True, f"{exp.scheme}: no layer fell back to RTN, every layer saw calibration tokens"
                         + (f", damping stayed <= {max_damp:g}" if max_damp is not None else ""), [])


def _sweep_series(exp: Expectation, results: dict):
    sweep = next((s for s in results.get("sweeps", []) if s["key"] == exp.options["over"]), None)
    if sweep is None:
        return None, None
    series = [point.get(exp.scheme, {}) for point in sweep["results"]]
    values = []
    for entry in series:
        v = entry
        for part in exp.metric.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        values.append(v)
    return sweep["values"], values


def _monotone(exp: Expectation, results: dict) -> Outcome:
    xs, ys = _sweep_series(exp, results)
    if xs is None or any(y is None for y in (ys or [None])):
        return Outcome(False, f"{exp.metric} of {exp.scheme} over {exp.options['over']} was not recorded")
    slack, falling = exp.options["slack"], exp.options["direction"] == "decreasing"
    worst = None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        step = (y1 - y0) if falling else (y0 - y1)      # > 0 is a step the wrong way
        allowed = slack * abs(y0)
        if step > allowed and (worst is None or step - allowed > worst[0]):
            worst = (step - allowed, x0, y0, x1, y1)
    series = ", ".join(f"{x}: {_fmt(y)}" for x, y in zip(xs, ys))
    if worst:
        _, x0, y0, x1, y1 = worst
        return Outcome(False, f"{exp.metric} of {exp.scheme} is not {exp.options['direction']} over {exp.options['over']}"
                              f" (slack {slack:g}): {_fmt(y0)} at {x0} -> {_fmt(y1)} at {x1}; series {series}", ys)
    return Outcome(True, f"{exp.metric} of {exp.scheme} is {exp.options['direction']} over {exp.options['over']}: {series}", ys)


def _spread(exp: Expectation, results: dict) -> Outcome:
    xs, ys = _sweep_series(exp, results)
    if xs is None or any(y is None for y in (ys or [None])):
        return Outcome(False, f"{exp.metric} of {exp.scheme} over {exp.options['over']} was not recorded")
    spread = max(ys) - min(ys)
    ok = OPERATORS[exp.op](spread, exp.threshold)
    return Outcome(ok, f"spread (max - min) of {exp.metric} of {exp.scheme} over {len(ys)} values of {exp.options['over']}"
                       f" = {_fmt(spread)} {'' if ok else 'is not '}{exp.op} {_fmt(exp.threshold)}"
                       f" (margin {_fmt(exp.threshold - spread)})", spread)


_CHECKS = {"compare": _compare, "grid": _grid, "pareto_frontier": _pareto, "health": _health,
           "monotone": _monotone, "spread": _spread}
