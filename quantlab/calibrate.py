"""Quantize a whole model: capture each layer's inputs, accumulate its Hessian, quantize block by block.

The pipeline follows the reference GPTQ code's ``opt_sequential``:

1. Run the calibration tokens through the model once and keep what block 0 receives (one block's
   activations for the whole calibration set is all that is ever held), and the keyword arguments
   (masks, rotary embeddings) the model gives each block: sliding-window and global layers differ.
2. In each block, the Linears that read the same input tensor form a group (q/k/v, or up/gate). Groups
   are quantized in execution order, and each group's Hessian H = X^T X / n is collected with the
   earlier groups already quantized ("true-sequential"), so a layer learns to compensate for the
   error the layers before it make. A Linear called more than once in a block (shared weights) gets
   every call's inputs in its one Hessian and is quantized once.
3. The block's outputs, computed with its quantized weights, are the next block's inputs.

Steps 2 and 3 are one pass: each calibration batch runs through the block once, on a thread of its
own that pauses at each group's input until that group is quantized (``PausedRun``), so every Linear
runs once per batch with its final weights (benchmarks/bench_calibrate.py counts the passes). Blocks
that call a Linear more than once per run fall back to rerunning the block up to each group.

The result is not a copy of the model: ``QuantizedModel`` keeps the quantized weights (QTensors, and
float16 values for the kept modules) beside the float model, and its ``model`` computes with them
swapped in around each call (quantlab.swap). While a block is being quantized its Linears hold their
quantized weights in the float model itself, and get their float weights back when the block is done.

RTN goes through the same pipeline, so when calibration tokens are given its per-layer losses are
measured on the same Hessians as GPTQ's: the two are compared like for like.

(Past 400 lines: the result type, the input statistics, the grouping of Linears by shared input, the
block loop and the per-group step (with AWQ and mixed precision) are the steps above and read best in
order, in one place; the threads are quantlab/paused.py's and the weight swapping quantlab/swap.py's.)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from quantlab.gptq import GPTQResult, all_finite, condition_number, gptq_quantize, gptq_quantize_shared, relative_loss
from quantlab.models.base import LanguageModel
from quantlab.accounting import KEEP_KINDS, deployable_bytes, kept_module_values
from quantlab.awq import awq_search, scaled_hessian
from quantlab.mixed import MixedScheme, plan_mixed
from quantlab.quant import FLOAT_DTYPES, FloatScheme, QTensor, Scheme, quantize_rtn, scale_shrinks, shrink_counts
from quantlab.offload import TensorStore, offload_of, resident
from quantlab.paused import Batch, PausedRun, RetainedMemory, return_free_memory
from quantlab.swap import SwappedModel, Values, materialize

# How a scheme's values are chosen: a float scheme is a cast ("float"); an integer scheme's codes come
# from round-to-nearest, the GPTQ solver, or round-to-nearest after AWQ's scale search ("awq"; GPTQ after
# it is method "gptq" with awq=True). The spec's `method` key takes exactly these names.
METHODS = ("float", "rtn", "gptq", "awq")
# Every layer reports all of these (None when not measured); heldout_rel_loss only with held-out tokens.
# awq_alpha, awq_group: AWQ's chosen exponent and the input group sharing it; bits, scheme, sensitivity: a
# mixed scheme's choice for the layer; weight_rel_error: ||W - W_hat||^2 / ||W||^2, measured without calibration
# too; shrink_mean and shrink_counts (scale_search 'mse' only): the shrink factors the search chose.
LAYER_STATISTICS = ("rel_loss", "rtn_rel_loss", "damp", "seconds", "h_cond", "h_diag_spread", "input_absmax",
                    "outlier_ratio", "n_tokens", "awq_alpha", "awq_group", "bits", "scheme", "sensitivity",
                    "weight_rel_error")


def dequantized_weight(qtensor: QTensor, input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The weight a quantized Linear computes with: its codes dequantized, divided by its AWQ input
    scale s (float16; None without AWQ)."""
    W = qtensor.dequantize()
    return W if input_scale is None else W / input_scale.to(torch.float32)


