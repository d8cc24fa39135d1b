"""Typed results: what one spec run measured, and its one JSON form (results.json).

The types are frozen dataclasses built by the pipeline; ``to_json`` gives the documented results.json
shape (docs/results.md) and ``from_json`` reads it back, refusing keys it does not know. This module is
the one place where a non-finite float becomes null: JSON has no NaN, and results.json promises null
for "not computed", so every float field is normalised when a result is built (``finite``) and
anything else written to JSON goes through ``jsonable``.

A ``RunResult`` is also a read-only mapping over its JSON form, so the report, the assertion checks and
user code read a live run and a results.json loaded from disk the same way:
``run["results"]["int4-g64"]["ppl"]``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from functools import cached_property
from typing import Any, Optional

from quantlab.metrics import ppl_gap as _ppl_gap
from quantlab.metrics import resolve


def finite(x):
    """``x`` as a float, or None when it is None, NaN or infinite. Integers stay integers."""
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, int):
        return x
    x = float(x)
    return x if math.isfinite(x) else None


def jsonable(obj):
    """A copy of ``obj`` that json can write: NaN and infinities become None, tuples become lists,
    enums their values, numpy/torch scalars and arrays Python numbers and lists, paths strings, and
    results types their ``to_json()``."""
    if hasattr(obj, "to_json"):
        return jsonable(obj.to_json())
    if isinstance(obj, Enum):
        return obj.value
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy or torch scalars and arrays
        return jsonable(obj.tolist())
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON ({obj!r:.80}); convert it to a number, "
                    "string, list or dict first")


def _check_keys(cls, data: Mapping, what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {', '.join(map(repr, unknown))}; it was written by another "
                         f"version of quantlab: re-run the spec to rewrite it")


def _normalise_floats(obj) -> None:
    """Replace non-finite floats of a frozen dataclass's float fields by None (called in __post_init__)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            object.__setattr__(obj, f.name, None)


# ----------------------------------------------------------------------------------------------
# Health events


class HealthEventName(str, Enum):
    """What can go wrong while quantizing one layer (or, layer None, with the calibration set)."""

    DAMP_RAISED = "damp_raised"                       # H needed more damping than asked to be factorised
    RTN_FALLBACK = "rtn_fallback"                     # GPTQ could not run; the layer was rounded to nearest
    NO_CALIBRATION_TOKENS = "no_calibration_tokens"   # the layer saw no calibration input
    NAN = "nan"                                       # NaN or Inf in the inputs, the Hessian or the solve
    DUPLICATE_CALIBRATION_WINDOWS = "duplicate_calibration_windows"   # > 10% of the calibration windows repeat one


@dataclass(frozen=True)
class HealthEvent:
    event: HealthEventName
    layer: Optional[str] = None
    detail: str = ""
    scheme: Optional[str] = None    # set on the run-level list, which gathers every scheme's events

    def __post_init__(self):
        try:
            object.__setattr__(self, "event", HealthEventName(self.event))
        except ValueError:
            names = ", ".join(e.value for e in HealthEventName)
            raise ValueError(f"unknown health event {self.event!r}; known: {names}") from None

    def to_json(self) -> dict:
        out = {"layer": self.layer, "event": self.event.value, "detail": self.detail}
        if self.scheme is not None:
            out["scheme"] = self.scheme
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "HealthEvent":
        _check_keys(cls, data, "a health event")
        return cls(**data)


# ----------------------------------------------------------------------------------------------
# One layer, one task, one scheme


# Statistics every quantized layer reports (None when not measured); the optional ones appear in
# results.json only when measured.
LAYER_STATISTICS = ("rel_loss", "rtn_rel_loss", "damp", "seconds", "h_cond", "h_diag_spread", "input_absmax",
                    "outlier_ratio", "n_tokens")
OPTIONAL_LAYER_STATISTICS = ("heldout_rel_loss", "code_min", "code_max", "awq_alpha", "awq_group", "bits", "scheme",
                             "sensitivity", "weight_rel_error", "shrink_mean", "shrink_counts")


