"""Quantization grids, round-to-nearest (RTN), bit-packing and byte accounting.

Conventions (all stated in every results fingerprint):
- Symmetric b-bit, ``grid='restricted'`` (default): codes in [-(2^(b-1)-1), 2^(b-1)-1], scale = absmax/qmax.
  INT4 is [-7, 7]: one code is unused so the grid is symmetric around zero.
- Symmetric, ``grid='full'``: codes in [-2^(b-1), 2^(b-1)-1], scale = 2*absmax/(2^b-1), the convention
  of the reference GPTQ code and torchao (INT4 [-8, 7]).
- Asymmetric: codes in [0, 2^b-1] with an integer zero point; the range always includes 0.
- Scales are stored as float16 and rounded *up* to the next float16 value, so that no element falls
  outside the grid after rounding; codes are computed against that stored scale, so ``dequantize()``
  reproduces exactly what a deployed kernel would.
- Groups are ``group_size`` consecutive input columns; the last group may be smaller (576 = 4*128 + 64).
- Scale search (``scale_search='mse'``): each group's range (absmax, or [min, max] when asymmetric) is
  shrunk by every factor of ``MSE_SHRINK_GRID`` and the group keeps the factor whose stored scale gives
  the smallest squared error sum((W - dequantize(quantize(W)))^2) over the group. The grid starts at 1.0,
  the absmax scale, so the search never does worse than absmax on any group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

GRANULARITIES = ("tensor", "channel", "group")
GRIDS = ("restricted", "full")
SCALE_SEARCHES = ("absmax", "mse")
# Shrink factors of the absmax range tried by scale_search='mse': 1.0 down to 0.5 in steps of 0.025 (21
# candidates). llm-compressor's MSE observer tries 1 - i/100 for i < 20 (1.00 to 0.81, |error|^2.4, stopping
# after 5 candidates without improvement); the reference GPTQ code and GPTQModel's mse option try
# 1 - i/100 for i < 80 (1.00 to 0.21, |error|^2.4 by default). This grid is coarser and reaches 0.5, which
# covers the optimum of INT3/INT4 groups (typically 0.7-0.95) at a quarter of the reference's cost, and
# scores the plain squared error, the quantity the search is named for.
MSE_SHRINK_GRID = tuple(1.0 - k / 40 for k in range(21))
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Scheme:
    """An integer weight-quantization scheme.

    ``granularity`` defaults to ``'group'`` when ``group_size`` is given and ``'channel'`` otherwise.
    """

    bits: int
    group_size: Optional[int] = None
    granularity: Optional[str] = None
    symmetric: bool = True
    grid: str = "restricted"
    scale_search: str = "absmax"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}; "
                             "use a float scheme (fp16/fp32) for higher precision")
        if self.granularity is None:
            object.__setattr__(self, "granularity", "group" if self.group_size is not None else "channel")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"granularity 'group' needs group_size, a positive integer (e.g. 64 or 128), "
                                 f"got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} only applies to granularity 'group'; "
                             f"drop it or set granularity: group (got granularity {self.granularity!r})")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be 'restricted' or 'full', got {self.grid!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        if not self.symmetric and self.grid != "restricted":
            raise ValueError("grid applies to symmetric schemes only; asymmetric always uses [0, 2^bits-1]")
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search must be 'absmax' (scale from each group's largest weight) or 'mse' "
                             f"(search shrunk scales for the smallest squared error), got {self.scale_search!r}")

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) if self.grid == "full" else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    def describe(self) -> str:
        where = {"tensor": "per tensor", "channel": "per channel", "group": f"group {self.group_size}"}
        kind = f"sym [{self.qmin}, {self.qmax}]" if self.symmetric else f"asym [0, {self.qmax}]"
        search = ", MSE-searched" if self.scale_search == "mse" else ""
        return f"INT{self.bits} {where[self.granularity]} {kind}, float16 scales{search}"


@dataclass(frozen=True)
class FloatScheme:
    """Weights kept in a floating-point dtype (the baseline and half-precision schemes)."""

    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.dtype!r}")

    @property
    def bits(self) -> int:
        return torch.finfo(FLOAT_DTYPES[self.dtype]).bits

    def describe(self) -> str:
        return self.dtype


PRESETS = {
    "fp32": FloatScheme("float32"),
    "fp16": FloatScheme("float16"),
    "int8-per-tensor": Scheme(8, granularity="tensor"),
    "int8-per-channel": Scheme(8, granularity="channel"),
    "int4-g64": Scheme(4, group_size=64),
    "int4-g128": Scheme(4, group_size=128),
}


# ----------------------------------------------------------------------------------------------
# Pure numerics


def group_index(in_features: int, scheme: Scheme, device=None) -> torch.Tensor:
    """Group of each input column in natural order: (in,) int64. Tensor/channel: one group."""
    if scheme.granularity == "group":
        return torch.arange(in_features, device=device) // scheme.group_size
    return torch.zeros(in_features, dtype=torch.long, device=device)


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 values up to the nearest float16 (0 stays 0; tiny values become the
    smallest positive float16). Rounding up guarantees |W| / scale never exceeds the grid."""
    if (x > torch.finfo(torch.float16).max).any():
        raise ValueError("a quantization scale exceeds the float16 range (weights with |w| > ~4e5); "
                         "rescale the weights or keep this layer in floating point")
    h = x.to(torch.float16)
    too_small = h.to(torch.float32) < x
    # For positive float16, the next representable value is the next integer bit pattern.
    bumped = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(too_small, bumped, h)