@dataclass
class QuantizedModel:
    """A quantization of a model and what quantizing it measured, beside the float model, not a copy of it.

    base:     the model that was quantized; its parameters are not changed.
    qtensors: the deployable quantized weights, by module name (empty for float schemes).
    replaced: the other parameters the scheme changes, by parameter name, in the dtype they are stored
              in: the kept modules' float16 values under an integer scheme, every parameter under a float
              scheme.
    layers:   per-layer statistics by module name: rel_loss, rtn_rel_loss, heldout_rel_loss (with
              held-out tokens), damp, seconds, h_cond, h_diag_spread, input_absmax, outlier_ratio,
              n_tokens. A statistic that was not measured is None.
    health:   events worth a user's attention: {"layer", "event", "detail"}.
    bytes:    accounting.deployable_bytes of the result: bytes_linear, bytes_total, bits_per_weight,
              params_linear, params_total.
    """

    base: LanguageModel
    scheme: Union[Scheme, FloatScheme]
    method: str
    qtensors: dict = field(default_factory=dict)   # name -> quantlab.quant.QTensor
    replaced: dict = field(default_factory=dict)   # parameter name -> torch.Tensor (its stored dtype)
    layers: dict = field(default_factory=dict)
    health: list = field(default_factory=list)
    seconds: float = 0.0
    bytes: dict = field(default_factory=dict)
    weights_in_base: bool = False   # base already holds these weights (an imported checkpoint's model)
    # AWQ: each Linear's input scale s (float16, shared by its input group): it computes Q(W s) / s, and the
    # deployed model stores s beside the codes (quantlab.accounting counts it).
    input_scales: dict = field(default_factory=dict)
    layer_schemes: dict = field(default_factory=dict)   # a mixed scheme's Scheme per Linear (quantlab.mixed)
    mixed_plan: Optional[object] = None                 # ... and the quantlab.mixed.MixedPlan that chose them
    awq: bool = False                                   # AWQ's scale search runs before each group's codes
    # While a block is quantized, its quantized Linears compute with their new weights in the base model
    # (later groups' inputs need them); their float weights wait here and go back when the block is done.
    _float_weights: dict = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def model(self) -> LanguageModel:
        """The quantized model to evaluate: the float model computing with these weights, swapped in
        around each call (quantlab.swap), so no scheme costs a copy of the model."""
        return self.base if self.weights_in_base else SwappedModel(self.base, self.values())

    def values(self) -> Values:
        """What quantlab.swap swaps in: every quantized Linear's dequantized weight and the replaced
        parameters, on the float parameter's device and in its dtype."""
        # The functions hold the containers, not this object: a QuantizedModel whose ``model`` held
        # functions holding it back would be a reference cycle, and each scheme's codes would stay in
        # memory until Python's cycle collector happened to run (a spec run's RSS grew by a scheme's
        # codes per scheme).
        qtensors, scales = self.qtensors, self.input_scales
        values = {f"{name}.weight": lambda data, name=name: dequantized_weight(qtensors[name], scales.get(name))
                  .to(data.device, data.dtype) for name in self.qtensors}
        values.update({name: lambda data, stored=stored: stored.to(data.device, data.dtype)
                       for name, stored in self.replaced.items()})
        return values

    def dequantized(self, name: str) -> torch.Tensor:
        """The weight Linear ``name`` computes with: its codes dequantized, divided by its AWQ input scale."""
        return dequantized_weight(self.qtensors[name], self.input_scales.get(name))

    def materialize(self) -> LanguageModel:
        """A copy of the model that holds these weights in its own parameters: one model's memory, for
        what reads parameters rather than running the model (exporting a checkpoint)."""
        if self.weights_in_base:
            return self.base
        if offload_of(self.base) is not None:
            raise ValueError(f"{self.base.name} is offloaded (its blocks are read one at a time), so it cannot be "
                             "copied whole with these weights; export it from a model loaded whole (offload: false)")
        model = copy_model(self.base)
        materialize(model.module, self.values())
        return model

    def mean(self, statistic: str = "rel_loss") -> Optional[float]:
        """Mean of a per-layer statistic over the layers that have it (None when none do)."""
        values = [layer[statistic] for layer in self.layers.values() if layer.get(statistic) is not None]
        return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------
# Input statistics


