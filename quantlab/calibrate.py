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
3. Run the block again with its quantized weights; its outputs are the next block's inputs.

RTN goes through the same pipeline, so when calibration tokens are given its per-layer losses are
measured on the same Hessians as GPTQ's: the two are compared like for like.

(Just past 400 lines: the input statistics, the grouping of Linears by shared input and the block loop
are the three steps above and read best in order, in one place.)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from quantlab.gptq import all_finite, gptq_quantize, relative_loss, torch_threads
from quantlab.models.base import LanguageModel
from quantlab.accounting import KEEP_KINDS, deployable_bytes, round_kept_modules
from quantlab.quant import FLOAT_DTYPES, FloatScheme, Scheme, quantize_rtn

# How a scheme's values are chosen: a float scheme is a cast ("float"); an integer scheme's codes come
# from round-to-nearest or the GPTQ solver. The spec's `method` key takes exactly these names.
METHODS = ("float", "rtn", "gptq")
# Every layer reports all of these (None when not measured); heldout_rel_loss only with held-out tokens.
LAYER_STATISTICS = ("rel_loss", "rtn_rel_loss", "damp", "seconds", "h_cond", "h_diag_spread", "input_absmax",
                    "outlier_ratio", "n_tokens")


@dataclass
class QuantizedModel:
    """A quantized copy of a model and what quantizing it measured.

    model:    a copy of the input model whose block Linears hold the dequantized weights.
    qtensors: the deployable quantized weights, by module name (empty for float schemes).
    layers:   per-layer statistics by module name: rel_loss, rtn_rel_loss, heldout_rel_loss (with
              held-out tokens), damp, seconds, h_cond, h_diag_spread, input_absmax, outlier_ratio,
              n_tokens. A statistic that was not measured is None.
    health:   events worth a user's attention: {"layer", "event", "detail"}.
    bytes:    accounting.deployable_bytes of the result: bytes_linear, bytes_total, bits_per_weight,
              params_linear, params_total.
    """

    model: LanguageModel
    scheme: Union[Scheme, FloatScheme]
    method: str
    qtensors: dict = field(default_factory=dict)   # name -> quantlab.quant.QTensor
    layers: dict = field(default_factory=dict)
    health: list = field(default_factory=list)
    seconds: float = 0.0
    bytes: dict = field(default_factory=dict)

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

    def __init__(self, in_features: int):
        self.hessian = torch.zeros(in_features, in_features)   # (in, in)
        self.channel_absmax = torch.zeros(in_features)          # (in,)
        self.n_tokens = 0
        self._summary = None                                     # computed once, for every Linear of a group

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)   # (tokens, in)
        total = self.n_tokens + x.shape[0]
        if total == 0:
            return
        self.hessian = torch.addmm(self.hessian, x.t(), x, beta=self.n_tokens / total, alpha=1 / total)
        self.channel_absmax = torch.maximum(self.channel_absmax, x.abs().amax(dim=0))
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


def condition_number(H: torch.Tensor) -> Optional[float]:
    """lambda_max / lambda_min of a symmetric H, in float64. A singular H reports 1 / eps(float64)
    (about 4.5e15) rather than infinity, so results stay JSON numbers; a zero or non-finite H, None."""
    if not all_finite(H):
        return None
    with torch_threads(1):   # an eigendecomposition this small gains nothing from threads that wait on each other
        eigenvalues = torch.linalg.eigvalsh(H.to(torch.float64))
    largest = float(eigenvalues[-1])
    if largest <= 0:
        return None
    return largest / max(float(eigenvalues[0]), largest * torch.finfo(torch.float64).eps)


# ----------------------------------------------------------------------------------------------
# Running blocks


class _InputsCaptured(Exception):
    """Raised by a capture hook once it has the inputs it needs: the rest of the block is skipped."""


Batch = tuple  # (hidden (B, T, C), kwargs): what one block receives for one batch of token windows


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
    stats = InputStatistics(linear.in_features)

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


def quantize_model(model: LanguageModel, scheme: Union[Scheme, FloatScheme], calibration: Optional[torch.Tensor],
                   *, method: Optional[str] = None, damp: float = 0.01, block_size: int = 128,
                   act_order: bool = False, static_groups: bool = False, batch_size: int = 8,
                   heldout: Optional[torch.Tensor] = None, keep=KEEP_KINDS, progress: bool = False) -> QuantizedModel:
    """Quantize every block Linear of ``model`` (``model.all_linear_names()``); the input model is untouched.

    ``method`` is one of METHODS: "float" for a FloatScheme (the default there), "rtn" (the default for
    an integer Scheme) or "gptq". ``calibration`` and ``heldout`` are token windows (n, T). GPTQ needs
    calibration; without it every layer falls back to RTN with a "no_calibration_tokens" health event.
    Under an integer scheme the float module kinds in ``keep`` (embeddings, lm_head, norms) are stored,
    and so rounded, in float16, the others stay float32; ``bytes`` is what the result occupies deployed
    (quantlab.accounting).
    """
    started = time.perf_counter()
    if method is None:
        method = "float" if isinstance(scheme, FloatScheme) else "rtn"
    _validate(model, scheme, calibration, heldout, method, batch_size)
    quantized = QuantizedModel(model=_copy_model(model), scheme=scheme, method=method)
    with torch.no_grad():
        if isinstance(scheme, FloatScheme):
            _round_to_float(quantized, scheme)
        else:
            if calibration is not None and calibration.shape[0] == 0:
                calibration = None
            if calibration is None or (heldout is not None and heldout.shape[0] == 0):
                heldout = None   # held-out error is measured on the calibration pipeline's Hessians
            solver = dict(damp=damp, block_size=block_size, act_order=act_order, static_groups=static_groups)
            _quantize_blocks(quantized, calibration, heldout, solver, batch_size, progress)
            round_kept_modules(quantized.model, set(quantized.qtensors), keep)
        quantized.bytes = deployable_bytes(quantized.model, quantized.qtensors, scheme, keep)
    quantized.seconds = time.perf_counter() - started
    return quantized