def compute_scales(W: torch.Tensor, scheme: Scheme, g_idx: Optional[torch.Tensor] = None):
    """Scales (float16) and zero points for W (out, in): each (rows, n_groups) where rows is 1 for a
    per-tensor scheme and ``out`` otherwise. ``g_idx`` maps input columns to groups (default: natural
    order). Zero points are None for symmetric schemes. With ``scheme.scale_search == 'mse'`` each
    group's range is the shrink of MSE_SHRINK_GRID with the smallest squared error (module docstring)."""
    W = W.detach().to(torch.float32)
    if g_idx is None:
        g_idx = group_index(W.shape[1], scheme, W.device)
    n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
    rows = 1 if scheme.granularity == "tensor" else W.shape[0]
    Wr = W.reshape(1, -1) if scheme.granularity == "tensor" else W
    gi = g_idx.repeat(W.shape[0]) if scheme.granularity == "tensor" else g_idx
    index = gi.expand(rows, -1)
    # Per-group min and max via scatter_reduce: groups need not be contiguous (act-order g_idx).
    # include_self=True with a zero start keeps 0 inside [wmin, wmax], so zero is exactly representable.
    wmax = torch.zeros(rows, n_groups, device=W.device).scatter_reduce(1, index, Wr, "amax", include_self=True)
    wmin = torch.zeros(rows, n_groups, device=W.device).scatter_reduce(1, index, Wr, "amin", include_self=True)
    if scheme.scale_search == "absmax":
        return _range_scales(wmin, wmax, scheme)
    # Groups of consecutive columns (every layout but an act-order g_idx) are scored on a (rows, groups,
    # size) view, several times faster than gather/scatter; either way a group's error sums its own
    # elements in their order, so the same group gives the same error inside any matrix.
    size = scheme.group_size if scheme.granularity == "group" else Wr.shape[1]
    contiguous = torch.equal(index[0], torch.arange(Wr.shape[1], device=Wr.device) // size)
    score = (lambda sc, ze: _contiguous_group_error(Wr, size, sc, ze, scheme)) if contiguous else \
        (lambda sc, ze: _group_squared_error(Wr, index, sc, ze, scheme))
    best_scales, best_zeros = _range_scales(wmin, wmax, scheme)
    best_error = score(best_scales, best_zeros)
    for shrink in MSE_SHRINK_GRID[1:]:
        scales, zeros = _range_scales(wmin * shrink, wmax * shrink, scheme)
        error = score(scales, zeros)
        better = error < best_error          # strict: a tie keeps the larger scale, absmax first
        best_error = torch.where(better, error, best_error)
        best_scales = torch.where(better, scales, best_scales)
        if zeros is not None:
            best_zeros = torch.where(better, zeros, best_zeros)
    return best_scales, best_zeros


def _range_scales(wmin: torch.Tensor, wmax: torch.Tensor, scheme: Scheme):
    """Stored scales (float16, rounded up) and zero points (int16; None when symmetric) of per-group
    ranges [wmin, wmax] with wmin <= 0 <= wmax, each (rows, n_groups)."""
    if scheme.symmetric:
        absmax = torch.maximum(wmax, -wmin)
        levels = scheme.qmax if scheme.grid == "restricted" else (2 ** scheme.bits - 1) / 2
        return fp16_ceil(absmax / levels), None
    scales = fp16_ceil((wmax - wmin) / scheme.qmax)
    safe = torch.where(scales > 0, scales.to(torch.float32), torch.ones_like(wmax))
    zeros = torch.clamp(torch.round(-wmin / safe), 0, scheme.qmax)
    return scales, zeros.to(torch.int16)


def _group_squared_error(Wr: torch.Tensor, index: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                         scheme: Scheme) -> torch.Tensor:
    """sum((W - dequantize(quantize(W)))^2) per group, (rows, n_groups), against the stored scales, so
    the error scored is the one a deployed kernel would make."""
    s = torch.gather(scales, 1, index)
    z = None if zeros is None else torch.gather(zeros, 1, index)
    codes = quantize(Wr, s, z, scheme.qmin, scheme.qmax)
    squared = (Wr - dequantize(codes, s, z)).square()
    return torch.zeros(scales.shape, dtype=torch.float32, device=scales.device).scatter_add_(1, index, squared)


def _contiguous_group_error(Wr: torch.Tensor, size: int, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                            scheme: Scheme) -> torch.Tensor:
    """``_group_squared_error`` for groups of ``size`` consecutive columns (the last may be smaller): the
    same rounding, element for element (quantize's arithmetic in float32), on (rows, groups, size) views."""
    rows, width = Wr.shape
    full = width // size
    parts = []
    for start, count, length in ((0, full, size), (full * size, 1 if width % size else 0, width % size)):
        if count == 0:
            continue
        first = start // size
        x = Wr[:, start:start + count * length].reshape(rows, count, length)
        s = scales[:, first:first + count].to(torch.float32).unsqueeze(2)
        q = torch.round(torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0))
        if zeros is not None:
            z = zeros[:, first:first + count].to(torch.float32).unsqueeze(2)
            q = torch.clamp(q + z, scheme.qmin, scheme.qmax) - z
        else:
            q = torch.clamp(q, scheme.qmin, scheme.qmax)
        parts.append((x - q * s).square().contiguous().sum(dim=2))
    return torch.cat(parts, dim=1)