class InputStatistics:
    """Running statistics of the inputs X (tokens, in) one Linear (or a group sharing its input) reads.

    The Hessian is kept as a running mean, H = X^T X / n over every token seen so far, so its scale
    does not grow with the calibration set. Float32, because float64 bought nothing measurable: on the
    trained MiniGPT (INT4 g64, 128 x 256 calibration tokens) it moved per-layer GPTQ rel_loss by under
    1.5%, in both directions (it does flip ~13% of codes from block 1 on: GPTQ amplifies float-level
    differences, so GPTQ golden tolerances come from a measured spread: specs/minigpt/seeds.yaml).
    """

    def __init__(self, in_features: int, device=None):
        self.hessian = torch.zeros(in_features, in_features, device=device)   # (in, in)
        self.channel_absmax = torch.zeros(in_features, device=device)          # (in,)
        self.channel_absmean = torch.zeros(in_features, device=device)         # (in,) mean |x|: AWQ's scale
        self.n_tokens = 0
        self._summary = None                                     # computed once, for every Linear of a group

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)   # (tokens, in)
        total = self.n_tokens + x.shape[0]
        if total == 0:
            return
        self.hessian = torch.addmm(self.hessian, x.t(), x, beta=self.n_tokens / total, alpha=1 / total)
        magnitude = x.abs()
        self.channel_absmax = torch.maximum(self.channel_absmax, magnitude.amax(dim=0))
        self.channel_absmean = self.channel_absmean * (self.n_tokens / total) + magnitude.sum(dim=0) / total
        self.n_tokens = total
        self._summary = None

    def summary(self) -> dict:
        """What the report shows about a layer's inputs: how hard the Hessian is to invert and how
        unevenly the input channels are scaled (outlier_ratio: largest channel absmax / median)."""
        if self._summary is None:
            self._summary = self._summarize()
        return self._summary

    def _summarize(self) -> dict:
        diag = self.hessian.diagonal()
        live = diag[diag > 0]
        median_absmax = float(self.channel_absmax.median())
        return {
            "h_cond": condition_number(self.hessian),
            "h_diag_spread": float(live.max() / live.min()) if live.numel() else None,
            "input_absmax": float(self.channel_absmax.max()),
            "outlier_ratio": float(self.channel_absmax.max()) / median_absmax if median_absmax > 0 else None,
            "n_tokens": self.n_tokens,
        }


# ----------------------------------------------------------------------------------------------
# Running blocks


class _InputsCaptured(Exception):
    """Raised by a capture hook once it has the inputs it needs: the rest of the block is skipped."""




@dataclass(eq=False)   # a group is itself: ``groups.index`` must find this one, not an equal one
class InputGroup:
    """Linears that read the same input tensors, call for call: they share one Hessian.

    names:       the Linears, in call order.
    called_once: each is called at most once per block run, so collecting the group's inputs can stop
                 the run at that call. A Linear called again (shared weights, a recurrent step) needs
                 the whole run: every call's inputs go into its one Hessian, and it is quantized once.
    """

    names: list
    called_once: bool = True


def _input_groups(model: LanguageModel, block_index: int, batches: list) -> list:
    """Block ``block_index``'s Linears as InputGroups, in execution order.

    Found by running the block and comparing input tensors by identity (the hooks hold on to them, so
    no tensor's identity can be reused by another during the run). Batch 0 normally calls every
    Linear; one it does not call (an expert that none of its tokens were routed to) is looked for in
    the following batches, so that it is calibrated on the tokens that do reach it, and its group goes
    in after the groups that ran before it in that batch.
    """
    names = {model.module.get_submodule(name): name for name in model.linear_names(block_index)}
    groups: list = []
    placed: dict = {}   # name -> its InputGroup
    for batch in batches:
        calls = _record_calls(model, block_index, batch, names)
        cursor = -1     # index in ``groups`` of the last group this batch has reached so far
        for members in _same_inputs(calls):
            for name in members:
                if name in placed:
                    placed[name].called_once &= len(calls[name]) == 1
            known = [groups.index(placed[name]) for name in members if name in placed]
            cursor = max([cursor, *known])
            new = [name for name in members if name not in placed]
            if new:
                group = InputGroup(new, called_once=all(len(calls[name]) == 1 for name in new))
                cursor += 1
                groups.insert(cursor, group)
                placed.update(dict.fromkeys(new, group))
        if len(placed) == len(names):
            break
    return groups


def _record_calls(model: LanguageModel, block_index: int, batch: Batch, names: dict) -> dict:
    """{Linear name: [input tensor of each call]} for one run of the block, in first-call order."""
    calls: dict = {}

    def record(module, args):
        calls.setdefault(names[module], []).append(args[0])

    handles = [m.register_forward_pre_hook(record) for m in names]
    try:
        model.run_block(block_index, *batch)
    finally:
        for h in handles:
            h.remove()
    return calls


def _same_inputs(calls: dict) -> list:
    """The Linears of ``calls`` grouped by identical input tensors (identity, call for call), groups
    ordered by their first call."""
    groups: list = []   # [(inputs, [names])]
    for name, inputs in calls.items():
        for group_inputs, members in groups:
            if len(group_inputs) == len(inputs) and all(a is b for a, b in zip(group_inputs, inputs)):
                members.append(name)
                break
        else:
            groups.append((inputs, [name]))
    return [members for _, members in groups]


def _collect_inputs(model: LanguageModel, block_index: int, group: InputGroup, batches: list) -> InputStatistics:
    """Statistics of what the group's Linears read over all ``batches``, every call included. A group
    called once per run stops each run right after that call: nothing later in the block matters."""
    linear = model.module.get_submodule(group.names[0])
    stats = InputStatistics(linear.in_features, linear.weight.device)

    def capture(module, args):
        stats.add(args[0])
        if group.called_once:
            raise _InputsCaptured

    handle = linear.register_forward_pre_hook(capture)
    try:
        for batch in batches:
            try:
                model.run_block(block_index, *batch)
            except _InputsCaptured:
                pass
    finally:
        handle.remove()
    return stats


