"""AWQ (Lin et al., 2023): the per-input-channel scale search for one group of Linears sharing an input.

AWQ quantizes W s instead of W, for a per-input-channel scale s > 0, and computes with
W_hat = Q(W s) / s, which is the same function as folding 1/s into whatever produces the input (a
norm's weight, a previous Linear) and storing Q(W s). Before rounding nothing changes:
(W s)(x / s) = W x. After rounding, channels with large activations get a finer grid relative to their
weights, so the output error on real inputs falls. s = mean|x|^alpha, with alpha searched on a grid.

The error of a candidate is the group's output squared error on the calibration inputs,
sum_i tr(D_i H D_i^T) with D_i = W_i - W_hat_i and H = X^T X / n: exactly the mean over tokens of
||W_i x - W_hat_i x||^2 summed over the group, computed from the Hessian the pipeline collects anyway,
without keeping or re-running activations.

Where this differs from the references (mit-han-lab/llm-awq ``auto_scale.py``/``auto_clip.py`` and
llm-compressor's ``AWQModifier``; read, not copied):
- Loss. Both references run a module forward (for q/k/v the whole attention block, for gate/up the
  whole MLP) and take the mean squared error of its output; this file scores the group's own Linear
  outputs through H. It is the objective GPTQ minimises, and needs no forward pass per grid point,
  but it does not see how the error propagates through attention's softmax or the MLP's activation.
- Grid. The references use alpha in {0, 1/20, ..., 19/20}; the default grid here is {0, 0.1, ..., 1}
  (the search is matmul-bound on a CPU; ``alphas`` takes any grid). Normalisation is the references': s / sqrt(max(s) min(s)), s clamped >= 1e-4.
- llm-compressor's default ``duo_scaling`` divides by a weight magnitude, s = mean|x|^a / mean|w|^(1-a);
  the paper's (and llm-awq's) s = mean|x|^a is the default here, ``duo_scaling=True`` gives the other.
- Clipping: as in llm-awq, a per-(row, group) search over max-value shrink factors 1, 0.95, ..., 0.55 of
  the scaled weights, keeping the one with the smallest error of that group's partial output; here that
  error is d_g H'_gg d_g^T with H' the Hessian of the scaled inputs (llm-awq samples 512 tokens and
  computes the same quantity from them). llm-awq skips q/k (their error is seen through q k^T); the
  caller decides which groups to clip.
- Grids: quantlab's own (restricted symmetric INT4 is [-7, 7], float16 scales rounded up), so alpha = 0
  is quantlab's RTN, code for code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from quantlab.quant import Scheme, expand, group_index, quantize_rtn

# 11 points 0.1 apart in [0, 1]: the search costs one tr(D H D^T) per point and group, and with 20 points
# it took 89 s of AWQ's 91 s on SmolLM2-135M (2-core CPU); the alphas chosen there lay in 0.2-0.45.
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
MIN_SCALE = 1e-4                                    # as both references: a dead channel's s stays finite
CLIP_SHRINKS = tuple(1 - i / 20 for i in range(10))  # 1.0 .. 0.55: llm-awq's max_shrink 0.5, n_grid 20


@dataclass(frozen=True)
class AWQResult:
    """The chosen scale of one input group, and what the search measured.

    scales:     s (in,) float32, s > 0; the Linears compute Q(W s) / s.
    alpha:      the chosen exponent.
    error:      sum over the group of tr(D H D^T) at the chosen alpha (after clipping, when asked).
    rtn_error:  the same at alpha = 0, i.e. plain RTN: the error before AWQ.
    errors:     (alpha, error) for every grid point, in grid order.
    clip:       per Linear, the (rows, n_groups) max-value shrink factor chosen on the scaled weights,
                or None when clipping was not searched.
    """

    scales: torch.Tensor
    alpha: float
    error: float
    rtn_error: float
    errors: tuple
    clip: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------
# Pure helpers


def awq_scales(channel_absmean: torch.Tensor, alpha: float, weight_absmean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s = mean|x|^alpha (or mean|x|^alpha / mean|w|^(1-alpha) with ``weight_absmean``), clamped to
    >= 1e-4, divided by sqrt(max(s) min(s)) so the scales straddle 1, and rounded to float16 (float32
    tensor of float16 values). alpha = 0 gives all ones."""
    x = channel_absmean.detach().to(torch.float32)
    s = x.pow(alpha)
    if weight_absmean is not None:
        s = s / (weight_absmean.detach().to(torch.float32).pow(1 - alpha) + MIN_SCALE)
    s = s.clamp(min=MIN_SCALE)
    s = s / (s.max() * s.min()).sqrt()
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    # Rounded to the float16 values a deployed model stores, so the search scores the scales it will use.
    fp16 = torch.finfo(torch.float16)
    return s.clamp(fp16.tiny, fp16.max).to(torch.float16).to(torch.float32)


