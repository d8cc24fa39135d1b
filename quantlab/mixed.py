"""Mixed precision under a byte budget: measure each layer's sensitivity per candidate scheme, then
choose one candidate per layer with the least total estimated loss.

Sensitivity (``layer_sensitivity``). Two proxies are measured on the float model in one forward and
backward pass over the calibration windows, for each Linear and candidate, with D = W - Q_c(W) the error
the layer will carry: Q_c is the method that will quantize it, round-to-nearest, or GPTQ with the
scheme's own options (act-order, static groups, damping) against the float model's H. The method matters:
GPTQ removes much more of some layers' error than of others', so an RTN-measured ranking spends the
wide candidates where GPTQ needed no help (on SmolLM2 with act-order GPTQ, RTN-measured sensitivities gave
a mixed scheme that only tied uniform INT4 g64 on perplexity; GPTQ-measured ones beat it clearly:
specs/smollm2/methods.yaml);
- ``output_error``: tr(D H D^T), the mean squared output error on the calibration inputs (H = X^T X / n);
- ``kl_estimate``: 0.5 sum_o g_o (D H D^T)_oo with g_o the mean squared gradient of the next-token
  cross-entropy with respect to output o (the empirical Fisher of the outputs, diagonal, with the
  Kronecker (K-FAC) approximation that inputs and output gradients are independent): a second-order
  estimate of the KL increase, in nats per token, when only that layer is quantized. Unlike the
  output error it knows how much the rest of the network amplifies or ignores an error in this layer.
benchmarks/bench_sensitivity.py measures both against the true single-layer KL increase on MiniGPT.

The problem is a multiple-choice knapsack: layer i takes exactly one candidate j, costing c_ij bytes
and an estimated loss l_ij (a measured sensitivity, e.g. the output error or KL increase when only that
layer is quantized with candidate j); minimise sum l_ij subject to sum c_ij <= budget. The losses are
assumed additive across layers, the usual first-order assumption (HAWQ, GPTQModel's dynamic configs).

Solver: an exact dynamic programme over layers on a byte grid. Costs are first taken relative to each
layer's cheapest candidate (the all-cheapest assignment is the origin, so the grid only spans the
budget's slack above it), then expressed in units of the grid step: the greatest common divisor of all
those extra costs when that gives at most ``max_cells`` cells, in which case the solution is exactly
optimal; otherwise the smallest multiple of it that fits, with every extra cost rounded *up*, so the
budget is never exceeded and the result is optimal for the rounded costs (within a
n_layers x step bytes of slack of the true optimum). A Lagrangian sweep would be faster but only finds
assignments on the convex hull of the (bytes, loss) trade-off, and can miss the best one under a given
budget by a whole layer's upgrade; with a few hundred layers and three candidates the DP takes well
under a second, so exactness is affordable.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import reduce
from typing import Optional, Sequence, Union

import numpy as np
import torch

MAX_CELLS = 1 << 17
_UNITS = {"bytes": 1, "B": 1, "kB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(bits_per_weight|bytes|B|kB|MB|GB)?\s*$")


@dataclass(frozen=True)
class Budget:
    """A byte budget for the quantized Linear weights: either bits per weight (8 x bytes / parameters, the
    ``bits_per_weight`` of results) or a number of bytes. Exactly one is set."""

    bits_per_weight: Optional[float] = None
    nbytes: Optional[int] = None

    def __post_init__(self):
        if (self.bits_per_weight is None) == (self.nbytes is None):
            raise ValueError("a budget is either bits_per_weight or bytes, exactly one of them")
        value = self.bits_per_weight if self.nbytes is None else self.nbytes
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"a budget must be a positive number, got {value!r}")

    def bytes_for(self, n_params: int) -> int:
        """The budget in bytes for ``n_params`` Linear weights (rounded down: never above the budget)."""
        if self.nbytes is not None:
            return int(self.nbytes)
        return math.floor(self.bits_per_weight * n_params / 8)

    def describe(self) -> str:
        return f"{self.bits_per_weight:g} bits_per_weight" if self.nbytes is None else f"{self.nbytes} bytes"


def parse_budget(value: Union[str, int, float]) -> Budget:
    """``"4.25 bits_per_weight"``, ``"12 MB"`` (SI units: kB, MB, GB), ``"1000 bytes"`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"budget must be like '4.25 bits_per_weight' or '12 MB', got {value!r}")
    if isinstance(value, (int, float)):
        if not float(value).is_integer():
            raise ValueError(f"a budget in bytes must be a whole number, got {value!r}; for bits per weight "
                             f"write '{value} bits_per_weight'")
        return Budget(nbytes=int(value))
    match = _BUDGET.match(str(value))
    if not match:
        raise ValueError(f"budget must be like '4.25 bits_per_weight', '12 MB' or '1000000 bytes', got {value!r}")
    number, unit = float(match.group(1)), match.group(2) or "bytes"
    if unit == "bits_per_weight":
        return Budget(bits_per_weight=number)
    return Budget(nbytes=int(number * _UNITS[unit]))


@dataclass(frozen=True)
class Assignment:
    """The solver's answer: ``choice[i]`` is the candidate index of layer i."""

    choice: tuple
    loss: float       # sum of the chosen estimated losses
    nbytes: int       # sum of the chosen costs (true bytes, not grid cells)
    budget: int
    exact: bool       # the grid step divided every extra cost: the optimum, not a rounded-cost optimum


class InfeasibleBudget(ValueError):
    """Even the cheapest candidate of every layer exceeds the budget."""


def solve(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int, *,
          max_cells: int = MAX_CELLS) -> Assignment:
    """Choose one candidate per layer (row) minimising total loss with total cost <= budget.
    ``costs`` are non-negative integers (bytes); ``losses`` finite floats of the same shape."""
    c, l = _validate(costs, losses, budget, max_cells)
    cheapest = c.min(axis=1)
    base = int(cheapest.sum())
    if base > budget:
        raise InfeasibleBudget(f"the budget is {budget} bytes but the cheapest candidate of every layer together "
                               f"needs {base} bytes; raise the budget or add a cheaper candidate")
    extra = c - cheapest[:, None]
    slack = budget - base
    nonzero = [int(e) for e in extra.flat if e > 0]
    step = reduce(math.gcd, nonzero, 0) or 1
    exact = slack // step <= max_cells
    if not exact:
        step *= math.ceil((slack // step) / max_cells)
    cells = -(-extra // step)                      # ceil: a rounded cost never understates bytes
    width = slack // step
    n_layers = c.shape[0]
    # best[k]: the least loss of the layers so far using at most k cells of slack.
    best = np.zeros(width + 1)
    picks = np.empty((n_layers, width + 1), dtype=np.int16)
    for i in range(n_layers):
        new = np.full(width + 1, np.inf)
        for j in range(c.shape[1]):
            w = int(cells[i, j])
            if w > width:
                continue
            candidate = np.full(width + 1, np.inf)
            candidate[w:] = best[:width + 1 - w] + l[i, j]
            better = candidate < new
            new[better] = candidate[better]
            picks[i, better] = j
        best = new
    # Walk back from the full slack.
    k, choice = width, []
    for i in reversed(range(n_layers)):
        j = int(picks[i, k])
        choice.append(j)
        k -= int(cells[i, j])
    choice.reverse()
    total_bytes = int(sum(c[i, j] for i, j in enumerate(choice)))
    total_loss = float(sum(l[i, j] for i, j in enumerate(choice)))
    return Assignment(tuple(choice), total_loss, total_bytes, int(budget), bool(exact))


def assign(layers: dict, budget: int, *, max_cells: int = MAX_CELLS) -> tuple:
    """Names in, names out: ``layers`` is {layer: {candidate: (bytes, loss)}}, every layer with the same
    candidates. Returns ({layer: candidate}, Assignment)."""
    if not layers:
        raise ValueError("no layers to assign")
    names = list(layers)
    candidates = list(layers[names[0]])
    for name in names:
        if list(layers[name]) != candidates:
            raise ValueError(f"layer {name!r} has candidates {list(layers[name])}, expected {candidates}")
    costs = [[layers[n][k][0] for k in candidates] for n in names]
    losses = [[layers[n][k][1] for k in candidates] for n in names]
    result = solve(costs, losses, budget, max_cells=max_cells)
    return {n: candidates[j] for n, j in zip(names, result.choice)}, result


def _validate(costs, losses, budget, max_cells):
    c = np.asarray(costs, dtype=np.int64) if len(costs) else np.zeros((0, 0), dtype=np.int64)
    l = np.asarray(losses, dtype=np.float64) if len(losses) else np.zeros((0, 0))
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError("costs must be a non-empty (layers x candidates) table of byte counts")
    if l.shape != c.shape:
        raise ValueError(f"losses must have the shape of costs {c.shape}, got {l.shape}")
    if c.shape[1] > np.iinfo(np.int16).max:
        raise ValueError("at most 32767 candidates per layer")
    if (c < 0).any():
        raise ValueError("costs must be non-negative byte counts")
    if not np.isfinite(l).all():
        raise ValueError("losses must be finite (a NaN sensitivity cannot be ranked: measure it again)")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget must be a non-negative integer number of bytes, got {budget!r}")
    if not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError(f"max_cells must be a positive integer, got {max_cells!r}")
    return c, l


# ----------------------------------------------------------------------------------------------
# Sensitivity


PROXIES = ("kl_estimate", "output_error")


def candidate_costs(shapes: dict, candidates: dict) -> dict:
    """{layer: {candidate: deployable bytes}} for Linear shapes {layer: (out, in)} and candidate
    schemes {name: Scheme}: QTensor.nbytes in closed form (natural column order)."""
    from quantlab.quant import expected_nbytes

    return {layer: {name: expected_nbytes(out, inp, scheme) for name, scheme in candidates.items()}
            for layer, (out, inp) in shapes.items()}


def sensitivity_statistics(model, calibration: torch.Tensor, batch_size: int = 8) -> dict:
    """{Linear name: (H (in, in), g (out,))} of the float ``model`` (a LanguageModel, unchanged) over the
    calibration windows (n, T): the input Hessian X^T X / n and the mean squared gradient of the mean
    next-token cross-entropy with respect to each output, scaled per token (n x dL/dy). Linears that read
    the same input (q/k/v, gate/up) share one H tensor.

    A model that names its head (``head_names``: MiniGPT's and a transformers model's final norm and LM
    head) is differentiated a block at a time, with each block's forward recomputed (activation
    checkpointing): a whole-model backward holds every block's saved activations and the batch's
    vocabulary-wide logits at once, which on SmolLM2 (4 x 512 windows) set a spec run's peak at 7.8 GB.
    Other models take one whole-model backward per batch."""
    module = model.module
    names = model.all_linear_names()
    linears = {name: module.get_submodule(name) for name in names}
    sums = {name: [None, None] for name in names}
    blockwise = bool(model.head_names)
    n_tokens = 0
    handles = []
    # The input the last Linear read and its H sum: Linears that read the same tensor one after the other
    # (q/k/v, gate/up) share that one sum, computed and held once rather than once per Linear.
    last = {"input": None, "sum": None}

    def capture(name):
        def hook(mod, args, output):
            # Block by block, a block runs twice per batch: H from the first (no gradient) run, the
            # output gradient from the recomputation.
            if not (blockwise and output.requires_grad):
                if args[0] is last["input"] and (sums[name][0] is None or sums[name][0] is last["sum"]):
                    sums[name][0] = last["sum"]
                else:
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                    H = x.t() @ x
                    # Added in place (the same rounding as sums + H): a new sum per Linear per batch left
                    # the freed ones scattered through the heap, and the resident set grew with them.
                    sums[name][0] = H if sums[name][0] is None else sums[name][0].add_(H)
                    last.update(input=args[0], sum=sums[name][0])
            if output.requires_grad:
                def grad_hook(grad):
                    g = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float32).square().sum(dim=0)
                    sums[name][1] = g if sums[name][1] is None else sums[name][1].add_(g)
                output.register_hook(grad_hook)
        return hook

    def inputs_require_grad(block, args, kwargs):
        # Gradients flow from block 0's input on: no parameter needs one, so none is computed.
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    requires = {p: p.requires_grad for p in module.parameters()}
    for name, linear in linears.items():
        handles.append(linear.register_forward_hook(capture(name)))
    if not blockwise:
        handles.append(model.blocks[0].register_forward_pre_hook(inputs_require_grad, with_kwargs=True))
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        for batch in calibration.split(batch_size):
            if blockwise:
                _backward_block_by_block(model, batch)
            else:
                with torch.enable_grad():
                    logits = model.logits(batch)
                    targets = batch[:, 1:].reshape(-1).to(logits.device)
                    # Summed over tokens: each token's gradient enters unscaled, so g is per token.
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                             targets, reduction="sum")
                    loss.backward()
            n_tokens += batch[:, 1:].numel()
    finally:
        last.clear()
        for h in handles:
            h.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
    inputs_per_window = calibration.shape[1]   # the Hessian sees every position, the loss all but the last
    n_inputs = calibration.shape[0] * inputs_per_window
    # Each sum becomes its mean in place, once however many Linears share it: a divided copy of every
    # Hessian would hold them all twice at the end.
    measured = {name: (H, g) for name, (H, g) in sums.items() if H is not None and g is not None}
    for H in {id(H): H for H, _ in measured.values()}.values():
        H.div_(n_inputs)
    return {name: (H, g / n_tokens) for name, (H, g) in measured.items()}


def _backward_block_by_block(model, batch: torch.Tensor) -> None:
    """The summed next-token cross-entropy of ``batch`` differentiated back to block 0's input, one
    block's autograd graph at a time: a forward pass without gradients keeps each block's input, the
    head's gradient is taken on windows_per_chunk windows at a time, then each block, last first, is
    recomputed from its input and differentiated (its Linears' hooks see their output gradients)."""
    from quantlab.evaluate import windows_per_chunk
    from quantlab.paused import return_free_memory

    with torch.no_grad():
        hidden, kwargs = model.block_inputs(batch)
        inputs = []
        for b in range(len(model.blocks)):
            inputs.append(hidden)
            hidden = model.run_block(b, hidden, kwargs)
    targets = batch[:, 1:].to(hidden.device)
    chunk = windows_per_chunk(batch.shape[1], model.vocab_size)
    grads = []
    for i in range(0, len(batch), chunk):
        part = hidden[i:i + chunk].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.head(part)
            # Summed over tokens: each token's gradient enters unscaled, so g is per token.
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     targets[i:i + chunk].reshape(-1), reduction="sum")
            loss.backward()
        grads.append(part.grad)
        del logits, loss
        return_free_memory()
    grad = torch.cat(grads)
    for b in reversed(range(len(model.blocks))):
        x = inputs.pop().detach().requires_grad_(True)
        with torch.enable_grad():
            out = model.run_block(b, x, kwargs)
            out.backward(grad)
        grad = x.grad
        del out, x
        # Each graph's freed activations go back to the system before the next block's: without it
        # the resident set grew by about a graph's worth per block (SmolLM2: 1.7 -> 2.6 GB a batch).
        return_free_memory()


def layer_sensitivity(model, calibration: torch.Tensor, candidates: dict, *, batch_size: int = 8,
                      solver: Optional[dict] = None) -> dict:
    """{layer: {candidate: {"output_error": ..., "kl_estimate": ...}}} for every block Linear of the float
    ``model`` and every candidate Scheme in ``candidates`` {name: Scheme} (module docstring). The error D is
    round-to-nearest's, or with ``solver`` (quantlab.gptq.gptq_quantize's options: damp, block_size,
    act_order, static_groups) GPTQ's against the layer's float-model H."""
    from quantlab.gptq import gptq_quantize
    from quantlab.quant import quantize_rtn

    def quantized(W, H, scheme):
        if solver is None:
            return quantize_rtn(W, scheme).dequantize()
        return gptq_quantize(W, H, scheme, **solver).qtensor.dequantize()

    statistics = sensitivity_statistics(model, calibration, batch_size)
    out = {}
    for name in model.all_linear_names():
        if name not in statistics:
            continue
        H, g = statistics[name]
        W = model.module.get_submodule(name).weight.detach().to(torch.float32).cpu()
        H, g = H.cpu(), g.cpu()
        out[name] = {}
        for cname, scheme in candidates.items():
            D = W - quantized(W, H, scheme)
            per_output = ((D @ H) * D).sum(dim=1)    # (out,): (D H D^T)_oo
            out[name][cname] = {"output_error": float(per_output.sum()),
                                "kl_estimate": 0.5 * float((g * per_output).sum())}
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks, tied values sharing their mean rank."""
    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=np.float64)
        for v in np.unique(values):
            tied = values == v
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------------------------
# The mixed scheme: candidates, budget, proxy; and choosing each layer's candidate


_CANDIDATE = re.compile(r"^int([2-8])-(?:g([1-9][0-9]*)|per-(channel|tensor))$")


def candidate_scheme(name: str):
    """The integer Scheme a candidate name stands for: a preset of quantlab.quant.PRESETS, or
    ``int<bits>-g<group_size>``, ``int<bits>-per-channel``, ``int<bits>-per-tensor`` (symmetric, restricted grid)."""
    from quantlab.quant import PRESETS, Scheme

    if name in PRESETS and isinstance(PRESETS[name], Scheme):
        return PRESETS[name]
    match = _CANDIDATE.match(str(name))
    if not match:
        raise ValueError(f"unknown candidate {name!r}: write int<bits>-g<group size> (int3-g64), int<bits>-per-channel "
                         "or int<bits>-per-tensor, bits 2..8")
    bits, group, where = int(match.group(1)), match.group(2), match.group(3)
    if group:
        return Scheme(bits, group_size=int(group))
    return Scheme(bits, granularity=where)


@dataclass(frozen=True)
class MixedScheme:
    """One candidate scheme per block Linear, chosen under ``budget`` to minimise the summed ``proxy``
    sensitivity (module docstring). What calibrate.quantize_model takes in place of one Scheme."""

    candidates: tuple
    budget: Budget
    proxy: str = "kl_estimate"

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.candidates:
            raise ValueError("a mixed scheme needs candidates, e.g. [int3-g64, int4-g64, int8-per-channel]")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"mixed candidates repeat a name: {list(self.candidates)}")
        for name in self.candidates:
            candidate_scheme(name)
        if not isinstance(self.budget, Budget):
            raise ValueError(f"budget must be a quantlab.mixed.Budget (parse_budget('4.25 bits_per_weight')), got {self.budget!r}")
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy must be one of {', '.join(PROXIES)}, got {self.proxy!r}")

    def schemes(self) -> dict:
        return {name: candidate_scheme(name) for name in self.candidates}

    def describe(self) -> str:
        return f"mixed {{{', '.join(self.candidates)}}} within {self.budget.describe()}, by {self.proxy}"


@dataclass
class MixedPlan:
    """Each layer's chosen candidate, and what the choice was made from."""

    chosen: dict          # layer -> candidate name
    schemes: dict         # layer -> Scheme
    sensitivity: dict     # layer -> {candidate: proxy value}
    costs: dict           # layer -> {candidate: bytes}
    assignment: Assignment


def plan_mixed(model, calibration: torch.Tensor, mixed: MixedScheme, *, batch_size: int = 8,
               solver: Optional[dict] = None) -> MixedPlan:
    """Measure every block Linear's sensitivity to every candidate on the float ``model`` and solve the
    knapsack under the budget (bits_per_weight over the block Linears, as results' ``bits_per_weight``).
    ``solver``: GPTQ's options when the scheme is quantized with GPTQ, so the sensitivities are of GPTQ's
    error (layer_sensitivity); None for round-to-nearest."""
    candidates = mixed.schemes()
    shapes = {name: tuple(model.module.get_submodule(name).weight.shape) for name in model.all_linear_names()}
    costs = candidate_costs(shapes, candidates)
    measured = layer_sensitivity(model, calibration, candidates, batch_size=batch_size, solver=solver)
    missing = [name for name in shapes if name not in measured]
    if missing:
        raise ValueError(f"no calibration input reached {missing[0]} (and {len(missing) - 1} more), so its sensitivity "
                         "is unknown; give more calibration windows")
    sensitivity = {name: {c: measured[name][c][mixed.proxy] for c in candidates} for name in shapes}
    budget = mixed.budget.bytes_for(sum(out * inp for out, inp in shapes.values()))
    try:
        chosen, assignment = assign({n: {c: (costs[n][c], sensitivity[n][c]) for c in candidates} for n in shapes},
                                    budget)
    except InfeasibleBudget as error:
        raise InfeasibleBudget(f"mixed {mixed.budget.describe()}: {error}") from None
    return MixedPlan(chosen, {n: candidates[c] for n, c in chosen.items()}, sensitivity, costs, assignment)