def _first_block_inputs(model: LanguageModel, tokens: Optional[torch.Tensor], batch_size: int) -> list:
    if tokens is None:
        return []
    return [model.block_inputs(chunk) for chunk in tokens.split(batch_size)]


def _next_block_inputs(model: LanguageModel, block_index: int, batches: list) -> list:
    """Run block ``block_index`` on each batch: its outputs, with the same keyword arguments, are what
    the next block receives."""
    return [(model.run_block(block_index, *batch), batch[1]) for batch in batches]


# ----------------------------------------------------------------------------------------------
# The pipeline


def quantize_model(model: LanguageModel, scheme: Union[Scheme, FloatScheme, MixedScheme], calibration: Optional[torch.Tensor],
                   *, method: Optional[str] = None, damp: float = 0.01, block_size: int = 128,
                   act_order: bool = False, static_groups: bool = False, batch_size: int = 8,
                   heldout: Optional[torch.Tensor] = None, keep=KEEP_KINDS, progress: bool = False,
                   awq: bool = False) -> QuantizedModel:
    """Quantize every block Linear of ``model`` (``model.all_linear_names()``); the input model is untouched.

    ``method`` is one of METHODS: "float" for a FloatScheme (the default there), "rtn" (the default for
    an integer Scheme) or "gptq". ``calibration`` and ``heldout`` are token windows (n, T). GPTQ needs
    calibration; without it every layer falls back to RTN with a "no_calibration_tokens" health event.
    Under an integer scheme the float module kinds in ``keep`` (embeddings, lm_head, norms) are stored,
    and so rounded, in float16, the others stay float32; ``bytes`` is what the result occupies deployed
    (quantlab.accounting).

    AWQ: ``method="awq"`` (round-to-nearest) or ``awq=True`` with "gptq" searches each input group's scale
    s with quantlab.awq on the group's calibration statistics and quantizes W s (GPTQ against
    diag(1/s) H diag(1/s)); the layer computes Q(W s) / s and its float16 s is counted in ``bytes``. A
    ``MixedScheme`` first measures every Linear's sensitivity on ``calibration`` and chooses each one's
    candidate under the budget (quantlab.mixed.plan_mixed), then quantizes each with its own grid.
    """
    started = time.perf_counter()
    if method is None:
        method = "float" if isinstance(scheme, FloatScheme) else "rtn"
    _validate(model, scheme, calibration, heldout, method, batch_size)
    if awq and method not in ("gptq", "awq"):
        raise ValueError(f"awq=True applies to method 'gptq' (AWQ then GPTQ); for AWQ then round-to-nearest use "
                         f"method 'awq', got method {method!r}")
    quantized = QuantizedModel(base=model, scheme=scheme, method=method, awq=awq or method == "awq")
    offload = offload_of(model)
    if offload is not None:
        _check_offloadable(model, scheme)
        # The codes of a model larger than memory would not fit either: each QTensor goes to a file.
        quantized.qtensors = TensorStore(offload.scratch)
    with torch.no_grad():
        if isinstance(scheme, FloatScheme):
            quantized.replaced = _float_values(model, scheme)
        else:
            if calibration is not None and calibration.shape[0] == 0:
                calibration = None
            if calibration is None or (heldout is not None and heldout.shape[0] == 0):
                heldout = None   # held-out error is measured on the calibration pipeline's Hessians
            solver = dict(damp=damp, block_size=block_size, act_order=act_order, static_groups=static_groups)
            if isinstance(scheme, MixedScheme):
                if calibration is None:
                    raise ValueError(f"{scheme.describe()} measures each layer's sensitivity on calibration windows; "
                                     "give calibration tokens")
                # Sensitivities of the error the method will leave: GPTQ's, with this solver, under GPTQ.
                quantized.mixed_plan = plan_mixed(model, calibration, scheme, batch_size=batch_size,
                                                  solver=solver if method == "gptq" else None)
                quantized.layer_schemes = quantized.mixed_plan.schemes
            _quantize_blocks(quantized, calibration, heldout, solver, batch_size, progress, keep)
            if offload is None:
                quantized.replaced = kept_module_values(model, set(quantized.qtensors), keep)
            else:   # the blocks' kept values were taken while each was resident; now the rest
                with offload.outside_resident():
                    quantized.replaced.update(_kept_values_outside_blocks(model, set(quantized.qtensors), keep))
        quantized.bytes = deployable_bytes(model, quantized.qtensors, scheme, keep, input_scales=quantized.input_scales)
    quantized.seconds = time.perf_counter() - started
    return quantized


