"""GPTQ (Frantar et al., 2022) on one weight matrix.

GPTQ rounds the columns of W (out, in) one at a time and, before rounding a column, lets it absorb the
rounding errors of the columns already rounded, weighted by the calibration Hessian H = X^T X / n. The
goal is a small output error on the calibration inputs: loss = tr(D H D^T) with D = W - W_hat.

How this file maps onto the paper's Algorithm 1
-----------------------------------------------
The paper factors the inverse Hessian, H^-1 = U^T U with U upper triangular, and after rounding column i
subtracts err_i * U[i, j] from every later column j, where err_i = (w_i - q_i) / U[i, i]. Unrolling that
recurrence gives D = E U, so E = D R with R = U^-1 and H = R R^T. Column j therefore holds, at the moment
it is rounded,

    w'_j = w_j + G_j / R[j, j]      with the feedback   G_j = sum_{i<j} (w_i - q_i) R[i, j]      (*)

R is the upper triangular factor of H itself, R = J chol(J H J) J (J reverses the order), so this needs
one Cholesky factorisation of H where the paper's code needs a Cholesky, a full inverse and a second
Cholesky; the inverse alone costs several times an n^3 matmul (benchmarks/bench_gptq.py). That one
factorisation runs in blocks whose arithmetic is matmuls (upper_cholesky). The rounding decisions
are the paper's, term for term. The same identity gives the loss for free:
tr(D H D^T) = ||D R||^2 = sum_j ||(w_j - q_j) R[j, j] + G_j||^2.

Lazy batch updates (the paper's Step 2): (*) is applied within a block of ``block_size`` columns one
column at a time, and to all columns after the block once per block, as one matrix product. The
in-block updates run in pieces small enough that torch keeps each on the calling thread (see _solve),
so the solver never changes torch's process-wide thread count and its products use every thread the
caller gave torch. The
rel_loss denominator tr(W H W^T) = ||W R||^2 is one more triangular product. Linears that read the
same inputs share H, and their stacked rows are solved in one loop (gptq_quantize_shared). benchmarks/bench_gptq.py
times a 4096 x 4096 solve against one 4096^3 matmul in the same process, and the paper's formulation
beside it.

Groups: with dynamic groups (the default) a group's scales come from the error-updated weights at the
moment the solver reaches its first column, i.e. the weights that minimise the loss given the columns
already rounded: w_S + G_S R_SS^-1 for the group's columns S (the paper's code computes the same). With
``static_groups`` they come from the original weights. ``act_order`` rounds columns in order of
descending diag(H); with dynamic groups the groups are then runs of that order, and ``g_idx`` maps each
input column to its group so ``QTensor.dequantize()`` is exact. Both paths call
``quant.compute_scales``, so a scheme with ``scale_search='mse'`` searches each group's scale on exactly
those weights: the solver-updated ones with dynamic groups, the original ones with static groups.

(Past 400 lines: the solver's steps read best in order, in one place, and the estimate of H's
condition number that quantlab.calibrate reports beside the solver's loss is Cholesky numerics of the
same kind, kept beside the other small utilities calibrate takes from here.)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from quantlab.quant import QTensor, Scheme, compute_scales, group_index, quantize_rtn

DAMP_RETRIES = 3  # each retry multiplies the dampening by 10
# torch splits an elementwise operation over its threads only above this many elements
# (at::internal::GRAIN_SIZE); below it the operation runs on the calling thread, outside any OpenMP
# parallel region. The column loop keeps under it (see _solve). Rounding kernels split above a smaller
# grain, 2048 elements, so the loop rounds a column in pieces of that size.
_GRAIN_SIZE = 32768
_ROUND_GRAIN = 2048
_CHOLESKY_BLOCK = 512   # block columns of upper_cholesky; 256 to 768 measure alike at n = 4096
# Up to this many columns upper_cholesky is one LAPACK call: it costs milliseconds there, and its factor
# is bit for bit the one the golden files were recorded with (the blocked factor differs in the last
# float32 bit, which flips a few GPTQ codes: MiniGPT's perplexities move by up to 0.4%).
_CHOLESKY_ONE_CALL = 1024


@dataclass
class GPTQResult:
    """The quantized weight and how well it fits the calibration data.

    loss:     tr(D H D^T), D = W - qtensor.dequantize(); None when H is unusable (NaN).
    rel_loss: loss / tr(W H W^T); None when that ratio is undefined (zero output on the calibration inputs).
    damp:     the dampening fraction actually used (raised when the Cholesky factorisation failed).
    seconds:  wall time of the whole call.
    health:   events worth a user's attention, each {"event": ..., "detail": ...} with event one of
              damp_raised, rtn_fallback, no_calibration_tokens, nan.
    """

    qtensor: QTensor
    loss: Optional[float]
    rel_loss: Optional[float]
    damp: float
    seconds: float
    health: list = field(default_factory=list)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """Quantize W (out, in) with GPTQ against H (in, in) = X^T X / n. W and H are not modified.

    The result's qtensor uses the same grids, float16 scales and code conventions as
    ``quantize_rtn``: with H = identity the codes are RTN's, code for code. ``block_size`` only
    trades speed for memory traffic: it changes the order of float32 sums, not a step of the algorithm
    (a weight within float32 rounding of a tie between two codes can round either way).
    """
    return gptq_quantize_shared([W], H, scheme, damp=damp, block_size=block_size, act_order=act_order,
                                static_groups=static_groups)[0]


def gptq_quantize_shared(weights: list, H: torch.Tensor, scheme: Scheme, *, damp: float = 0.01,
                         block_size: int = 128, act_order: bool = False, static_groups: bool = False) -> list:
    """gptq_quantize for Linears that read the same inputs (a block's q, k and v projections), so share
    H: one GPTQResult per weight, in order.

    GPTQ treats each output row on its own (the rows share only H's factor), so the weights' rows are
    stacked and solved in one column loop: its per-column cost, most of a small layer's solve, is paid
    once for the group rather than once per Linear. Each row goes through the same steps as in its own
    solve; only float32 products of another width may round differently in the last bit, which, as
    with ``block_size``, can move a weight within rounding of a tie to the other code (on the tests'
    matrices and SmolLM2's shapes every code is that of the separate solves: tests/test_gptq.py,
    tests/test_calibrate.py). A per-tensor scale spans the rows, so per-tensor schemes solve one at a
    time. Each result's ``seconds`` is its share of the solve, by rows."""
    if len(weights) > 1 and scheme.granularity == "tensor":
        return [gptq_quantize(W, H, scheme, damp=damp, block_size=block_size, act_order=act_order,
                              static_groups=static_groups) for W in weights]
    started = time.perf_counter()
    for W in weights:
        _validate(W, H, scheme, damp, block_size)
    health: list = []
    weights = [W.detach().to(torch.float32) for W in weights]
    W = weights[0] if len(weights) == 1 else torch.cat(weights)
    H = H.detach().to(torch.float32)
    n = W.shape[1]

    def fallback(H_or_none, damp_used):
        return [_rtn_fallback(w, H_or_none, scheme, damp_used, started, list(health)) for w in weights]

    if not all_finite(H):
        health.append({"event": "nan", "detail": "H contains NaN or Inf (non-finite activations)"})
        health.append({"event": "rtn_fallback", "detail": "H is not finite, so GPTQ cannot use it"})
        return fallback(None, damp)
    diag = H.diagonal()
    if (diag == 0).all():
        health.append({"event": "no_calibration_tokens",
                       "detail": "H is zero (no calibration input reached this layer); used round-to-nearest"})
        return fallback(H, damp)

    # A dead input (zero in every calibration token) carries no information: give it a unit diagonal so
    # H factorises, and zero its weight column (as the reference does) so it cannot inflate its group's
    # scale. Its loss contribution is zero either way, since H's row and column are zero.
    dead = diag == 0
    W_work, H_work = W, H
    if dead.any():
        H_work = H + torch.diag(dead.to(torch.float32))
        W_work = W.masked_fill(dead, 0.0)

    order = None  # natural order
    if act_order:
        order = torch.argsort(H_work.diagonal(), descending=True, stable=True)
        if torch.equal(order, torch.arange(n)):
            order = None  # already sorted: no reordering to record (g_idx would cost bytes for nothing)
    R, damp_used = _upper_factor(H_work if order is None else H_work[order][:, order], damp, health)
    if R is None:
        health.append({"event": "rtn_fallback",
                       "detail": f"H + {damp_used:g} * mean(diag H) * I is still not positive definite"})
        return fallback(H, damp_used)

    solution = _solve(W_work, R, order, scheme, block_size, static_groups)
    # Both traces include the dampening, tr(A (H + lambda I) A^T); take its share, lambda ||A||^2, back
    # out. Dead columns have D = 0 and W_work = 0, so their unit diagonal adds nothing. Per row here,
    # summed over each weight's rows below.
    lam = damp_used * float(H_work.diagonal().mean())
    losses = solution.loss_damped - lam * solution.error_sq
    W_solving_order = W_work if order is None else W_work[:, order]
    denominators = (_weighted_row_norms(W_solving_order, R)
                    - lam * torch.linalg.vector_norm(W_work, dim=1, dtype=torch.float64) ** 2)
    if not (all_finite(losses) and all_finite(denominators)):
        health.append({"event": "nan", "detail": "the solve produced a non-finite loss"})
        health.append({"event": "rtn_fallback", "detail": "the GPTQ solution was not finite"})
        return fallback(H, damp_used)
    seconds = time.perf_counter() - started
    results, r1 = [], 0
    for w in weights:
        r2 = r1 + w.shape[0]
        loss = max(0.0, float(losses[r1:r2].sum()))
        results.append(GPTQResult(_rows(solution.qtensor, r1, r2, len(weights) > 1), loss,
                                  _ratio(loss, float(denominators[r1:r2].sum())), damp_used,
                                  seconds * w.shape[0] / W.shape[0], list(health)))
        r1 = r2
    return results


def _rows(qtensor: QTensor, r1: int, r2: int, copy: bool) -> QTensor:
    """Rows r1:r2 of a QTensor with a scale per row (copies, so no weight's tensors share storage)."""
    if not copy:
        return qtensor
    zeros = None if qtensor.zeros is None else qtensor.zeros[r1:r2].clone()
    g_idx = None if qtensor.g_idx is None else qtensor.g_idx.clone()
    return QTensor(qtensor.codes[r1:r2].clone(), qtensor.scales[r1:r2].clone(), zeros, qtensor.scheme, g_idx)


# ----------------------------------------------------------------------------------------------
# Losses (pure)


def output_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) with D = W - W_hat: the mean squared output error on the inputs that made H."""
    D = W.detach().to(torch.float32) - W_hat.detach().to(torch.float32)
    return float(((D @ H.to(torch.float32)) * D).sum())


def relative_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> Optional[float]:
    """tr(D H D^T) / tr(W H W^T); None when the layer's output on these inputs is zero."""
    W = W.detach().to(torch.float32)
    denominator = float(((W @ H.to(torch.float32)) * W).sum())
    return _ratio(output_loss(W, W_hat, H), denominator)


def _ratio(loss: Optional[float], denominator: float) -> Optional[float]:
    if loss is None or not denominator > 0:
        return None
    return loss / denominator


# ----------------------------------------------------------------------------------------------
# Small utilities (also used by quantlab.calibrate)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x. aminmax propagates NaN, and is ~10x faster than isfinite(x).all() on 4096^2."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def condition_number(H: torch.Tensor, *, steps: int = 32) -> Optional[float]:
    """An estimate of lambda_max / lambda_min of a symmetric positive semi-definite H (quantlab.calibrate's
    per-layer ``h_cond``), in float64, for about the cost of two Cholesky factorisations rather than an
    eigendecomposition.

    How: lambda_max by ``steps`` Lanczos steps on H, lambda_min by as many on H^-1 = L^-T L^-1 (L the
    Cholesky factor of H). A Lanczos (Rayleigh-Ritz) value never exceeds the extreme eigenvalue it
    estimates, so the result is a lower bound of the exact ratio, up to rounding. It converges fastest
    where the extreme eigenvalues stand apart from the rest; where they are clustered it lands inside the
    cluster, within its spread (tests/test_gptq.py checks matrices of known spectrum and correlated
    Hessians against eigvalsh; benchmarks/bench_gptq.py --minigpt/--smollm2 every Hessian of a run).
    A singular H (whose float64 Cholesky factorisation fails) reports 1 / eps(float64), about 4.5e15,
    rather than infinity, so results stay JSON numbers; a zero or non-finite H, None."""
    if not all_finite(H):
        return None
    H = H.detach().to(torch.float64)
    if H.numel() == 0 or float(H.diagonal().max()) <= 0:
        return None                                   # PSD with a zero diagonal: H = 0
    largest = _largest_ritz_value(lambda v: H @ v, H.shape[0], steps, H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return 1 / torch.finfo(torch.float64).eps
    # H^-1 = L^-T L^-1. The explicit triangular inverse costs about one more Cholesky and makes each step
    # two matrix-vector products, where solving with L one vector at a time is many times slower.
    L_inverse = torch.linalg.solve_triangular(L, torch.eye(H.shape[0], dtype=H.dtype, device=H.device), upper=False)
    smallest = 1 / _largest_ritz_value(lambda v: (L_inverse @ v) @ L_inverse, H.shape[0], steps, H.device)
    return largest / max(smallest, largest * torch.finfo(torch.float64).eps)


def _largest_ritz_value(apply, n: int, steps: int, device, tolerance: float = 1e-6) -> float:
    """The largest eigenvalue of T = V A V^T after at most ``steps`` Lanczos steps (fully
    reorthogonalised) on the symmetric positive semi-definite operator ``apply`` (v -> A v), from a seeded
    random start: at most A's largest eigenvalue, and converging to it. Stops early once the value moves
    by less than ``tolerance`` (relative) over _RITZ_CHECK steps."""
    V = torch.empty(min(steps, n), n, dtype=torch.float64, device=device)   # orthonormal Lanczos vectors, as rows
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    v = v / torch.linalg.vector_norm(v)
    alphas, betas, value = [], [], None
    for k in range(V.shape[0]):
        V[k] = v
        w = apply(v)
        alphas.append(float(v @ w))
        for _ in range(2):                                      # twice is enough (Kahan and Parlett)
            w = w - (V[:k + 1] @ w) @ V[:k + 1]                 # not V.t() @ (...): many times slower
        beta = float(torch.linalg.vector_norm(w))
        exhausted = beta <= 1e-12 * max(abs(a) for a in alphas)   # the Krylov space holds an eigenvector
        if exhausted or k + 1 == V.shape[0] or (k + 1) % _RITZ_CHECK == 0:
            previous, value = value, _largest_tridiagonal_eigenvalue(alphas, betas)
            if exhausted or (previous is not None and value - previous <= tolerance * value):
                break
        betas.append(beta)
        v = w / beta
    return value


_RITZ_CHECK = 4   # Lanczos steps between convergence checks


def _largest_tridiagonal_eigenvalue(diagonal: list, off_diagonal: list) -> float:
    k = len(diagonal)
    T = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(off_diagonal[:k - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(T)[-1])


# ----------------------------------------------------------------------------------------------
# The solver's steps


def _validate(W: torch.Tensor, H: torch.Tensor, scheme, damp: float, block_size: int) -> None:
    if not isinstance(scheme, Scheme):
        raise TypeError(f"gptq_quantize solves integer grids only, got {scheme!r}; "
                        "float schemes (fp16/fp32) need no solver: round the weights with .to(dtype)")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out, in) weight as in torch.nn.Linear, got shape {tuple(W.shape)}")
    if tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be (in, in) = ({W.shape[1]}, {W.shape[1]}) for W of shape {tuple(W.shape)}, "
                         f"got {tuple(H.shape)}; H is X^T X / n over inputs X (n, in)")
    if not all_finite(W):
        raise ValueError("W contains NaN or Inf; it cannot be quantized")
    if (H.diagonal() < 0).any():
        raise ValueError("H has a negative diagonal entry, so it is not X^T X / n of any inputs; "
                         "build it from the layer's inputs (quantlab.calibrate does)")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < float("inf"):
        raise ValueError(f"damp must be a positive fraction of mean(diag H), typically 0.01; got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (128 is typical), got {block_size!r}")


def _rtn_fallback(W: torch.Tensor, H: Optional[torch.Tensor], scheme: Scheme, damp: float, started: float,
                  health: list) -> GPTQResult:
    """Round-to-nearest, with its loss on H (None when H is unusable)."""
    qtensor = quantize_rtn(W, scheme)
    loss = rel_loss = None
    if H is not None:
        loss = output_loss(W, qtensor.dequantize(), H)
        rel_loss = relative_loss(W, qtensor.dequantize(), H)
    return GPTQResult(qtensor, loss, rel_loss, damp, time.perf_counter() - started, health)


def _upper_factor(H: torch.Tensor, damp: float, health: list):
    """R upper triangular with R R^T = H + lambda I, lambda = damp * mean(diag H), raising damp x10 up
    to DAMP_RETRIES times when the factorisation fails. Returns (R, damp used), or (None, damp) when H
    cannot be factorised at all."""
    mean_diag = float(H.diagonal().mean())
    for attempt in range(DAMP_RETRIES + 1):
        R, info = upper_cholesky(H, damp * mean_diag)
        if info == 0:
            return R, damp
        if attempt < DAMP_RETRIES:
            health.append({"event": "damp_raised", "detail": f"Cholesky of H + {damp:g} * mean(diag H) * I "
                                                             f"failed; retrying with damp {damp * 10:g}"})
            damp *= 10
    return None, damp


def upper_cholesky(H: torch.Tensor, shift: float = 0.0, block: Optional[int] = None):
    """(R, info): R upper triangular with R R^T = H + shift * I, and info 0 on success, otherwise the
    1-based column at which the factorisation, which runs from the last column back, found H + shift * I
    not positive definite. H is not modified.

    R is the Cholesky factor of the reversed matrix, reversed back, R = J chol(J H J) J, computed block
    column by block column from the last: each block column is one product with the block columns
    already factored, one LAPACK Cholesky of a (block, block) diagonal block and one triangular solve.
    Nearly all the arithmetic is then in matmuls, which use every thread torch has, where LAPACK's
    factorisation of the whole matrix runs several times slower than its n^3/3 flops take in a matmul
    (bench_gptq.py --profile prints the step against one), and nothing copies or reverses all of H.
    By default a matrix of at most _CHOLESKY_ONE_CALL columns is one block."""
    n = H.shape[0]
    if block is None:
        block = n if n <= _CHOLESKY_ONE_CALL else _CHOLESKY_BLOCK
    R = torch.zeros_like(H)
    for i2 in range(n, 0, -block):
        i1 = max(i2 - block, 0)
        # Block column i1:i2 of H + shift I, rows 0:i2, less what the columns after it account for.
        panel = H[:i2, i1:i2] - R[:i2, i2:] @ R[i1:i2, i2:].t()      # (i2, b), a fresh tensor
        panel[i1:i2].diagonal().add_(shift)
        lower, info = torch.linalg.cholesky_ex(panel[i1:i2].flip(0, 1))
        if int(info) != 0:
            return R, i2 - int(info) + 1
        R[i1:i2, i1:i2] = lower.flip(0, 1)
        if i1 > 0:
            # The rows above the diagonal block: X with X R_kk^T = the panel's upper rows.
            R[:i1, i1:i2] = torch.linalg.solve_triangular(R[i1:i2, i1:i2].t(), panel[:i1], upper=False, left=False)
    return R, 0


def _weighted_row_norms(W: torch.Tensor, R: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """(out,) float64: row i is ||W_i R||^2 = W_i R R^T W_i^T for upper triangular R, a chunk of columns
    of W R at a time so the zeros below R's diagonal cost nothing: half a full (out, n, n) product.
    (512-column chunks: large enough for an efficient matmul, small enough that the wasted lower
    triangle stays small.)"""
    n = W.shape[1]
    total = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    for c1 in range(0, n, chunk):
        c2 = min(c1 + chunk, n)
        total += (W[:, :c2] @ R[:c2, c1:c2]).square_().sum(1)      # float32 per chunk, summed in float64
    return total


class _Grid:
    """One group's grid, prepared once so that rounding a column is a few elementwise operations that
    reproduce ``quant.quantize`` and ``quant.dequantize`` bit for bit (the same division, rounding and
    clamp, in float32). Each tensor is a (rows,) vector: rows is 1 per tensor, ``out`` otherwise."""

    def __init__(self, scale: torch.Tensor, zero: Optional[torch.Tensor], qmin: int, qmax: int):
        self.scale = scale.to(torch.float32)
        self.zero = None if zero is None else zero.to(torch.float32)
        dead = self.scale == 0
        # quantize divides by the scale where it is positive and gives code `zero` where it is 0 (an
        # all-zero group); ``dead`` is None in the usual case, where no scale is 0.
        self.divisor = torch.where(dead, torch.ones_like(self.scale), self.scale)
        self.dead = dead if bool(dead.any()) else None
        self.qmin, self.qmax = qmin, qmax

    def round(self, x: torch.Tensor, level: torch.Tensor, rounded: torch.Tensor) -> None:
        """Write the grid level of x (quantize's code, as a float) into ``level`` and its value on the
        grid (dequantize's output) into ``rounded``."""
        torch.div(x, self.divisor, out=level)
        if self.dead is not None:
            level.masked_fill_(self.dead, 0.0)
        for piece in level.split(_ROUND_GRAIN):    # round_() in place, each piece under the rounding grain
            piece.round_()
        if self.zero is None:
            level.clamp_(self.qmin, self.qmax)
            torch.mul(level, self.scale, out=rounded)
        else:
            level.add_(self.zero).clamp_(self.qmin, self.qmax)
            torch.sub(level, self.zero, out=rounded).mul_(self.scale)


class _GroupGrids:
    """Each group's scales and zero points: as stored (float16, int16) for the QTensor, and as a _Grid
    for the column loop, converted once per group rather than at every column."""

    def __init__(self, scheme: Scheme):
        self.scheme = scheme
        self.scales, self.zeros, self.for_loop = [], [], []

    def add(self, scales: torch.Tensor, zeros: Optional[torch.Tensor]) -> None:
        """Append the groups of compute_scales' output: (rows, n_groups) each."""
        for g in range(scales.shape[1]):
            zero = None if zeros is None else zeros[:, g]
            self.scales.append(scales[:, g])
            self.zeros.append(zero)
            self.for_loop.append(_Grid(scales[:, g], zero, self.scheme.qmin, self.scheme.qmax))

    def stacked(self):
        """(scales, zeros) as QTensor stores them: (rows, n_groups), zeros None when symmetric."""
        zeros = None if self.zeros[0] is None else torch.stack(self.zeros, dim=1)
        return torch.stack(self.scales, dim=1), zeros


@dataclass
class _Solution:
    qtensor: QTensor
    loss_damped: torch.Tensor     # (out,) float64: row i of tr(D (H + lambda I) D^T) = ||D R||^2
    error_sq: torch.Tensor        # (out,) float64: ||D_i||^2


def _block_bounds(n: int, block_size: int, group_starts: range) -> list:
    """Block boundaries: every block_size columns, and also at every dynamic group's first column, so a
    group always starts a block and sees the feedback of every column before it."""
    starts = sorted(set(range(0, n, block_size)) | set(group_starts))
    return list(zip(starts, starts[1:] + [n]))


def _rows_per_update(out_features: int) -> int:
    """Rows of a rank-1 update per operation: the most that keep it under _GRAIN_SIZE elements."""
    return max(1, _GRAIN_SIZE // out_features)


def _solve(W: torch.Tensor, R: torch.Tensor, order: Optional[torch.Tensor], scheme: Scheme, block_size: int,
           static_groups: bool) -> _Solution:
    """The column loop. W (out, n) with dead columns zeroed; ``order`` the solving order of the columns
    (None: natural); R upper triangular with R R^T = (H + lambda I) in solving order.

    Works transposed, one row per input column, so each column is contiguous. The buffers below are
    this function's own and are updated in place: a copy per column would cost more than the solve.

    Every elementwise operation of the column loop touches at most _GRAIN_SIZE floats (each column's
    rank-1 update of the block's later columns runs in pieces of rows), so torch runs it on the calling
    thread without waking its other threads, and the loop needs no change of the process-wide thread
    count; the lazy batch update's product uses every thread torch has. The pieces do the same
    arithmetic, element for element, as one update of the whole block, so the codes are those of the
    one-update loop. (Sub-blocks with one product each would move work into BLAS, but reorder float32
    sums: a few codes flip, enough to move a MiniGPT golden perplexity past its tolerance.)
    """
    n, out = W.shape[1], W.shape[0]
    W_t = (W.t() if order is None else W.t()[order]).contiguous()   # (n, out): columns in solving order
    feedback = torch.zeros_like(W_t)                                 # (n, out): G of (*)
    codes_t = torch.empty(W_t.shape, dtype=torch.int8 if scheme.qmin < 0 or scheme.qmax < 128 else torch.int16,
                          device=W.device)
    r_diag = R.diagonal()
    rows_per_update = _rows_per_update(out)

    grids = _GroupGrids(scheme)
    dynamic_groups = scheme.granularity == "group" and not static_groups
    if dynamic_groups:
        group_of_step = torch.arange(n, device=W.device) // scheme.group_size   # groups: runs of the solving order
        group_starts = range(0, n, scheme.group_size)            # grids are added as the solver reaches them
    else:
        # Scales from the original weights: per tensor or channel that is what a dynamic solver sees
        # anyway (nothing is rounded before column 0); for static groups it is the point.
        grids.add(*compute_scales(W, scheme))
        group_of_step = group_index(n, scheme, W.device)
        group_of_step = group_of_step if order is None else group_of_step[order]
        group_starts = range(0)
    groups = group_of_step.tolist()

    # Summed per row (weight rows are columns here) without a float() per block: on a GPU that would
    # wait for the block's work to finish.
    loss_damped = torch.zeros(out, dtype=torch.float64, device=W.device)
    error_sq = torch.zeros(out, dtype=torch.float64, device=W.device)
    rounded = torch.empty(out, device=W.device)          # one column's q_j
    for i1, i2 in _block_bounds(n, block_size, group_starts):
        if dynamic_groups and i1 % scheme.group_size == 0:
            g2 = min(i1 + scheme.group_size, n)
            # The loss-optimal weights given the columns already rounded: w_S + G_S R_SS^-1.
            group_weights = W_t[i1:g2].t() + torch.linalg.solve_triangular(
                R[i1:g2, i1:g2], feedback[i1:g2].t(), upper=True, left=False)   # (out, gs)
            grids.add(*compute_scales(group_weights, scheme))                   # one group

        # w'_j of (*) for the block's columns, with the feedback of every column before the block.
        current = W_t[i1:i2] + feedback[i1:i2] / r_diag[i1:i2, None]        # (B, out)
        feedback_scaled = R[i1:i2, i1:i2] / r_diag[i1:i2]                   # (B, B): R[i, j] / R[j, j]
        errors = torch.empty_like(current)      # (B, out): w_j - q_j, original weights minus rounded
        levels = torch.empty_like(current)      # (B, out): the codes, as floats
        # Row views made once per block: indexing a tensor costs about as much as a small operation.
        current_rows, level_rows, error_rows = current.unbind(), levels.unbind(), errors.unbind()
        weight_rows = W_t[i1:i2].unbind()
        for k in range(i2 - i1):
            grids.for_loop[groups[i1 + k]].round(current_rows[k], level_rows[k], rounded)
            torch.sub(weight_rows[k], rounded, out=error_rows[k])
            # (*) within the block: this column's error reaches the block's later columns now.
            for r1 in range(k + 1, i2 - i1, rows_per_update):
                r2 = min(r1 + rows_per_update, i2 - i1)
                current[r1:r2].addr_(feedback_scaled[k, r1:r2], error_rows[k])
        codes_t[i1:i2].copy_(levels)
        # This block's rows of E = D R: (w'_j - q_j) R[j, j], since w'_j - q_j = (w_j - q_j) + G_j / R[j, j].
        # Per weight row, each block's float32 sum added up in float64 (a float64 reduction over dim 0 of
        # each block runs several times slower).
        E_block = current.sub_(W_t[i1:i2]).add_(errors).mul_(r_diag[i1:i2, None])
        loss_damped += E_block.square_().sum(0)
        error_sq += errors.square().sum(0)
        # (*) for every column after the block, in one product: the lazy batch update.
        feedback[i2:].addmm_(R[i1:i2, i2:].t(), errors)

    codes = codes_t.t() if order is None else codes_t[torch.argsort(order)].t()   # (out, n), natural order
    g_idx = None
    if dynamic_groups and order is not None:
        g_idx = torch.empty(n, dtype=torch.long, device=W.device)
        g_idx[order] = group_of_step
    scales, zeros = grids.stacked()
    return _Solution(QTensor(codes.contiguous(), scales, zeros, scheme, g_idx), loss_damped, error_sq)
