"""The byte accountant: what a quantized model occupies when deployed, and which float modules are
stored (and therefore evaluated) in float16.

One function, ``deployable_bytes``, answers "how big is this model" for every scheme, and
``kept_module_values`` makes the evaluated model the deployed one, from the same rule
(``float_element_bytes``): quantized Linears at their packed size (codes + scales + zeros + g_idx,
``QTensor.nbytes``); under a float scheme every parameter at that dtype; under an integer scheme the
module kinds in the spec's ``keep`` (embeddings, lm_head, norms) and Linear biases in float16, and the
kinds left out of ``keep`` in float32. Tied parameters are counted once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from quantlab.quant import FloatScheme

# The float module kinds a spec's `keep` names (stored in float16 under an integer scheme).
KEEP_KINDS = ("embeddings", "lm_head", "norms")


def module_kind(module: nn.Module, name: str, block_prefixes) -> Optional[str]:
    """'embeddings', 'norms' or 'lm_head' for the float modules a spec's `keep` talks about."""
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if "norm" in type(module).__name__.lower():
        return "norms"
    if isinstance(module, nn.Linear) and not any(name.startswith(p + ".") for p in block_prefixes):
        return "lm_head"
    return None


def float_element_bytes(model, keep, scheme) -> dict:
    """id(parameter) -> bytes per element for every parameter that is not a quantized Linear weight:
    4 under a float32 scheme, 2 under float16/bfloat16; otherwise 2 for the `keep` kinds and Linear
    biases, 4 for kinds left out of `keep` (a spec that drops lm_head from keep keeps it in float32)."""
    if isinstance(scheme, FloatScheme):
        size = 4 if scheme.dtype == "float32" else 2
        return {id(p): size for p in model.module.parameters()}
    prefixes = [model.block_prefix(i) for i in range(len(model.blocks))]
    sizes = {}
    for name, module in model.module.named_modules():
        kind = module_kind(module, name, prefixes)
        for p in module.parameters(recurse=False):
            sizes.setdefault(id(p), 2 if kind is None or kind in keep else 4)
    return sizes


def kept_module_values(model, quantized_linears, keep, select=None) -> dict:
    """The float parameters stored in float16 (see float_element_bytes), by parameter name, as float16
    tensors: what the deployed model holds, so that it is the one evaluated. The model is not changed.
    ``select`` (parameter name -> bool): only those parameters (an offloaded model's resident ones)."""
    sizes = float_element_bytes(model, keep, None)
    quantized = {id(model.module.get_submodule(n).weight) for n in quantized_linears}
    return {name: p.detach().to(torch.float16) for name, p in model.module.named_parameters()
            if (select is None or select(name))
            and id(p) not in quantized and sizes.get(id(p)) == 2 and p.dtype != torch.float16}


def deployable_bytes(model, qtensors: dict, scheme, keep, linear_nbytes: Optional[dict] = None,
                     input_scales: Optional[dict] = None) -> dict:
    """bytes_total, bytes_linear, bits_per_weight, params_linear, params_total of ``model`` (a
    LanguageModel) whose block Linears named in ``qtensors`` are stored as those QTensors.
    ``linear_nbytes`` (name -> bytes) overrides ``QTensor.nbytes`` where a file stores a Linear in
    another layout (an imported checkpoint's own int32 packing, say). ``input_scales`` (name -> AWQ's
    float16 input scale s) adds each distinct scale once, at 2 bytes per input feature, to the Linears'
    bytes: quantlab stores s beside the codes (Q(W s) / s), not folded into a preceding norm."""
    linear_nbytes = linear_nbytes or {}
    module = model.module
    sizes = float_element_bytes(model, keep, scheme)
    seen, bytes_linear, params_linear, bytes_other, params_other = set(), 0, 0, 0, 0
    for name in model.all_linear_names():
        weight = module.get_submodule(name).weight
        seen.add(id(weight))
        params_linear += weight.numel()
        qtensor = qtensors.get(name)
        if name in linear_nbytes:
            bytes_linear += int(linear_nbytes[name])
        else:
            bytes_linear += qtensor.nbytes if qtensor is not None else weight.numel() * sizes[id(weight)]
    # One scale per input group: the Linears of a group hold the same tensor.
    distinct_scales = {id(s): s for s in (input_scales or {}).values()}
    bytes_linear += sum(2 * s.numel() for s in distinct_scales.values())
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            bytes_other += p.numel() * sizes.get(id(p), 2)
            params_other += p.numel()
    return {"bytes_linear": bytes_linear, "bytes_total": bytes_linear + bytes_other,
            "bits_per_weight": 8 * bytes_linear / params_linear if params_linear else None,
            "params_linear": params_linear, "params_total": params_linear + params_other}