def _validate(model, scheme, calibration, heldout, method, batch_size) -> None:
    if not isinstance(model, LanguageModel):
        raise TypeError(f"model must be a quantlab LanguageModel (see quantlab.models), got {type(model).__name__}")
    if not isinstance(scheme, (Scheme, FloatScheme, MixedScheme)):
        raise TypeError(f"scheme must be a quantlab.quant.Scheme, FloatScheme or quantlab.mixed.MixedScheme, got {scheme!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "float" and isinstance(scheme, FloatScheme):
        raise ValueError(f"method {method!r} needs an integer scheme; {scheme.dtype} weights are only cast, "
                         "use method 'float'")
    if method == "float" and not isinstance(scheme, FloatScheme):
        raise ValueError(f"method 'float' needs a float scheme (float32, float16, bfloat16); for {scheme.describe()} "
                         "use method 'rtn' or 'gptq'")
    if isinstance(scheme, (Scheme, MixedScheme)) and (outside := model.weights_outside_linears()):
        # Skipping them would report "INT4" for a model whose experts all stayed float16.
        name, shape = outside[0]
        raise ValueError(f"{name} {shape} is not an nn.Linear weight (mixture-of-experts experts kept as one "
                         f"tensor?), so {scheme.describe()} would leave it and {len(outside) - 1} more unquantized; "
                         "quantlab quantizes nn.Linear layers only: use a model whose block weights are nn.Linear")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for label, tokens in (("calibration", calibration), ("heldout", heldout)):
        if tokens is None:
            continue
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"{label} must be an integer token tensor of shape (n_windows, seq_len), "
                             f"got {type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
        if tokens.shape[1] > model.max_seq_len:
            raise ValueError(f"{label} windows are {tokens.shape[1]} tokens long but {model.name} reads at most "
                             f"{model.max_seq_len}; use a shorter seq_len")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= model.vocab_size):
            raise ValueError(f"{label} token ids must lie in [0, {model.vocab_size}) for {model.name}; "
                             "were they encoded with this model's tokenizer?")


def _check_offloadable(model: LanguageModel, scheme) -> None:
    """Refuse what an offloaded model (quantlab.offload) cannot do without holding every block."""
    if isinstance(scheme, MixedScheme):
        raise ValueError(f"{scheme.describe()} measures every layer's sensitivity on the whole model first; "
                         "an offloaded model quantizes block by block only: load it whole (offload: false)")
    if isinstance(scheme, FloatScheme):
        dtype = FLOAT_DTYPES[scheme.dtype]
        if any(p.dtype != dtype for p in model.module.parameters()):
            raise ValueError(f"{scheme.describe()} would round every parameter of {model.name}, which is offloaded "
                             "(its blocks are read one at a time); use the dtype it is loaded in (float32) for "
                             "the float baseline, or load it whole (offload: false)")


def _block_kept_values(model: LanguageModel, block_index: int, quantized_linears: set, keep) -> dict:
    """kept_module_values of block ``block_index`` alone (an offloaded model's, while it is resident)."""
    prefix = model.block_prefix(block_index) + "."
    # Selected before converting: the other blocks hold placeholders, which a conversion would materialise.
    return kept_module_values(model, quantized_linears, keep, select=lambda name: name.startswith(prefix))


def _kept_values_outside_blocks(model: LanguageModel, quantized_linears: set, keep) -> dict:
    prefixes = tuple(model.block_prefix(b) + "." for b in range(len(model.blocks)))
    return kept_module_values(model, quantized_linears, keep, select=lambda name: not name.startswith(prefixes))


def copy_model(model: LanguageModel) -> LanguageModel:
    """The model with its own copy of the weights; tokenizers and other fields are shared, read-only."""
    memo = {}
    module = copy.deepcopy(model.module, memo)
    # deepcopy's memo maps each original object to its copy: the copied block list is the one inside
    # the copied module, not a second copy of it.
    return dataclasses.replace(model, module=module, blocks=memo[id(model.blocks)])


def _float_values(model: LanguageModel, scheme: FloatScheme) -> dict:
    """A float scheme stores every parameter in its dtype: those that are not already in it, rounded."""
    dtype = FLOAT_DTYPES[scheme.dtype]
    return {name: p.detach().to(dtype) for name, p in model.module.named_parameters() if p.dtype != dtype}


