"""Hugging Face causal LMs behind the LanguageModel interface (`hf:PATH`; SmolLM2 arrives here via gguf.py).

Nothing here knows a model family by name, so OPT, Llama, Qwen and GPT-2 take the same path:
- the decoder blocks are the ModuleList of same-class layers that holds the most parameters;
- the head (final norm, OPT's project_out, lm_head) is whatever runs between the last block and the
  logits, found once by watching a two-token forward pass;
- GPT-2's Conv1D layers (a Linear with its weight stored transposed) are swapped for nn.Linear at load,
  so every quantizer sees one kind of layer.
Needs the `hf` extra (transformers; gguf + accelerate for GGUF files).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.models.base import UNBOUNDED_CONTEXT, LanguageModel


@dataclass
class HFModel(LanguageModel):
    """A transformers causal LM and its tokenizer. The module is in eval mode with gradients off."""

    hf_tokenizer: Any = None            # the transformers tokenizer; read-only, so copies may share it
    offload: Any = None                 # quantlab.offload.BlockOffload when blocks are read on demand, else None

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        # No KV cache: every call is one full causal pass over the window.
        return self.module(input_ids=tokens, use_cache=False).logits.float()  # (B, T, V)

    def encode(self, text: str) -> torch.Tensor:
        # No BOS/EOS: evaluation windows are cut from one long token stream and must not depend on
        # where a special token happened to land. verbose=False: a corpus is longer than the
        # tokenizer's max length on purpose (it is windowed afterwards), so that warning is noise.
        ids = self.hf_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)  # (N,)

    def decode(self, ids) -> str:
        return self.hf_tokenizer.decode([int(i) for i in ids])


def load_hf(path, device: str = "cpu", dtype: torch.dtype = torch.float32, *,
            name: str | None = None, gguf_file: str | None = None, source: dict | None = None,
            offload: bool = False, scratch=None) -> HFModel:
    """Load a local Hugging Face causal LM directory (config, weights, tokenizer files), never a hub.

    ``gguf_file`` names a GGUF file inside ``path`` instead: transformers dequantizes it to ``dtype``.
    ``offload``: read the decoder blocks from the directory's safetensors files only while each is
    computed (quantlab.offload), for a model larger than memory; the other weights are loaded.
    ``scratch``: the directory its quantizations write their codes to (default: a temporary one).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; hf:PATH needs a local Hugging Face model directory "
            "(config.json, weights and tokenizer files, as written by save_pretrained)")
    if offload:
        if gguf_file:
            raise ValueError("offload reads safetensors checkpoints block by block; a GGUF file is loaded whole")
        return load_hf_offloaded(path, device, dtype, name=name, source=source, scratch=scratch)
    gguf_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **gguf_kwargs)
    module = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype, weights_only=True, **gguf_kwargs).to(device)
    source = source or {"kind": "hf", "path": str(path.resolve())}
    return wrap_hf(module, tokenizer, name or f"hf:{path}", source=source)


