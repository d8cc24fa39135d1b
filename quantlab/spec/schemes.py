"""A spec's ``schemes:``: each name -> a validating ``SchemeConfig``, presets expanded.

A scheme is a float dtype, an integer grid plus the method that picks its codes (``rtn``, ``gptq``,
``awq``; ``awq: true`` runs AWQ's scale search before GPTQ), a ``mixed:`` choice of one candidate grid per
layer under a byte budget (quantlab.mixed), or (for export/import, issue 12) a ``checkpoint:`` quantized
elsewhere. Split from ``schema.py``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from quantlab.calibrate import METHODS
from quantlab.quant import FLOAT_DTYPES, PRESETS, FloatScheme, Scheme
from quantlab.spec.located import Ctx, Located, SpecError, check_keys, dataclass_from

# The methods a scheme may have: quantlab.calibrate.METHODS ("float", "rtn", "gptq"), which quantize,
# plus "checkpoint", a scheme whose weights are read from a file (hf:PATH or gguf:FILE). Only this schema
# knows "checkpoint"; the pipeline that reads checkpoints is issue 12's.
SCHEME_METHODS = tuple(METHODS) + ("checkpoint",)
INTEGER_METHODS = ("rtn", "gptq", "awq")
MIXED_KEYS = {"candidates", "budget", "method", "proxy"}
CHECKPOINT_PREFIXES = ("hf:", "gguf:")


def checkpoint_problem(uri) -> Optional[str]:
    """Why ``checkpoint: uri`` cannot be read (None: it names an existing directory or file)."""
    if not isinstance(uri, str) or not uri.startswith(CHECKPOINT_PREFIXES):
        return f"checkpoint must be hf:PATH (a Hugging Face model directory) or gguf:FILE, got {uri!r}"
    prefix, _, rest = uri.partition(":")
    path = Path(rest).expanduser()
    if rest and (path.is_dir() if prefix == "hf" else path.is_file()):
        return None
    return (f"checkpoint {uri!r}: {str(path)!r} is not {'a directory' if prefix == 'hf' else 'a file'} "
            "(paths are relative to the directory quantlab runs in); fix the path")


@dataclass
class SchemeConfig:
    """One scheme: a float dtype, an integer grid plus the method that picks the codes, or a checkpoint."""

    name: str
    method: str = "rtn"
    dtype: Optional[str] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None
    granularity: Optional[str] = None
    symmetric: bool = True
    grid: str = "restricted"
    scale_search: str = "absmax"       # "mse": each group's scale searched for the smallest squared error
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    checkpoint: Optional[str] = None   # hf:PATH or gguf:FILE: weights quantized elsewhere (method "checkpoint")
    awq: bool = False                  # AWQ's activation-aware scale search first (method awq: RTN after it)
    mixed: Optional[dict] = None       # {candidates: [int3-g64, ...], budget: "4.25 bits_per_weight", method: gptq}

    def __post_init__(self):
        if self.checkpoint is not None:
            if self.dtype is not None or self.bits is not None:
                raise ValueError(f"scheme {self.name!r}: a checkpoint scheme takes no dtype or bits; the file says them")
            problem = checkpoint_problem(self.checkpoint)
            if problem:
                raise ValueError(f"scheme {self.name!r}: {problem}")
            self.method = "checkpoint"
            return
        if self.method == "checkpoint":
            raise ValueError(f"scheme {self.name!r}: method checkpoint needs checkpoint: hf:PATH or gguf:FILE")
        if self.mixed is not None:
            self._check_mixed()
        elif self.dtype is not None:
            if self.bits is not None:
                raise ValueError(f"scheme {self.name!r} sets both dtype and bits; a scheme is either a float dtype or an integer grid")
            self.method = "float"
        elif self.bits is None:
            raise ValueError(f"scheme {self.name!r} needs bits (integer grid) or dtype ({', '.join(FLOAT_DTYPES)})")
        if self.method not in SCHEME_METHODS:
            raise ValueError(f"scheme {self.name!r}: method must be rtn, gptq or awq, got {self.method!r}")
        if self.method == "float" and self.dtype is None:
            raise ValueError(f"scheme {self.name!r}: method float needs dtype")
        if self.dtype is not None and self.scale_search != "absmax":
            raise ValueError(f"scheme {self.name!r}: scale_search applies to integer grids (bits: ...), not to dtype "
                             f"{self.dtype}; drop scale_search or give bits instead of dtype")
        if self.method != "gptq" and (self.act_order or self.static_groups):
            raise ValueError(f"scheme {self.name!r}: act_order/static_groups only apply to method: gptq")
        if self.method == "awq":
            self.awq = True   # method awq is RTN on the AWQ-scaled weights
        elif self.awq and self.method != "gptq":
            raise ValueError(f"scheme {self.name!r}: awq: true applies to method gptq (AWQ then GPTQ); for AWQ with "
                             "round-to-nearest write method: awq")
        if not 0 < self.damp < 1:
            raise ValueError(f"scheme {self.name!r}: damp must be in (0, 1), e.g. 0.01 (0 leaves a singular Hessian "
                             "uninvertible)")
        if self.block_size < 1:
            raise ValueError(f"scheme {self.name!r}: block_size must be >= 1, e.g. 128")
        self.quant_scheme()  # validates bits/granularity/group_size with the quantizer's own rules

    def quant_scheme(self):
        """The quantizer's scheme; None for a checkpoint scheme (its file says how it is quantized)."""
        if self.method == "checkpoint":
            return None
        if self.mixed is not None:
            from quantlab.mixed import MixedScheme, parse_budget

            return MixedScheme(tuple(self.mixed["candidates"]), parse_budget(self.mixed["budget"]),
                               self.mixed.get("proxy", "kl_estimate"))
        if self.dtype is not None:
            return FloatScheme(self.dtype)
        return Scheme(self.bits, group_size=self.group_size, granularity=self.granularity,
                      symmetric=self.symmetric, grid=self.grid, scale_search=self.scale_search)

    @property
    def needs_calibration(self) -> bool:
        """GPTQ's Hessians, AWQ's activation statistics and a mixed scheme's sensitivities come from calibration data."""
        return self.method in ("gptq", "awq") or self.mixed is not None

    @property
    def is_integer(self) -> bool:
        """An integer grid quantlab computes itself, one grid for the whole model, with no input scales: it has
        codes, and can be exported (AWQ's scales are not folded into a checkpoint; mixed has a grid per layer)."""
        return self.method in INTEGER_METHODS and not self.awq and self.mixed is None

    def _check_mixed(self) -> None:
        """A mixed scheme takes its grids from its candidates and its method from ``mixed: {method: ...}``."""
        from quantlab.mixed import MixedScheme, parse_budget

        mixed = self.mixed
        if not isinstance(mixed, dict):
            raise ValueError(f"scheme {self.name!r}: mixed must be a mapping {{candidates: [...], budget: ..., method: gptq}}")
        unknown = sorted(set(mixed) - MIXED_KEYS)
        if unknown:
            raise ValueError(f"scheme {self.name!r}: mixed has unknown key(s) {', '.join(unknown)}; "
                             f"it takes {', '.join(sorted(MIXED_KEYS))}")
        if self.act_order and not self.static_groups:
            raise ValueError(f"scheme {self.name!r}: act_order with mixed needs static_groups: true (dynamic act-order "
                             "groups store a g_idx, whose bytes are not in the candidates' costs)")
        if self.dtype is not None or self.bits is not None or self.group_size is not None or self.awq:
            raise ValueError(f"scheme {self.name!r}: a mixed scheme takes its grids from mixed.candidates; drop "
                             "bits/dtype/group_size/awq")
        if "candidates" not in mixed or "budget" not in mixed:
            raise ValueError(f"scheme {self.name!r}: mixed needs candidates (e.g. [int3-g64, int4-g64, int8-per-channel]) "
                             "and budget (e.g. '4.25 bits_per_weight')")
        method = mixed.get("method", "gptq")
        if method not in ("rtn", "gptq"):
            raise ValueError(f"scheme {self.name!r}: mixed.method must be rtn or gptq, got {method!r}")
        self.method = method
        candidates = mixed["candidates"]
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise ValueError(f"scheme {self.name!r}: mixed.candidates must be a list of names like int4-g64")
        try:
            MixedScheme(tuple(candidates), parse_budget(mixed["budget"]), mixed.get("proxy", "kl_estimate"))
        except ValueError as error:
            raise ValueError(f"scheme {self.name!r}: mixed: {error}") from None
        self.mixed = {"candidates": list(candidates), "budget": mixed["budget"], "method": method,
                      "proxy": mixed.get("proxy", "kl_estimate")}

    def describe(self) -> dict:
        if self.method == "checkpoint":
            return {"method": "checkpoint", "checkpoint": self.checkpoint}
        d = {"method": self.method, "scheme": self.quant_scheme().describe()}
        if self.mixed is not None:
            d["mixed"] = dict(self.mixed)
        elif self.dtype is None:
            d.update(bits=self.bits, group_size=self.group_size, granularity=self.quant_scheme().granularity,
                     symmetric=self.symmetric, grid=self.grid)
            if self.scale_search != "absmax":   # absmax schemes keep the description (and cache key) they had
                d["scale_search"] = self.scale_search
        if self.method == "gptq":
            d.update(act_order=self.act_order, static_groups=self.static_groups, damp=self.damp, block_size=self.block_size)
        if self.awq:   # only AWQ schemes carry the key: other schemes keep the description (and cache key) they had
            d["awq"] = True
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


def parse_schemes(mapping, ctx: Ctx) -> dict:
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
        if "checkpoint" in body:
            extra = next((k for k in body if k != "checkpoint"), None)
            if extra is not None:
                raise SpecError(f"scheme {name!r}: a checkpoint scheme takes no {extra!r} (its file says how it is "
                                f"quantized); remove {extra!r} or checkpoint", ctx.source, body.line_of(extra))
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
        out[str(name)] = dataclass_from(SchemeConfig, merged, ctx, f"scheme {name!r}", name=str(name))
    return out