def _quantize_blocks(quantized: QuantizedModel, calibration, heldout, solver: dict, batch_size: int,
                     progress: bool, keep=KEEP_KINDS) -> None:
    model = quantized.base
    calibration_batches = _first_block_inputs(model, calibration, batch_size)
    heldout_batches = _first_block_inputs(model, heldout, batch_size)
    blocks = tqdm(range(len(model.blocks)), desc=f"{quantized.method} {quantized.scheme.describe()}",
                  unit="block", disable=not progress)
    # The block runs' freed memory, handed back once past its budget: one budget for the whole model, so
    # what one block's threads keep counts against the next block's too.
    memory = RetainedMemory()
    for b in blocks:
        # An offloaded model's block is read once for its whole step (quantlab.offload); a no-op otherwise.
        with resident(model, b):
            calibration_batches, heldout_batches = _quantize_block(quantized, b, calibration_batches,
                                                                   heldout_batches, solver, memory)
            if offload_of(model) is not None:
                quantized.replaced.update(_block_kept_values(model, b, set(quantized.qtensors), keep))
    # What the block runs' threads kept of the memory they freed (up to paused.RETAINED_BYTES) goes back
    # to the system once, at the end, rather than to evaluation or the next scheme.
    return_free_memory()


def _quantize_block(quantized: QuantizedModel, b: int, calibration_batches: list, heldout_batches: list,
                    solver: dict, memory: RetainedMemory) -> tuple:
    """Quantize block ``b``'s Linears; returns the next block's (calibration, held-out) inputs."""
    model = quantized.base
    groups = _input_groups(model, b, calibration_batches)
    # Without calibration, every Linear; with it, any the block never called: RTN, and say so.
    # First, so that held-out batches that do reach such a Linear see its final weights.
    grouped = {name for group in groups for name in group.names}
    for name in model.linear_names(b):
        if name not in grouped:
            _quantize_layer(quantized, name, None, None, solver, calibrated=bool(calibration_batches))
    try:
        if all(group.called_once for group in groups):
            return _quantize_block_in_one_pass(quantized, b, groups, calibration_batches, heldout_batches, solver,
                                               memory=memory)
        return _quantize_block_by_reruns(quantized, b, groups, calibration_batches, heldout_batches, solver)
    finally:
        _restore_float_weights(quantized)


def _quantize_block_in_one_pass(quantized: QuantizedModel, block_index: int, groups: list,
                                calibration_batches: list, heldout_batches: list, solver: dict, *,
                                memory: RetainedMemory) -> tuple:
    """Quantize one block's groups in order while every batch runs through the block once.

    Each batch runs on its own thread (a PausedRun) and stops at the first Linear of each group.
    Once every batch has stopped at group g, their inputs there are what group g reads with the groups
    before it already quantized: its Hessian. Group g is quantized, the batches go on to group g + 1,
    and so on; the batches' final outputs are the next block's inputs. So every Linear runs once per
    batch, with its final weights, and the block is generic: only forward pre-hooks, no knowledge of
    what happens between groups. The inputs and Hessians are those of ``_quantize_block_by_reruns``,
    accumulated in the same batch order, so the codes are the same (tests/test_calibrate.py).
    The price is memory: every batch's paused activations are alive at once (about what the group's
    inputs for the whole calibration set take), and the runs' threads keep up to paused.RETAINED_BYTES
    of what they free before it is handed back.
    """
    model = quantized.base
    group_of = {model.module.get_submodule(name): g for g, group in enumerate(groups) for name in group.names}
    runs = [PausedRun(model, block_index, batch, memory) for batch in calibration_batches + heldout_batches]
    calibration_runs, heldout_runs = runs[:len(calibration_batches)], runs[len(calibration_batches):]
    phase = 0   # the group being collected and quantized

    def stop_at_group(module, args):
        run = PausedRun.current()
        g = group_of[module]
        # Another Linear of a group this batch already stopped at reads the same tensor: go on. A group
        # before the current phase (a batch that reaches groups in another order) is already quantized.
        if run is None or g in run.inputs or g < phase:
            return
        run.inputs[g] = args[0]
        run.pause_at(g)

    handles = [module.register_forward_pre_hook(stop_at_group) for module in group_of]
    try:
        for phase, group in enumerate(groups):
            for run in runs:
                run.advance_to(phase)
            first = model.module.get_submodule(group.names[0])
            inputs = _input_statistics(calibration_runs, phase, first.weight)
            heldout_inputs = _input_statistics(heldout_runs, phase, first.weight) if heldout_runs else None
            _quantize_group(quantized, group, inputs, heldout_inputs, solver)
        outputs = [run.finish() for run in runs]
    finally:
        for handle in handles:
            handle.remove()
        for run in runs:
            run.abort()
    next_calibration = [(out, batch[1]) for out, batch in zip(outputs, calibration_batches)]
    next_heldout = [(out, batch[1]) for out, batch in zip(outputs[len(calibration_batches):], heldout_batches)]
    return next_calibration, next_heldout