@dataclass(frozen=True)
class LayerStats:
    rel_loss: Optional[float] = None         # tr(D H D^T) / tr(W H W^T) of the chosen codes
    rtn_rel_loss: Optional[float] = None     # the same for round-to-nearest on the same Hessian
    damp: Optional[float] = None             # damping GPTQ needed (relative to mean diag H)
    seconds: Optional[float] = None
    h_cond: Optional[float] = None           # condition number of H
    h_diag_spread: Optional[float] = None    # max / median of diag H
    input_absmax: Optional[float] = None
    outlier_ratio: Optional[float] = None
    n_tokens: Optional[int] = None           # calibration tokens that reached the layer
    heldout_rel_loss: Optional[float] = None
    code_min: Optional[int] = None
    code_max: Optional[int] = None
    awq_alpha: Optional[float] = None        # AWQ's chosen exponent: s = mean|x|^alpha (method awq, awq: true)
    awq_group: Optional[str] = None          # ... and the first Linear of the input group that shares s
    bits: Optional[int] = None               # a mixed scheme's assigned width for this layer
    scheme: Optional[str] = None             # ... and the candidate it is
    sensitivity: Optional[dict] = None       # ... and every candidate's estimated loss (the knapsack's input)
    weight_rel_error: Optional[float] = None  # ||W - W_hat||^2 / ||W||^2 of the weight the layer computes with
    shrink_mean: Optional[float] = None      # scale_search mse: mean over groups of stored / absmax scale
    shrink_counts: Optional[dict] = None     # ... and groups per chosen shrink factor ('0.925': n; 'other')

    def __post_init__(self):
        _normalise_floats(self)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in LAYER_STATISTICS}
        out.update({k: getattr(self, k) for k in OPTIONAL_LAYER_STATISTICS if getattr(self, k) is not None})
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "LayerStats":
        _check_keys(cls, data, "a layer's statistics")
        return cls(**data)


@dataclass(frozen=True)
class TaskResult:
    acc: Optional[float]
    acc_stderr: Optional[float]
    n: int
    correct: Optional[list] = None     # 0/1 per item, in item order: paired (McNemar) comparisons of schemes

    def __post_init__(self):
        _normalise_floats(self)
        if self.correct is not None:
            object.__setattr__(self, "correct", [int(bool(c)) for c in self.correct])

    def to_json(self) -> dict:
        return {"acc": self.acc, "acc_stderr": self.acc_stderr, "n": self.n, "correct": self.correct}

    @classmethod
    def from_json(cls, data: Mapping) -> "TaskResult":
        _check_keys(cls, data, "a task result")
        return cls(**data)


@dataclass(frozen=True)
class SchemeResult:
    """One scheme's entry of results.json. A metric that was not computed is None (null)."""

    # evaluation (quantlab.evaluate)
    ppl: Optional[float] = None
    ppl_stderr: Optional[float] = None
    ppl_gap: Optional[float] = None
    ppl_gap_stderr: Optional[float] = None
    ln_ppl_ratio: Optional[float] = None
    ln_ppl_ratio_stderr: Optional[float] = None
    nll_correlation: Optional[float] = None
    bits_per_byte: Optional[float] = None
    kld_mean: Optional[float] = None
    kld_stderr: Optional[float] = None
    kld_median: Optional[float] = None
    kld_p99: Optional[float] = None
    kld_percentiles: Optional[dict] = None             # max, p99_9, p99, ..., median, ..., p0_1, min
    top1_agreement: Optional[float] = None
    top1_agreement_stderr: Optional[float] = None
    delta_p_mean: Optional[float] = None
    delta_p_stderr: Optional[float] = None
    delta_p_rms: Optional[float] = None
    delta_p_rms_stderr: Optional[float] = None
    delta_p_percentiles: Optional[dict] = None         # as kld_percentiles, plus p75 and p25
    window_nll: Optional[list] = None                  # mean NLL per evaluation window: paired comparisons
    window_kld: Optional[list] = None                  # mean KL divergence per window
    window_top1: Optional[list] = None                 # top-1 agreement per window
    tasks: dict = field(default_factory=dict)          # task name -> TaskResult
    nan_count: Optional[int] = None
    eval_tokens: Optional[int] = None
    eval_seconds: Optional[float] = None
    tokens_per_second: Optional[float] = None
    # bytes (quantlab.accounting)
    bytes_total: Optional[int] = None
    bytes_linear: Optional[int] = None
    bits_per_weight: Optional[float] = None
    params_linear: Optional[int] = None
    params_total: Optional[int] = None
    bytes_on_disk: Optional[int] = None                # an imported checkpoint's weight files
    # quantization (quantlab.calibrate)
    quantize_seconds: Optional[float] = None
    layers: dict = field(default_factory=dict)         # module name -> LayerStats
    codes: Optional[dict] = None                       # {"min", "max"} over every layer; None for float schemes
    mean_rel_loss: Optional[float] = None
    mean_rtn_rel_loss: Optional[float] = None
    mean_heldout_rel_loss: Optional[float] = None
    health: tuple = ()                                 # HealthEvent, without scheme
    # the run
    workload: dict = field(default_factory=dict)       # quantlab.roofline.decode_workload of the model
    versions: dict = field(default_factory=dict)       # the libraries that computed this result (cached ones too)
    wall_seconds: Optional[float] = None
    # export (quantlab.export.servability_table): {"compressed_tensors": [ok, reason], "gguf": [ok, reason]}
    servable: Optional[dict] = None

    def __post_init__(self):
        _normalise_floats(self)
        for name in ("window_nll", "window_kld", "window_top1"):          # strict JSON: null, never NaN
            if getattr(self, name) is not None:
                object.__setattr__(self, name, [finite(v) for v in getattr(self, name)])
        for name in ("kld_percentiles", "delta_p_percentiles"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, {str(k): finite(v) for k, v in getattr(self, name).items()})
        if self.servable is not None:
            # lists, as JSON reads them back, so a result equals itself read from results.json
            object.__setattr__(self, "servable", {str(k): [bool(v[0]), str(v[1])] for k, v in self.servable.items()})
        object.__setattr__(self, "tasks", {k: v if isinstance(v, TaskResult) else TaskResult.from_json(v)
                                           for k, v in self.tasks.items()})
        object.__setattr__(self, "layers", {k: v if isinstance(v, LayerStats) else LayerStats.from_json(v)
                                            for k, v in self.layers.items()})
        object.__setattr__(self, "health", tuple(h if isinstance(h, HealthEvent) else HealthEvent.from_json(h)
                                                 for h in self.health))

    def metric(self, path: str):
        """The value of a metric path (``ppl``, ``tasks.verb_tense.acc``): see quantlab.metrics."""
        return resolve(self.to_json(), path)

    def with_gap_to(self, baseline: "SchemeResult") -> "SchemeResult":
        """This result with ppl_gap measured against ``baseline`` when the evaluation left it empty."""
        if self.ppl_gap is not None:
            return self
        return dataclasses.replace(self, ppl_gap=_ppl_gap(self.ppl, baseline.ppl))

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tasks"] = {k: v.to_json() for k, v in self.tasks.items()}
        out["layers"] = {k: v.to_json() for k, v in self.layers.items()}
        out["health"] = [h.to_json() for h in self.health]
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "SchemeResult":
        _check_keys(cls, data, "a scheme's result")
        return cls(**data)