def scale_shrinks(W: torch.Tensor, qtensor: "QTensor") -> torch.Tensor:
    """(rows, n_groups) float32: each group's stored scale over the absmax scale of the same group of W (the
    weights that were quantized, in the QTensor's groups); NaN for an all-zero group. With
    ``scale_search='mse'`` on W itself (RTN, AWQ's scaled weights, GPTQ with static groups or per channel)
    this is the shrink factor the search chose, to within float16 rounding of both scales (about 0.1%, far
    under the grid's 0.025 step). With GPTQ's dynamic groups the search saw the solver's updated weights,
    so the ratio is to the original weights' range and may fall off the grid or exceed 1."""
    reference, _ = compute_scales(W, replace(qtensor.scheme, scale_search="absmax"), qtensor.group_of_column())
    reference, stored = reference.to(torch.float32), qtensor.scales.to(torch.float32)
    positive = reference > 0
    return torch.where(positive, stored / torch.where(positive, reference, torch.ones_like(reference)),
                       torch.full_like(reference, float("nan")))


def shrink_counts(shrinks: torch.Tensor) -> dict:
    """{factor of MSE_SHRINK_GRID as '0.925': groups whose shrink (``scale_shrinks``) is nearest it} for the
    factors that occur, in grid order, and 'other' for shrinks more than half a step off the grid (only
    GPTQ's dynamic groups: see ``scale_shrinks``). NaN (all-zero groups) is not counted."""
    values = shrinks[torch.isfinite(shrinks)].to(torch.float64)
    step = MSE_SHRINK_GRID[0] - MSE_SHRINK_GRID[1]
    index = torch.round((MSE_SHRINK_GRID[0] - values) / step)
    on_grid = (index >= 0) & (index < len(MSE_SHRINK_GRID))
    found = torch.bincount(index[on_grid].to(torch.int64), minlength=len(MSE_SHRINK_GRID)).tolist()
    counts = {f"{factor:.3f}": n for factor, n in zip(MSE_SHRINK_GRID, found) if n}
    other = int((~on_grid).sum())
    if other:
        counts["other"] = other
    return counts