def _input_statistics(runs: list, group_index: int, weight: torch.Tensor) -> InputStatistics:
    """What the runs that stopped at a group read there (``weight``: the group's first Linear's), added
    in batch order; the inputs are then let go."""
    stats = InputStatistics(weight.shape[1], weight.device)
    for run in runs:
        if group_index in run.inputs:
            stats.add(run.inputs.pop(group_index))
    return stats


def _quantize_block_by_reruns(quantized: QuantizedModel, block_index: int, groups: list,
                              calibration_batches: list, heldout_batches: list, solver: dict) -> tuple:
    """Quantize one block's groups in order, rerunning the block up to each group's input.

    For blocks with a Linear called more than once per run (shared weights): its Hessian needs every
    call's inputs before it is quantized, so the block cannot stop there and go on. Costs about one
    block pass per group, plus one to propagate.
    """
    model = quantized.base
    for group in groups:
        inputs = _collect_inputs(model, block_index, group, calibration_batches)
        heldout_inputs = _collect_inputs(model, block_index, group, heldout_batches) if heldout_batches else None
        _quantize_group(quantized, group, inputs, heldout_inputs, solver)
    return (_next_block_inputs(model, block_index, calibration_batches),
            _next_block_inputs(model, block_index, heldout_batches))


def _quantize_group(quantized: QuantizedModel, group: InputGroup, inputs: InputStatistics,
                    heldout_inputs: Optional[InputStatistics], solver: dict) -> None:
    """Quantize the Linears of one input group; under AWQ, first search the group's shared input scale
    (quantlab.awq) on its calibration statistics. The search's seconds are shared among the group's layers."""
    scale, alpha, search_seconds = None, None, 0.0
    if quantized.awq and inputs.n_tokens and all_finite(inputs.hessian):
        started = time.perf_counter()
        weights = [quantized.base.module.get_submodule(name).weight.detach() for name in group.names]
        result = awq_search(weights, inputs.hessian, inputs.channel_absmean,
                            quantized.layer_schemes.get(group.names[0], quantized.scheme))
        alpha = result.alpha
        # Stored, and so computed with, in float16; alpha = 0 is s = 1: plain RTN/GPTQ, nothing to store.
        scale = result.scales.to(torch.float16) if alpha > 0 else None
        search_seconds = (time.perf_counter() - started) / len(group.names)
    if scale is not None:
        for name in group.names:
            quantized.input_scales[name] = scale
    solved = _solve_group_together(quantized, group, inputs, solver)
    for name in group.names:
        _quantize_layer(quantized, name, inputs, heldout_inputs, solver, calibrated=True, solved=solved.get(name))
        layer = quantized.layers[name]
        if alpha is not None:
            layer["awq_alpha"], layer["awq_group"] = alpha, group.names[0]
            layer["seconds"] = (layer["seconds"] or 0.0) + search_seconds


def _solve_group_together(quantized: QuantizedModel, group: InputGroup, inputs: InputStatistics,
                          solver: dict) -> dict:
    """{name: GPTQResult} of a GPTQ group's Linears from one solve of their stacked rows
    (gptq_quantize_shared: one column loop, and each Linear's codes those of its own solve up to float32
    ties), or {}
    where each Linear solves on its own: one Linear, no calibration tokens, or different schemes."""
    names = group.names
    schemes = [quantized.layer_schemes.get(name, quantized.scheme) for name in names]
    if quantized.method != "gptq" or len(names) < 2 or not inputs.n_tokens or any(s != schemes[0] for s in schemes):
        return {}
    scale = quantized.input_scales.get(names[0])
    weights = [quantized.base.module.get_submodule(name).weight.detach() for name in names]
    H = inputs.hessian
    if scale is not None:   # AWQ: the group's shared input scale, as _quantize_layer applies it
        s = scale.to(torch.float32).to(H.device)
        weights, H = [W.to(torch.float32) * s for W in weights], scaled_hessian(H, s)
    return dict(zip(names, gptq_quantize_shared(weights, H, schemes[0], **solver)))