def _validate(model, scheme, calibration, heldout, method, batch_size) -> None:
    if not isinstance(model, LanguageModel):
        raise TypeError(f"model must be a quantlab LanguageModel (see quantlab.models), got {type(model).__name__}")
    if not isinstance(scheme, (Scheme, FloatScheme)):
        raise TypeError(f"scheme must be a quantlab.quant.Scheme or FloatScheme, got {scheme!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "float" and isinstance(scheme, FloatScheme):
        raise ValueError(f"method {method!r} needs an integer scheme; {scheme.dtype} weights are only cast, "
                         "use method 'float'")
    if method == "float" and not isinstance(scheme, FloatScheme):
        raise ValueError(f"method 'float' needs a float scheme (float32, float16, bfloat16); for {scheme.describe()} "
                         "use method 'rtn' or 'gptq'")
    if isinstance(scheme, Scheme) and (outside := model.weights_outside_linears()):
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


def _copy_model(model: LanguageModel) -> LanguageModel:
    """The model with its own copy of the weights; tokenizers and other fields are shared, read-only."""
    memo = {}
    module = copy.deepcopy(model.module, memo)
    # deepcopy's memo maps each original object to its copy: the copied block list is the one inside
    # the copied module, not a second copy of it.
    return dataclasses.replace(model, module=module, blocks=memo[id(model.blocks)])


def _round_to_float(quantized: QuantizedModel, scheme: FloatScheme) -> None:
    """A float scheme stores every parameter in its dtype: round them all through it."""
    dtype = FLOAT_DTYPES[scheme.dtype]
    module = quantized.model.module
    for p in module.parameters():
        p.copy_(p.to(dtype).to(p.dtype))


def _quantize_blocks(quantized: QuantizedModel, calibration, heldout, solver: dict, batch_size: int,
                     progress: bool) -> None:
    model = quantized.model
    calibration_batches = _first_block_inputs(model, calibration, batch_size)
    heldout_batches = _first_block_inputs(model, heldout, batch_size)
    blocks = tqdm(range(len(model.blocks)), desc=f"{quantized.method} {quantized.scheme.describe()}",
                  unit="block", disable=not progress)
    for b in blocks:
        groups = _input_groups(model, b, calibration_batches)
        for group in groups:
            inputs = _collect_inputs(model, b, group, calibration_batches)
            heldout_inputs = _collect_inputs(model, b, group, heldout_batches) if heldout_batches else None
            for name in group.names:
                _quantize_layer(quantized, name, inputs, heldout_inputs, solver, calibrated=True)
        # Without calibration, every Linear; with it, any the block never called: RTN, and say so.
        for name in model.linear_names(b):
            if name not in quantized.qtensors:
                _quantize_layer(quantized, name, None, None, solver, calibrated=bool(calibration_batches))
        calibration_batches = _next_block_inputs(model, b, calibration_batches)
        heldout_batches = _next_block_inputs(model, b, heldout_batches)


def _quantize_layer(quantized: QuantizedModel, name: str, inputs: Optional[InputStatistics],
                    heldout_inputs: Optional[InputStatistics], solver: dict, calibrated: bool) -> None:
    """Quantize one Linear of the copied model (its weight is overwritten) and record its statistics.
    ``seconds`` is the quantization itself (the GPTQ solve or RTN), not the statistics around it."""
    linear = quantized.model.module.get_submodule(name)
    W = linear.weight.detach()
    layer = dict.fromkeys(LAYER_STATISTICS)
    if heldout_inputs is not None:
        layer["heldout_rel_loss"] = None

    started = time.perf_counter()
    rtn = quantize_rtn(W, quantized.scheme)
    rtn_seconds = time.perf_counter() - started
    if inputs is None or inputs.n_tokens == 0:
        # No Hessian: RTN. Worth an event when calibration was asked for (GPTQ) or given.
        qtensor, layer["seconds"] = rtn, rtn_seconds
        if quantized.method == "gptq" or calibrated:
            quantized.health.append({"layer": name, "event": "no_calibration_tokens",
                                     "detail": "no calibration tokens reached this layer; used round-to-nearest"})
    else:
        H = inputs.hessian
        layer.update({key: _finite_or_none(value) for key, value in inputs.summary().items()})
        if quantized.method == "rtn" and not all_finite(H):
            quantized.health.append({"layer": name, "event": "nan",
                                     "detail": "this layer's calibration inputs contain NaN or Inf"})
        layer["rtn_rel_loss"] = _finite_or_none(relative_loss(W, rtn.dequantize(), H))
        if quantized.method == "gptq":
            result = gptq_quantize(W, H, quantized.scheme, **solver)
            qtensor, layer["rel_loss"], layer["damp"], layer["seconds"] = (
                result.qtensor, result.rel_loss, result.damp, result.seconds)
            quantized.health += [{"layer": name, **event} for event in result.health]
        else:
            qtensor, layer["rel_loss"], layer["seconds"] = rtn, layer["rtn_rel_loss"], rtn_seconds
        if heldout_inputs is not None and heldout_inputs.n_tokens:
            layer["heldout_rel_loss"] = _finite_or_none(relative_loss(W, qtensor.dequantize(), heldout_inputs.hessian))
    linear.weight.copy_(qtensor.dequantize().to(linear.weight.dtype))
    quantized.qtensors[name] = qtensor
    quantized.layers[name] = layer


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None
