"""A model computing with other values for some of its parameters, swapped in around each call: no model copy.

A quantized model differs from its float model in a few kinds of parameters: the block Linear weights
(held as QTensors, dequantized on demand) and, under some schemes, float parameters rounded through a
smaller dtype. Holding a dequantized copy of the whole model per scheme doubles the memory a run needs;
``SwappedModel`` instead gives the float model those values only while it computes, and only where
it computes:

- a parameter of a module inside a decoder block is swapped in when that module is called and swapped
  back when it returns (blocks call their submodules, so this always takes effect), so at most one
  module's weights exist twice at any time;
- any other parameter (embeddings, the final norm, the head: some models read these directly rather than
  by calling the module) is swapped in for the whole call into the model;
- a pass that runs every batch through one block before the next (quantlab.evaluate's block-major
  evaluation) holds that block's values in for all of its batches (``SwappedModel.holding``), so they
  are computed once per pass rather than once per batch.

Outside a call the float model is exactly as it was, so any number of quantizations of one model can be
evaluated one after another, including a baseline computed between another scheme's batches.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from quantlab.offload import resident

# parameter name (as in module.named_parameters()) -> a function of the float parameter's data giving
# the values to compute with (same shape; the function places them on its device and dtype)
Values = dict[str, Callable[[torch.Tensor], torch.Tensor]]


class SwappedModel:
    """``base`` (a quantlab LanguageModel) computing with ``values`` in place of its parameters'.

    It answers every LanguageModel attribute from ``base``; the entry points that compute
    (``logits``, ``run_block``, ``block_inputs``, and ``head`` where the model has one) swap the values
    in for the duration of the call. Reading ``module``'s parameters outside those calls gives the
    float model's: to hold the quantized weights in a module of its own, use
    ``quantlab.calibrate.QuantizedModel.materialize``.
    """

    def __init__(self, base, values: Values):
        self.base, self.values = base, values
        # Which parameters are swapped where, worked out once: every call (a window batch) reuses it.
        params = dict(base.module.named_parameters())
        unknown = sorted(set(values) - set(params))
        if unknown:
            raise KeyError(f"{base.name} has no parameter {unknown[0]} to swap")
        self._wanted = {id(params[name]): value for name, value in values.items()}
        in_blocks = {id(p) for block in base.blocks for p in block.parameters()}
        # Modules inside blocks that own swapped parameters, block by block: swapped per call of the module.
        self._owners = [[(owner, owned) for owner in block.modules()
                         if (owned := [p for p in owner.parameters(recurse=False) if id(p) in self._wanted])]
                        for block in base.blocks]
        # The rest: swapped for the whole call into the model.
        self._outside = [params[name] for name in values if id(params[name]) not in in_blocks]
        self._held: set[int] = set()   # blocks whose values are in for a while (``holding``)

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._swapped():
            return self.base.logits(tokens)

    def run_block(self, block_index: int, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        # One block computes with its own parameters alone (what else it needs comes in ``kwargs``), so
        # only its modules are swapped: a pass that calls run_block per block then converts the values
        # outside the blocks (the embeddings, the head) once, in block_inputs and head, not per block.
        if block_index in self._held:
            return self.base.run_block(block_index, hidden, kwargs)
        with self._swapped(blocks=[block_index], outside=False):
            return self.base.run_block(block_index, hidden, kwargs)

    def block_inputs(self, tokens: torch.Tensor):
        # No block runs here (LanguageModel.block_inputs stands in for them): only the values outside.
        with self._swapped(blocks=()):
            return self.base.block_inputs(tokens)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._swapped(blocks=()):
            return self.base.head(hidden)

    @contextlib.contextmanager
    def holding(self, block_index: int) -> Iterator[None]:
        """Block ``block_index`` computes with the values for the whole of the context, swapped in once
        (its weights exist twice meanwhile), where each run_block would otherwise swap them in and out:
        for a pass that runs every batch through one block before the next (quantlab.evaluate's
        block-major pass). An offloaded base's block is held in memory too, and read first."""
        owned = [p for _, params in self._owners[block_index] for p in params]
        with resident(self.base, block_index):
            saved = [(p, p.data) for p in owned]
            try:
                for p in owned:
                    p.data = self._wanted[id(p)](p.data)
                self._held.add(block_index)
                yield
            finally:
                self._held.discard(block_index)
                for p, data in saved:
                    p.data = data

    @contextlib.contextmanager
    def _swapped(self, blocks=None, outside: bool = True) -> Iterator[None]:
        """Inside, the base model computes with the values (module docstring: which are swapped per
        module call and which for the whole call): in the blocks ``blocks`` (None: all) and, with
        ``outside``, outside the blocks. Restored on the way out, errors included."""
        if not self.values:
            yield
            return
        saved: dict = {}   # id(parameter) -> (parameter, its float data)

        def swap_in(parameters) -> None:
            for p in parameters:
                if id(p) not in saved:
                    saved[id(p)] = (p, p.data)
                    p.data = self._wanted[id(p)](p.data)

        def swap_out(parameters) -> None:
            for p in parameters:
                if id(p) in saved:
                    p.data = saved.pop(id(p))[1]

        handles = []
        for b in range(len(self._owners)) if blocks is None else blocks:
            for owner, owned in self._owners[b]:
                handles.append(owner.register_forward_pre_hook(lambda m, args, owned=owned: swap_in(owned)))
                handles.append(owner.register_forward_hook(lambda m, args, out, owned=owned: swap_out(owned)))
        try:
            if outside:
                swap_in(self._outside)
            yield
        finally:
            for handle in handles:
                handle.remove()
            swap_out([p for p, _ in list(saved.values())])   # a call that raised leaves its module swapped in


def materialize(module: nn.Module, values: Values) -> None:
    """Write ``values`` into ``module``'s parameters, in place (for a copy that is to hold them)."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].data = value(params[name].data)