def load_hf_offloaded(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, *,
                      name: str | None = None, source: dict | None = None, scratch=None) -> HFModel:
    """``load_hf(..., offload=True)``: the model built from config.json without weights (meta tensors;
    buffers such as rotary frequencies are real), its weights left to quantlab.offload.BlockOffload,
    which reads each block (and the embeddings and head) from the safetensors files while it computes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    from quantlab.offload import BlockOffload, checkpoint_files

    files = checkpoint_files(path)   # first: a directory without safetensors is refused before any work
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if any(isinstance(m, Conv1D) for m in module.modules()):
        raise ValueError(f"{type(module).__name__} stores its Linears as transformers Conv1D (transposed), which "
                         "offload does not read; load this model whole (offload: false)")
    for m in module.modules():   # buffers were built real (on the CPU): move them, the parameters are meta
        for key, buffer in m._buffers.items():
            if buffer is not None:
                m._buffers[key] = buffer.to(device)
    _, blocks = find_blocks(module)
    offload = BlockOffload(module, blocks, files, dtype, device, scratch=scratch)
    offload.install_hooks()
    source = source or {"kind": "hf", "path": str(path.resolve()), "offload": True}
    model = wrap_hf(module, tokenizer, name or f"hf:{path}", source=source, trace_blocks=False)
    model.offload = offload
    return model


def wrap_hf(module: nn.Module, tokenizer, name: str, source: dict | None = None,
            trace_blocks: bool = True) -> HFModel:
    """Put an in-process transformers causal LM behind the LanguageModel interface.

    Takes ownership of ``module``: it is switched to eval mode, its gradients are turned off (this is
    an inference-only object, and a forward pass then never builds an autograd graph), and any Conv1D
    is replaced by an equivalent nn.Linear. ``trace_blocks=False``: the blocks are not run while the
    head is traced (an offloaded model's would each be read from disk), see trace_head.
    """
    replace_conv1d_with_linear(module)
    module.eval()
    module.requires_grad_(False)
    blocks_name, blocks = find_blocks(module)
    lm_head = module.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(module).__name__} has no output embedding (lm_head); "
                         "quantlab needs a causal LM (AutoModelForCausalLM), not a bare encoder/decoder")
    return HFModel(
        name=name, module=module, blocks=blocks, vocab_size=lm_head.weight.shape[0],
        max_seq_len=context_length(module), tokenizer=describe_tokenizer(tokenizer, name),
        source=source or {}, hf_tokenizer=tokenizer,
        head_names=trace_head(module, blocks_name, run_blocks=trace_blocks),
    )


def context_length(module: nn.Module) -> int:
    """The longest window the model reads: its position table's length (max_position_embeddings), or
    the length MPT builds its ALiBi bias for (max_seq_len). A model that states neither and has no
    position table (Bloom's ALiBi has nothing to outgrow) reads any length: UNBOUNDED_CONTEXT."""
    for key in ("max_position_embeddings", "max_seq_len"):
        value = getattr(module.config, key, None)
        if value:
            return int(value)
    inputs = module.get_input_embeddings()
    if any(isinstance(m, nn.Embedding) and m is not inputs for m in module.modules()):
        raise ValueError(f"{type(module.config).__name__} does not say its context length "
                         "(max_position_embeddings); set it in config.json")
    return UNBOUNDED_CONTEXT


def find_blocks(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: of all ModuleLists of same-class layers, the one with the most parameters.
    (model.layers in Llama/Qwen, model.decoder.layers in OPT, transformer.h in GPT-2.)"""
    candidates = [
        (name, m) for name, m in module.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(layer) for layer in m}) == 1
    ]
    if not candidates:
        raise ValueError(f"{type(module).__name__} has no nn.ModuleList of repeated layers, so quantlab "
                         "cannot find its decoder blocks; only transformer-style causal LMs are supported")
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def trace_head(module: nn.Module, blocks_name: str, run_blocks: bool = True) -> tuple[str, ...]:
    """Names of the modules that turn the last block's output into logits, in call order.

    They are the blocks' siblings that run after the last block (the final norm; OPT's project_out,
    which is registered before its layers, hence watching rather than reading the registration
    order), followed by the output embedding. ``run_blocks=False``: each block hands its input on
    instead of computing (what runs after the blocks does not depend on what they computed).
    """
    parent_name, _, _ = blocks_name.rpartition(".")
    parent = module.get_submodule(parent_name)
    blocks = module.get_submodule(blocks_name)
    called_after_blocks: list[str] = []
    last_block_done = False

    def mark_last_block_done(*_):
        nonlocal last_block_done
        last_block_done = True

    def recorder(child_name: str):
        def record(*_):
            if last_block_done:
                called_after_blocks.append(child_name)
        return record

    prefix = f"{parent_name}." if parent_name else ""
    handles = [blocks[-1].register_forward_hook(mark_last_block_done)]
    handles += [child.register_forward_hook(recorder(prefix + child_name))
                for child_name, child in parent.named_children() if child is not blocks]
    device = module.get_input_embeddings().weight.device
    if not run_blocks:
        for block in blocks:   # an instance attribute shadows the class's forward (as block_inputs does)
            block.forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]
    try:
        with torch.no_grad():
            module(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        if not run_blocks:
            for block in blocks:
                del block.forward
    return (*called_after_blocks, module_name(module, module.get_output_embeddings()))


def module_name(root: nn.Module, target: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is target:
            return name
    raise LookupError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def conv1d_as_linear(conv) -> nn.Linear:
    """GPT-2's Conv1D computes x @ W + b with W stored (in, out); nn.Linear stores W^T, (out, in)."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


def replace_conv1d_with_linear(module: nn.Module) -> None:
    """Swap every transformers Conv1D inside ``module`` for the equivalent nn.Linear (in place)."""
    from transformers.pytorch_utils import Conv1D

    convs = [name for name, m in module.named_modules() if isinstance(m, Conv1D)]
    for name in convs:
        module.set_submodule(name, conv1d_as_linear(module.get_submodule(name)))


def describe_tokenizer(tokenizer, name: str) -> dict:
    """What the evaluation fingerprint records about tokenization. The vocabulary hash catches a
    tokenizer that changed under the same name; no path, so the record is the same on every machine."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "kind": "hf",
        "name": name,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "add_bos": False,
        "bos_token": tokenizer.bos_token,
    }
