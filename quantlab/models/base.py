"""The one interface calibration and evaluation use for every model kind.

A ``LanguageModel`` wraps a torch causal LM and its tokenizer. Subclasses (MiniGPT, Hugging Face)
provide ``module``, ``blocks``, ``logits`` and ``encode``; everything generic lives here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are known: the rest of the model is skipped."""


@dataclass
class LanguageModel:
    name: str
    module: nn.Module          # the torch model (eval mode)
    blocks: nn.ModuleList      # decoder blocks, in execution order
    vocab_size: int
    max_seq_len: int
    tokenizer: dict = field(default_factory=dict)  # how text becomes tokens: for the fingerprint
    source: dict = field(default_factory=dict)     # where the weights came from (path, sha256, notes)

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

    def block_prefix(self, block_index: int) -> str:
        block = self.blocks[block_index]
        for name, m in self.module.named_modules():
            if m is block:
                return name
        raise LookupError(f"block {block_index} is not a submodule of {self.name}")

    def block_inputs(self, tokens: torch.Tensor):
        """Run the model up to block 0 and return what block 0 receives: (hidden (B, T, C), kwargs).
        kwargs (attention masks, rotary embeddings, ...) are reused for every block."""
        captured = {}

        def hook(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.logits(tokens)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["hidden"], captured["kwargs"]

    def run_block(self, block_index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.blocks[block_index](hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def weights_sha256(self) -> str:
        """Checksum of the float weights (what results are keyed on)."""
        h = hashlib.sha256()
        for name, t in sorted(self.module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return h.hexdigest()