def scaled_hessian(H: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The Hessian of the scaled inputs x / s: diag(1/s) H diag(1/s). GPTQ on W s against it minimises
    the same output error as GPTQ on W against H."""
    inv = 1.0 / scales.to(torch.float32)
    return H.to(torch.float32) * inv[:, None] * inv[None, :]


def group_error(weights: Sequence[torch.Tensor], dequantized: Sequence[torch.Tensor], H: torch.Tensor) -> float:
    """sum_i tr(D_i H D_i^T), D_i = W_i - W_hat_i: the group's mean squared output error over the tokens of H."""
    H = H.to(torch.float32)
    total = 0.0
    for W, W_hat in zip(weights, dequantized):
        D = W.detach().to(torch.float32) - W_hat.to(torch.float32)
        total += float(((D @ H) * D).sum())
    return total


def weight_absmean(weights: Sequence[torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """llm-compressor's per-input-channel weight magnitude for duo scaling: |w| over its group's absmax,
    averaged over every output row of the group's Linears."""
    normalised = []
    for W in weights:
        W = W.detach().to(torch.float32)
        g = group_index(W.shape[1], scheme)
        absmax = expand(_group_reduce(W.abs(), g, scheme, "amax"), g, W.shape)
        normalised.append(W.abs() / (absmax + 1e-6))
    return torch.cat(normalised).mean(dim=0)


def rtn_dequantized(W_scaled: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    return quantize_rtn(W_scaled, scheme).dequantize()


# ----------------------------------------------------------------------------------------------
# The search


def awq_search(weights: Sequence[torch.Tensor], H: torch.Tensor, channel_absmean: torch.Tensor, scheme: Scheme, *,
               alphas: Sequence[float] = DEFAULT_ALPHAS, duo_scaling: bool = False, clip: bool = False,
               quantizer: Optional[Callable[[torch.Tensor, Scheme], torch.Tensor]] = None) -> AWQResult:
    """Search alpha for the Linears ``weights`` [(out_i, in)] that read the same inputs, whose Hessian is
    H (in, in) and per-channel mean |x| is ``channel_absmean`` (in,). Nothing is modified.

    ``quantizer(W_scaled, scheme) -> dequantized W_scaled`` rounds a scaled weight during the search
    (default: RTN, as both references search; GPTQ then runs once on the chosen scale, see
    ``scaled_hessian``). ``clip`` adds llm-awq's per-group max-value search at the chosen scale.
    The grid should contain 0 (the RTN point): the chosen error then never exceeds RTN's.
    """
    weights = [W.detach().to(torch.float32) for W in weights]
    _validate(weights, H, channel_absmean, alphas)
    quantizer = quantizer or rtn_dequantized
    H = H.detach().to(torch.float32)
    w_mean = weight_absmean(weights, scheme) if duo_scaling else None

    errors = []
    best = None   # (error, alpha, scales)
    rtn_error = None
    for alpha in alphas:
        s = awq_scales(channel_absmean, float(alpha), w_mean)
        dequantized = [quantizer(W * s, scheme) / s for W in weights]
        error = group_error(weights, dequantized, H)
        errors.append((float(alpha), error))
        if alpha == 0:
            rtn_error = error
        if best is None or error < best[0]:   # strict: ties keep the smaller alpha (RTN first)
            best = (error, float(alpha), s)
    if rtn_error is None:
        rtn_error = group_error(weights, [quantizer(W, scheme) for W in weights], H)
    error, alpha, s = best

    clip_factors = None
    if clip:
        Hs = scaled_hessian(H, s)
        clipped = [clip_search(W * s, Hs, scheme) for W in weights]
        clip_factors = tuple(factors for _, factors in clipped)
        clipped_error = group_error(weights, [quantizer(Wc, scheme) / s for Wc, _ in clipped], H)
        # A clip is chosen group by group on partial outputs; keep it only if the whole group gains.
        if clipped_error < error:
            error = clipped_error
        else:
            clip_factors = tuple(torch.ones_like(f) for f in clip_factors)
    return AWQResult(s, alpha, error, rtn_error, tuple(errors), clip_factors)


def apply_clip(W: torch.Tensor, factors: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """W (out, in) with each (row, group) clamped to factor x its absmax (asymmetric: factor x its
    min and max). ``factors`` is (rows, n_groups) as ``clip_search`` returns it."""
    W = W.detach().to(torch.float32)
    g = group_index(W.shape[1], scheme)
    rows = 1 if scheme.granularity == "tensor" else W.shape[0]
    f = expand(factors.reshape(rows, -1), g, W.shape)
    if scheme.symmetric:
        limit = expand(_group_reduce(W.abs(), g, scheme, "amax"), g, W.shape) * f
        return torch.maximum(torch.minimum(W, limit), -limit)
    high = expand(_group_reduce(W, g, scheme, "amax"), g, W.shape) * f
    low = expand(_group_reduce(W, g, scheme, "amin"), g, W.shape) * f
    return torch.maximum(torch.minimum(W, high), low)


def clip_search(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, shrinks: Sequence[float] = CLIP_SHRINKS):
    """(clipped W, factors): for each (row, group), the max-value shrink of ``shrinks`` whose RTN
    rounding gives the smallest error of that group's partial output, d_g H_gg d_g^T. Per tensor, the
    search is over the whole tensor's output error."""
    W = W.detach().to(torch.float32)
    g = group_index(W.shape[1], scheme)
    n_groups = int(g.max()) + 1
    rows = 1 if scheme.granularity == "tensor" else W.shape[0]
    best_error = torch.full((rows, n_groups), float("inf"))
    best_factor = torch.ones(rows, n_groups)
    best_W = W.clone()
    for shrink in shrinks:
        factors = torch.full((rows, n_groups), float(shrink))
        Wc = apply_clip(W, factors, scheme)
        D = W - quantize_rtn(Wc, scheme).dequantize()
        error = _per_group_error(D, H, g, n_groups, per_tensor=rows == 1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_factor = torch.where(better, factors, best_factor)
        best_W = torch.where(better[:, g].expand_as(W), Wc, best_W)   # (rows, in) -> (out, in)
    return best_W, best_factor


def _group_reduce(W: torch.Tensor, g: torch.Tensor, scheme: Scheme, how: str) -> torch.Tensor:
    n_groups = int(g.max()) + 1
    if scheme.granularity == "tensor":
        value = W.amax() if how == "amax" else W.amin()
        return value.reshape(1, 1)
    start = torch.full((W.shape[0], n_groups), float("-inf") if how == "amax" else float("inf"))
    return start.scatter_reduce(1, g.expand(W.shape[0], -1), W, how, include_self=True)


def _per_group_error(D: torch.Tensor, H: torch.Tensor, g: torch.Tensor, n_groups: int, per_tensor: bool) -> torch.Tensor:
    """(rows, n_groups): d_g H_gg d_g^T per row and group (groups are contiguous columns here)."""
    out = torch.empty(D.shape[0], n_groups)
    for group in range(n_groups):
        cols = (g == group).nonzero().flatten()
        Dg = D[:, cols]
        out[:, group] = ((Dg @ H[cols][:, cols]) * Dg).sum(dim=1)
    return out.sum(dim=0, keepdim=True) if per_tensor else out


def _validate(weights, H, channel_absmean, alphas) -> None:
    if not weights:
        raise ValueError("awq_search needs at least one weight (the Linears that share an input)")
    n = weights[0].shape[1]
    for W in weights:
        if W.dim() != 2 or W.shape[1] != n:
            raise ValueError(f"every weight of a group must be (out, {n}): they read the same input; got {tuple(W.shape)}")
    if tuple(H.shape) != (n, n):
        raise ValueError(f"H must be ({n}, {n}) for inputs of {n} features, got {tuple(H.shape)}")
    if tuple(channel_absmean.shape) != (n,):
        raise ValueError(f"channel_absmean must be ({n},), the mean |x| of each input channel; got {tuple(channel_absmean.shape)}")
    if (channel_absmean < 0).any() or not torch.isfinite(channel_absmean).all():
        raise ValueError("channel_absmean must be finite and non-negative (a mean of |x|)")
    if not len(alphas) or any(not 0 <= float(a) <= 1 for a in alphas):
        raise ValueError(f"alphas must be a non-empty grid in [0, 1] (e.g. 0, 0.1, ..., 1), got {list(alphas)!r}")