# ----------------------------------------------------------------------------------------------
# Sweeps and the run


@dataclass(frozen=True)
class Sweep:
    key: str                 # the swept spec key, e.g. calibration.samples
    values: tuple
    results: tuple           # one {scheme: SchemeResult} per value

    def to_json(self) -> dict:
        return {"key": self.key, "values": list(self.values),
                "results": [{s: r.to_json() for s, r in point.items()} for point in self.results]}

    @classmethod
    def from_json(cls, data: Mapping) -> "Sweep":
        _check_keys(cls, data, "a sweep")
        return cls(key=data["key"], values=tuple(data["values"]),
                   results=tuple({s: SchemeResult.from_json(r) for s, r in point.items()} for point in data["results"]))


@dataclass(frozen=True)
class RunResult(Mapping):
    """One spec run: results.json. Read it as a mapping (its JSON form) or through the fields."""

    spec: str
    spec_sha256: str
    source: str
    seed: int
    baseline: str
    fingerprint: dict                       # the evaluation protocol
    schemes: dict                           # scheme name -> its description (method, bits, grid, ...)
    results: dict                           # scheme name -> SchemeResult, in spec order
    model: dict = field(default_factory=dict)
    sweeps: tuple = ()
    health: tuple = ()                      # HealthEvent of every scheme, with scheme set
    report: dict = field(default_factory=dict)
    seconds: Optional[float] = None
    versions: dict = field(default_factory=dict)
    git: dict = field(default_factory=dict)
    timestamp: Optional[str] = None
    machine: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)      # scheme -> {format, path, bytes_on_disk, bytes_total}

    def __post_init__(self):
        object.__setattr__(self, "results", {k: v if isinstance(v, SchemeResult) else SchemeResult.from_json(v)
                                             for k, v in self.results.items()})
        object.__setattr__(self, "sweeps", tuple(s if isinstance(s, Sweep) else Sweep.from_json(s) for s in self.sweeps))
        object.__setattr__(self, "health", tuple(h if isinstance(h, HealthEvent) else HealthEvent.from_json(h)
                                                 for h in self.health))

    def to_json(self) -> dict:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["results"] = {k: v.to_json() for k, v in self.results.items()}
        out["sweeps"] = [s.to_json() for s in self.sweeps]
        out["health"] = [h.to_json() for h in self.health]
        return jsonable(out)

    @classmethod
    def from_json(cls, data: Mapping) -> "RunResult":
        _check_keys(cls, data, "results.json")
        return cls(**data)

    # --- read-only mapping over the JSON form --------------------------------------------------
    @cached_property
    def _json(self) -> dict:
        return self.to_json()

    def __getitem__(self, key):
        return self._json[key]

    def __iter__(self):
        return iter(self._json)

    def __len__(self):
        return len(self._json)

    __hash__ = None   # a mapping over mutable JSON; frozen fields, but not a dict key