def expand(per_group: torch.Tensor, g_idx: torch.Tensor, shape) -> torch.Tensor:
    """Broadcast (rows, n_groups) values to every weight of a (out, in) matrix."""
    return per_group[:, g_idx].expand(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes of x on the grid [qmin, qmax]: clamp(round(x / scale) + zero). A zero scale (an
    all-zero group) gives code ``zero`` (0 when symmetric), never NaN."""
    s = scale.to(torch.float32)
    q = torch.round(torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0))
    if zero is not None:
        q = q + zero.to(torch.float32)
    return torch.clamp(q, qmin, qmax).to(torch.int8 if qmin < 0 or qmax < 128 else torch.int16)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """Float32 weights from codes: (codes - zero) * scale."""
    q = codes.to(torch.float32)
    if zero is not None:
        q = q - zero.to(torch.float32)
    return q * scale.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Bit-packing


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers in [0, 2^bits) into a little-endian bitstream: ceil(n*bits/8) uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 2 ** bits):
        raise ValueError(f"values to pack must lie in [0, {2 ** bits - 1}]")
    bit_planes = (v.unsqueeze(1) >> torch.arange(bits)) & 1  # (n, bits), least significant first
    stream = bit_planes.reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``numel`` values, as int64."""
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
    planes = stream[: numel * bits].reshape(numel, bits)
    return (planes << torch.arange(bits)).sum(dim=1)


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


# ----------------------------------------------------------------------------------------------
# The quantized tensor


@dataclass
class QTensor:
    """A quantized (out, in) weight matrix.

    codes:  (out, in) integers on the scheme's grid.
    scales: (rows, n_groups) float16; rows is 1 per tensor, ``out`` otherwise.
    zeros:  like scales, integers in [0, 2^bits-1]; None when symmetric.
    g_idx:  (in,) group of each input column; None in natural order (not stored, not counted).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    scheme: Scheme
    g_idx: Optional[torch.Tensor] = None
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.shape = tuple(self.codes.shape)

    def group_of_column(self) -> torch.Tensor:
        return self.g_idx if self.g_idx is not None else group_index(self.shape[1], self.scheme, self.codes.device)

    def dequantize(self) -> torch.Tensor:
        out, n = self.shape
        n_groups = self.scales.shape[1]
        size = self.scheme.group_size if self.scheme.granularity == "group" else n
        if self.g_idx is None and n_groups * size == n:
            # Consecutive groups of equal size: a (rows, groups, size) view broadcasts each group's scale
            # without materialising a (out, in) scale matrix. Same products as the general path below;
            # a quantized model's weights are dequantized on every forward call (quantlab.swap).
            codes = self.codes.reshape(out, n_groups, size)
            zeros = None if self.zeros is None else self.zeros.unsqueeze(-1)
            return dequantize(codes, self.scales.unsqueeze(-1), zeros).reshape(out, n)
        g = self.group_of_column()
        zeros = None if self.zeros is None else expand(self.zeros, g, self.shape)
        return dequantize(self.codes, expand(self.scales, g, self.shape), zeros)

    def packed_codes(self) -> torch.Tensor:
        return pack(self.codes.to(torch.int64) - self.scheme.qmin, self.scheme.bits)

    @property
    def nbytes(self) -> int:
        """Deployable bytes: codes packed at ``bits`` + float16 scales + zeros packed at ``bits`` +
        g_idx as int32 when the columns were reordered."""
        n = packed_nbytes(self.codes.numel(), self.scheme.bits) + 2 * self.scales.numel()
        if self.zeros is not None:
            n += packed_nbytes(self.zeros.numel(), self.scheme.bits)
        if self.g_idx is not None:
            n += 4 * self.g_idx.numel()
        return n


def quantize_rtn(W: torch.Tensor, scheme: Scheme, g_idx: Optional[torch.Tensor] = None) -> QTensor:
    """Round-to-nearest quantization of W (out, in). W is not modified."""
    if W.dim() != 2:
        raise ValueError(f"quantize_rtn expects a 2-D (out, in) weight, got shape {tuple(W.shape)}")
    W = W.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf; it cannot be quantized")
    g = g_idx if g_idx is not None else group_index(W.shape[1], scheme, W.device)
    scales, zeros = compute_scales(W, scheme, g)
    codes = quantize(W, expand(scales, g, W.shape), None if zeros is None else expand(zeros, g, W.shape),
                     scheme.qmin, scheme.qmax)
    return QTensor(codes, scales, zeros, scheme, g_idx)


def expected_nbytes(out_features: int, in_features: int, scheme, reordered: bool = False) -> int:
    """Closed-form deployable bytes of one (out, in) weight under ``scheme``."""
    if isinstance(scheme, FloatScheme):
        return out_features * in_features * scheme.bits // 8
    if scheme.granularity == "tensor":
        n_scales = 1
    elif scheme.granularity == "channel":
        n_scales = out_features
    else:
        n_scales = out_features * math.ceil(in_features / scheme.group_size)
    n = packed_nbytes(out_features * in_features, scheme.bits) + 2 * n_scales
    if not scheme.symmetric:
        n += packed_nbytes(n_scales, scheme.bits)
    if reordered:
        n += 4 * in_features
    return n