def _quantize_layer(quantized: QuantizedModel, name: str, inputs: Optional[InputStatistics],
                    heldout_inputs: Optional[InputStatistics], solver: dict, calibrated: bool,
                    solved: Optional[GPTQResult] = None) -> None:
    """Quantize one Linear of the copied model (its weight is overwritten) and record its statistics.
    ``seconds`` is the quantization itself (the GPTQ solve or RTN), not the statistics around it.
    With an AWQ input scale s (``quantized.input_scales``) the codes are those of W s, found against
    diag(1/s) H diag(1/s); the losses are of W_hat = Q(W s) / s against W and H, and ``rtn_rel_loss`` stays
    plain RTN's: AWQ's error before (rtn_rel_loss) and after (rel_loss)."""
    linear = quantized.base.module.get_submodule(name)
    W = linear.weight.detach()
    scheme = quantized.layer_schemes.get(name, quantized.scheme)
    layer = dict.fromkeys(LAYER_STATISTICS)
    if heldout_inputs is not None:
        layer["heldout_rel_loss"] = None
    plan = quantized.mixed_plan
    if plan is not None:
        layer.update(bits=scheme.bits, scheme=plan.chosen[name], sensitivity=dict(plan.sensitivity[name]))

    started = time.perf_counter()
    rtn = quantize_rtn(W, scheme)
    rtn_seconds = time.perf_counter() - started
    scale = quantized.input_scales.get(name)
    if inputs is None or inputs.n_tokens == 0:
        # No Hessian: RTN. Worth an event when calibration was asked for (GPTQ, AWQ) or given.
        qtensor, layer["seconds"] = rtn, rtn_seconds
        quantized.input_scales.pop(name, None)
        if quantized.method in ("gptq", "awq") or calibrated:
            quantized.health.append({"layer": name, "event": "no_calibration_tokens",
                                     "detail": "no calibration tokens reached this layer; used round-to-nearest"})
    else:
        H = inputs.hessian
        layer.update({key: _finite_or_none(value) for key, value in inputs.summary().items()})
        if quantized.method == "rtn" and not all_finite(H):
            quantized.health.append({"layer": name, "event": "nan",
                                     "detail": "this layer's calibration inputs contain NaN or Inf"})
        layer["rtn_rel_loss"] = _finite_or_none(relative_loss(W, rtn.dequantize(), H))
        # AWQ: the problem in the scaled coordinates, W s against the inputs x / s (same output error).
        s = None if scale is None else scale.to(torch.float32).to(W.device)
        W_q = W if s is None else W.to(torch.float32) * s
        if quantized.method == "gptq":
            result = solved or gptq_quantize(W_q, H if s is None else scaled_hessian(H, s), scheme, **solver)
            qtensor, layer["rel_loss"], layer["damp"], layer["seconds"] = (
                result.qtensor, result.rel_loss, result.damp, result.seconds)
            quantized.health += [{"layer": name, **event} for event in result.health]
        elif s is not None:
            started = time.perf_counter()
            qtensor = quantize_rtn(W_q, scheme)
            layer["seconds"] = time.perf_counter() - started
            layer["rel_loss"] = _finite_or_none(relative_loss(W, qtensor.dequantize() / s, H))
        else:
            qtensor, layer["rel_loss"], layer["seconds"] = rtn, layer["rtn_rel_loss"], rtn_seconds
    quantized.qtensors[name] = qtensor
    W_hat = quantized.dequantized(name)     # what the layer computes with: AWQ's input scale undone
    measured = inputs is not None and inputs.n_tokens
    if measured and heldout_inputs is not None and heldout_inputs.n_tokens:
        layer["heldout_rel_loss"] = _finite_or_none(relative_loss(W, W_hat, heldout_inputs.hessian))
    _record_weight_error(layer, W, W_hat, qtensor, quantized.input_scales.get(name))
    # The rest of the block computes with the quantized weight: the float one is put back afterwards.
    quantized._float_weights.setdefault(name, linear.weight.data)
    linear.weight.data = W_hat.to(linear.weight.dtype)
    quantized.layers[name] = layer


def _record_weight_error(layer: dict, W: torch.Tensor, W_hat: torch.Tensor, qtensor,
                         scale: Optional[torch.Tensor]) -> None:
    """The layer's relative weight error ||W - W_hat||^2 / ||W||^2 (W_hat as the layer computes, AWQ's input
    scale undone) and, under scale_search 'mse', the shrink factors chosen for the weights that were
    quantized (W s with AWQ): their mean over groups and their counts per factor (quantlab.quant.scale_shrinks)."""
    W = W.detach().to(torch.float32)
    s = None if scale is None else scale.to(torch.float32).to(W.device)
    norm = float(W.square().sum())
    layer["weight_rel_error"] = _finite_or_none(float((W - W_hat).square().sum()) / norm) if norm > 0 else None
    if qtensor.scheme.scale_search == "mse":
        shrinks = scale_shrinks(W if s is None else W * s, qtensor)
        finite = shrinks[torch.isfinite(shrinks)]
        layer["shrink_mean"] = float(finite.mean()) if finite.numel() else None
        layer["shrink_counts"] = shrink_counts(shrinks)


def _restore_float_weights(quantized: QuantizedModel) -> None:
    """Give the base model back the float weights of the Linears quantized so far (errors included)."""
    for name, weight in quantized._float_weights.items():
        quantized.base.module.get_submodule(name).weight.data = weight
    quantized._float_weights.clear()


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None
