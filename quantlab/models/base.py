"""The one interface calibration and evaluation use for every model kind.

A ``LanguageModel`` wraps a torch causal LM and its tokenizer. Subclasses (MiniGPT, Hugging Face)
provide ``module``, ``blocks``, ``logits`` and ``encode``; everything generic lives here.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn


# max_seq_len of a model with no context limit of its own (ALiBi, as in Bloom): the spec's seq_len
# decides. An int rather than None or inf, so that comparing with it and slicing by it just work.
UNBOUNDED_CONTEXT = sys.maxsize


class _StopForward(Exception):
    """Raised by the capture hook once every block's inputs are known: the rest of the model is skipped."""


@dataclass(frozen=True)
class BlockKwargs:
    """The keyword arguments the model passed to each of its blocks in one forward pass, by block.
    Blocks of one kind share the same tensors, so this costs no more than the distinct masks."""

    by_block: tuple   # (dict, ...), one per block

    def for_block(self, block_index: int) -> dict:
        return self.by_block[block_index]


@dataclass
class LanguageModel:
    name: str
    module: nn.Module          # the torch model (eval mode)
    blocks: nn.ModuleList      # decoder blocks, in execution order
    vocab_size: int
    max_seq_len: int          # longest window the model reads; UNBOUNDED_CONTEXT when it sets no limit
    tokenizer: dict = field(default_factory=dict)  # how text becomes tokens: for the fingerprint
    source: dict = field(default_factory=dict)     # where the weights came from (path, sha256, notes)
    # The modules turning the last block's output into logits, in call order (a final norm, the LM head):
    # with them, ``block_inputs``, ``run_block`` and ``head`` compute what ``logits`` does a piece at a
    # time. Empty when the model does not say: only ``logits`` is then used.
    head_names: tuple = ()

    # --- to provide in subclasses -----------------------------------------------------------
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids -> (B, T, V) float32 next-token logits."""
        raise NotImplementedError

    def encode(self, text: str) -> torch.Tensor:
        """Text -> (N,) int64 token ids (no BOS; evaluation adds nothing either)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    # --- generic ------------------------------------------------------------------------------
    def linear_names(self, block_index: int) -> list[str]:
        """Full module names of block ``block_index``'s Linear layers, in registration order."""
        prefix = self.block_prefix(block_index)
        return [f"{prefix}.{n}" for n, m in self.blocks[block_index].named_modules() if isinstance(m, nn.Linear)]

    def all_linear_names(self) -> list[str]:
        return [n for i in range(len(self.blocks)) for n in self.linear_names(i)]

    def weights_outside_linears(self) -> list[tuple[str, tuple]]:
        """(name, shape) of every block matrix (2-D or more) that no nn.Linear holds, largest first.
        Quantizers see nn.Linear layers only, so these would stay float: e.g. the experts that
        transformers 5 keeps as one (experts, out, in) parameter per projection, and MoE routers."""
        found = []
        for i, block in enumerate(self.blocks):
            prefix = self.block_prefix(i)
            for module_name, module in block.named_modules(prefix=prefix):
                if isinstance(module, nn.Linear):
                    continue
                found += [(f"{module_name}.{name}", tuple(p.shape))
                          for name, p in module.named_parameters(recurse=False) if p.dim() >= 2]
        return sorted(found, key=lambda item: -math.prod(item[1]))   # stable: block order among equals

    def block_prefix(self, block_index: int) -> str:
        block = self.blocks[block_index]
        for name, m in self.module.named_modules():
            if m is block:
                return name
        raise LookupError(f"block {block_index} is not a submodule of {self.name}")

    def block_inputs(self, tokens: torch.Tensor):
        """Run the model over ``tokens`` and return what block 0 receives and what every block is
        given besides: (hidden (B, T, C), BlockKwargs). Each block's own keyword arguments (attention
        masks, rotary embeddings, ...) are recorded because they need not be block 0's: models that
        alternate sliding-window and global layers give each kind its own mask (and Gemma 3 its own
        rotary embeddings).

        No block runs: for the pass each is replaced by a stand-in that records its arguments and hands
        its input on. Models compute these arguments from the tokens before their block loop, not from
        block outputs, so the stand-ins see what the real blocks would, and the pass costs the
        embeddings alone. What flows between stand-ins is never used (a model that takes item 0 of a
        block's output gets a slice of it): the pass stops as the last block is entered."""
        hidden, by_block = [], [None] * len(self.blocks)

        def stand_in(block_index: int):
            def forward(*args, **kwargs):
                received = args[0] if args else kwargs["hidden_states"]
                if block_index == 0:
                    hidden.append(received)
                by_block[block_index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if block_index == len(self.blocks) - 1:
                    raise _StopForward
                return received
            return forward

        for i, block in enumerate(self.blocks):
            block.forward = stand_in(i)   # an instance attribute: shadows the class's forward
        try:
            self.logits(tokens)
        except _StopForward:
            pass
        finally:
            for block in self.blocks:
                del block.forward
        return hidden[0], BlockKwargs(tuple(by_block))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) output of the last block -> (B, T, V) float32 logits, through ``head_names``."""
        if not self.head_names:
            raise NotImplementedError(f"{self.name} does not name its head modules (head_names)")
        for name in self.head_names:
            hidden = self.module.get_submodule(name)(hidden)
        return hidden.float()

    def run_block(self, block_index: int, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        """Block ``block_index`` on ``hidden``, given ``kwargs``: a BlockKwargs (its own arguments
        are picked) or one dict for every block."""
        if isinstance(kwargs, BlockKwargs):
            kwargs = kwargs.for_block(block_index)
        out = self.blocks[block_index](hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out
