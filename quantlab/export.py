"""Write a quantized model as a deployable checkpoint: compressed-tensors (vLLM, transformers) or GGUF.

The files hold quantlab's own codes and float16 scales, never a re-quantization of the dequantized
weights, so what a runtime loads is exactly what quantlab evaluated. ``servability`` says up front
whether a scheme/model pair has a layout the format (and the kernels that read it) can take.

compressed-tensors layout (``pack-quantized``), per quantized Linear ``NAME``:
  NAME.weight_packed      int32, codes packed by compressed_tensors' own ``pack_to_int32`` (signed
                          codes offset by 2^(bits-1), 32/bits per word along the input dimension)
  NAME.weight_scale       float16 (out, n_groups); (out, 1) per channel
  NAME.weight_zero_point  asymmetric only: signed zero points packed along the output dimension
  NAME.weight_g_idx       int32 (in,), act-order with dynamic groups only
  NAME.weight_shape       int64 (2,)
quantlab's asymmetric codes [0, 2^b-1] and zero points are shifted by -2^(b-1) into compressed-tensors'
signed storage; (code - zero) is unchanged, so the dequantized weights are identical.

(Past 400 lines on purpose: both formats are judged by one ``servability`` before anything is written,
and share the atomic directory writing; a module per format would split that one verdict.)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import nn

from quantlab.quant import FloatScheme, QTensor, Scheme

COMPRESSED_TENSORS = "compressed-tensors"
GGUF = "gguf"
FORMATS = (COMPRESSED_TENSORS, GGUF)
METADATA_KEY = "quantlab_export"   # top-level config.json key: quantlab's grid and scheme, for readers
WNA16_BITS = (4, 8)                # vLLM's compressed-tensors weight-only kernels: uint4b8 / uint8b128


@dataclass(frozen=True)
class ExportInfo:
    """What an export wrote.

    bytes_on_disk:  bytes of the weight files (``*.safetensors`` or the ``.gguf``), to set next to
                    accounting.deployable_bytes' ``bytes_total`` (which counts kept float tensors as float16).
    bytes_quantized: bytes of the quantized Linears' tensors (packed codes, scales, zeros, g_idx).
    """

    path: Path
    format: str
    files: tuple = ()
    bytes_on_disk: int = 0
    bytes_quantized: int = 0
    n_quantized: int = 0
    metadata: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Servability


def servability(scheme: Union[Scheme, FloatScheme], model, format: str = COMPRESSED_TENSORS) -> tuple[bool, str]:
    """(True, "") when ``model`` quantized with ``scheme`` can be exported in ``format`` and served by
    the runtimes that read it; else (False, one-line reason naming what to change)."""
    if format not in FORMATS:
        return False, f"unknown export format {format!r}; known: {', '.join(FORMATS)}"
    if isinstance(scheme, FloatScheme):
        return False, (f"{scheme.dtype} is a float scheme: there are no integer codes to pack; "
                       "save the float model with save_pretrained instead")
    if not isinstance(scheme, Scheme):
        return False, f"scheme must be a quantlab Scheme, got {scheme!r}"
    ok, reason = _transformers_architecture(model)
    if not ok:
        return ok, reason
    if format == GGUF:
        return _gguf_servability(scheme, model)
    if scheme.bits not in WNA16_BITS:
        return False, (f"INT{scheme.bits} has no compressed-tensors weight-only kernel in vLLM "
                       f"(it takes {' or '.join(map(str, WNA16_BITS))} bits); use bits: 4 or 8")
    if scheme.granularity == "tensor":
        return False, ("per-tensor integer weights have no weight-only (W*A16) kernel in vLLM; "
                       "use granularity: channel or group")
    if scheme.granularity == "group":
        for name, width in _linear_widths(model).items():
            if width % scheme.group_size:
                return False, (f"group_size {scheme.group_size} does not divide {name}'s input width {width} "
                               f"(vLLM and compressed-tensors need whole groups); use a group size dividing {width}")
    conv = _conv1d_linears(model)
    if conv:
        return False, (f"{type(model.module).__name__} stores its block Linears as transformers Conv1D "
                       f"(e.g. {conv[0]}); compressed-tensors packs nn.Linear only, so nothing would be "
                       "loaded quantized; export a Linear-based architecture (Llama, Qwen2, ...)")
    return True, ""


SERVABILITY_KEYS = {"compressed_tensors": COMPRESSED_TENSORS, "gguf": GGUF}   # results.json key -> format


def servability_table(model, schemes: dict) -> dict:
    """{scheme name: {"compressed_tensors": (ok, reason), "gguf": (ok, reason)}} for ``model`` under each
    scheme, ready to store as each SchemeResult's ``servable`` (the report's "servable" column reads it;
    the report cannot load models, so the verdict is recorded when the model is at hand).

    ``schemes`` maps names to quant.Scheme / FloatScheme, or to anything with ``quant_scheme()`` (a
    spec's SchemeConfig). Only the layout is judged; act-order groups (g_idx), which GGUF and asymmetric
    compressed-tensors refuse at export time, are judged from a SchemeConfig's ``method``, ``act_order``
    and ``static_groups`` (GPTQ with act-order and dynamic groups writes g_idx); a bare Scheme has none."""
    table = {}
    for name, scheme in schemes.items():
        quant = scheme.quant_scheme() if hasattr(scheme, "quant_scheme") else scheme
        verdicts = {}
        for key, fmt in SERVABILITY_KEYS.items():
            if getattr(scheme, "awq", False) or getattr(scheme, "mixed", None) is not None:
                verdicts[key] = (False, AWQ_REFUSAL if getattr(scheme, "awq", False) else MIXED_REFUSAL)
                continue
            ok, reason = servability(quant, model, format=fmt)
            if ok and _writes_g_idx(scheme, quant):
                ok, reason = _g_idx_servability(quant, fmt)
            verdicts[key] = (ok, reason)
        table[name] = verdicts
    return table


def _writes_g_idx(config, scheme) -> bool:
    # quantlab.gptq records g_idx only for act-order with dynamic groups (it drops it when the order
    # happens to be the natural one, which is data-dependent: counted as written).
    return (getattr(config, "method", None) == "gptq" and bool(getattr(config, "act_order", False))
            and not getattr(config, "static_groups", False) and isinstance(scheme, Scheme)
            and scheme.granularity == "group")


def _g_idx_servability(scheme: Scheme, format: str) -> tuple[bool, str]:
    """The export-time refusals of act-order groups (g_idx), said before quantizing."""
    if format == GGUF:
        return False, ("GGUF blocks are consecutive columns: act-order groups (g_idx) cannot be stored; "
                       "quantize with static_groups: true or act_order: false")
    if not scheme.symmetric:
        return False, ("transformers cannot load asymmetric weights with weight_g_idx; "
                       "quantize with symmetric: true, static_groups: true or act_order: false")
    return True, ""


def _transformers_architecture(model) -> tuple[bool, str]:
    from transformers import PreTrainedModel

    module = getattr(model, "module", None)
    if not isinstance(module, PreTrainedModel):
        return False, (f"{getattr(model, 'name', type(model).__name__)} is not a transformers architecture "
                       f"({type(module).__name__}), so neither transformers nor vLLM can load an export; "
                       "use an hf: model")
    return True, ""


def _linear_widths(model) -> dict:
    return {name: model.module.get_submodule(name).in_features for name in model.all_linear_names()}


def _conv1d_linears(model) -> list:
    """Block Linears that the architecture's own class declares as transformers Conv1D (GPT-2): quantlab
    swapped them for nn.Linear at load, so ask a weightless (meta) instance of the class."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        pristine = type(model.module)(model.module.config)
    return [name for name in model.all_linear_names() if isinstance(pristine.get_submodule(name), Conv1D)]


AWQ_REFUSAL = ("AWQ input scales are not folded into the preceding norms or Linears (quantlab keeps each group's "
               "scale s beside the codes and computes Q(W s) / s), so the codes alone are not the model; export the "
               "same grid without AWQ (method rtn or gptq)")
MIXED_REFUSAL = ("a mixed-precision scheme has a grid per layer; the exporters write one quantization config per "
                 "model: export a uniform scheme")


def _require_servable(quantized, format: str) -> None:
    if getattr(quantized, "input_scales", None):
        raise ValueError(f"cannot export {quantized.scheme.describe()} with AWQ as {format}: {AWQ_REFUSAL}")
    if getattr(quantized, "layer_schemes", None):
        raise ValueError(f"cannot export {quantized.scheme.describe()} as {format}: {MIXED_REFUSAL}")
    ok, reason = servability(quantized.scheme, quantized.model, format)
    if not ok:
        raise ValueError(f"cannot export {quantized.scheme.describe()} as {format}: {reason}")


# ----------------------------------------------------------------------------------------------
# compressed-tensors


def compressed_tensors_scheme(scheme: Scheme, targets: list, act_order_groups: bool):
    """The compressed_tensors QuantizationScheme equivalent to a quantlab Scheme."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kwargs = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric}
    if scheme.granularity == "group":
        kwargs.update(strategy="group", group_size=scheme.group_size)
        if act_order_groups:
            kwargs["actorder"] = "group"   # columns map to groups through weight_g_idx
    else:
        kwargs["strategy"] = scheme.granularity   # "channel" (tensor is refused by servability)
    return QuantizationScheme(targets=targets, weights=QuantizationArgs(**kwargs), format="pack-quantized")


def compressed_tensors_state(qtensor: QTensor) -> dict:
    """One Linear's pack-quantized tensors (local names: weight_packed, weight_scale, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    scheme = qtensor.scheme
    # compressed-tensors stores signed codes; quantlab's asymmetric codes are unsigned [0, 2^b-1].
    shift = 0 if scheme.symmetric else 2 ** (scheme.bits - 1)
    codes = (qtensor.codes.to(torch.int16) - shift).to(torch.int8)
    state = {
        "weight_packed": pack_to_int32(codes, scheme.bits),
        "weight_scale": qtensor.scales.to(torch.float16).contiguous(),
        "weight_shape": torch.tensor(qtensor.shape, dtype=torch.int64),
    }
    if qtensor.zeros is not None:
        zeros = (qtensor.zeros.to(torch.int16) - shift).to(torch.int8)
        state["weight_zero_point"] = pack_to_int32(zeros, scheme.bits, packed_dim=0)
    if qtensor.g_idx is not None:
        state["weight_g_idx"] = qtensor.g_idx.to(torch.int32).contiguous()
    return state


def export_compressed_tensors(quantized, out_dir, *, tokenizer_source=None, overwrite: bool = False) -> ExportInfo:
    """Write ``quantized`` (a calibrate.QuantizedModel of an hf model) to ``out_dir`` as a Hugging Face
    model directory in compressed-tensors ``pack-quantized`` format, readable by
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and vLLM.

    Float tensors (embeddings, norms, lm_head, biases) are written in the dtype quantlab evaluated them
    in. ``tokenizer_source``: a tokenizer, or a directory to load one from; default the model's own.
    The directory appears complete or not at all (written to a temporary sibling, then renamed).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    _require_servable(quantized, COMPRESSED_TENSORS)
    act_order = any(qt.g_idx is not None for qt in quantized.qtensors.values())
    if act_order and not quantized.scheme.symmetric:
        # transformers 5.23 reads asymmetric pack-quantized only through dequantize=True, whose loader
        # does not collect weight_g_idx: the columns would be dequantized in the wrong groups.
        raise ValueError(f"cannot export {quantized.scheme.describe()} with act-order groups (g_idx) as "
                         f"{COMPRESSED_TENSORS}: transformers cannot load asymmetric weights with weight_g_idx; "
                         "quantize with symmetric: true, static_groups: true or act_order: false")
    module = quantized.materialize().module   # a model holding the deployed values (kept modules in float16)
    names = sorted(quantized.qtensors)
    state = {k: v for k, v in module.state_dict().items()}
    bytes_quantized = 0
    for name in names:
        del state[f"{name}.weight"]
        for key, tensor in compressed_tensors_state(quantized.qtensors[name]).items():
            state[f"{name}.{key}"] = tensor
            bytes_quantized += tensor.numel() * tensor.element_size()
    # Target every nn.Linear and ignore the ones quantlab kept in float (lm_head, ...): the usual
    # llm-compressor shape of the config, short whatever the depth.
    ignore = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in quantized.qtensors]
    config = QuantizationConfig(
        config_groups={"group_0": compressed_tensors_scheme(quantized.scheme, ["Linear"], act_order)},
        format="pack-quantized", quantization_status="compressed", ignore=ignore)
    metadata = _metadata(quantized)

    def write(tmp: Path) -> None:
        # transformers writes config.json, generation_config.json and safetensors (dropping tied copies).
        with _float_for_saving(module):
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        ModelCompressor(quantization_config=config).update_config(str(tmp))
        _add_to_config(tmp / "config.json", {METADATA_KEY: metadata})
        _save_tokenizer(quantized.model, tokenizer_source, tmp)

    out = _write_atomically(Path(out_dir), write, overwrite)
    files = tuple(sorted(p.name for p in out.iterdir()))
    return ExportInfo(path=out, format=COMPRESSED_TENSORS, files=files,
                      bytes_on_disk=sum(p.stat().st_size for p in out.glob("*.safetensors")),
                      bytes_quantized=bytes_quantized, n_quantized=len(names), metadata=metadata)


@contextlib.contextmanager
def _float_for_saving(module):
    """A model transformers loaded from a GGUF (SmolLM2) carries its GGUF quantizer, so save_pretrained refuses
    it ("not serializable") although its weights are plain float32 (dequantized at load). Hide the quantizer
    and its config while saving, then put them back: the module is the caller's."""
    quantizer = getattr(module, "hf_quantizer", None)
    config = module.config
    qconfig = getattr(config, "quantization_config", None)
    if quantizer is None and qconfig is None:
        yield
        return
    module.hf_quantizer = None
    if qconfig is not None:
        del config.quantization_config
    try:
        yield
    finally:
        module.hf_quantizer = quantizer
        if qconfig is not None:
            config.quantization_config = qconfig


def _metadata(quantized) -> dict:
    """What a reader needs beyond the format's own config: the code range actually used."""
    scheme = quantized.scheme
    grid = ("asymmetric" if not scheme.symmetric else scheme.grid)
    note = {"restricted": f"symmetric restricted grid: codes lie in [{scheme.qmin}, {scheme.qmax}] and never "
                          f"use {-(2 ** (scheme.bits - 1))}",
            "full": f"symmetric full grid: codes lie in [{scheme.qmin}, {scheme.qmax}]",
            "asymmetric": f"asymmetric: codes [0, {scheme.qmax}] stored shifted by -{2 ** (scheme.bits - 1)}, "
                          "like the zero points"}[grid]
    return {"scheme": scheme.describe(), "bits": scheme.bits, "grid": grid, "code_range": [scheme.qmin, scheme.qmax],
            "method": quantized.method, "note": note,
            "layers": sorted(quantized.qtensors)}


def _add_to_config(path: Path, entries: dict) -> None:
    data = json.loads(path.read_text())
    data.update(entries)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _save_tokenizer(model, tokenizer_source, directory: Path) -> None:
    tokenizer = tokenizer_source
    if tokenizer is None:
        tokenizer = getattr(model, "hf_tokenizer", None)
    elif isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _write_atomically(target: Path, write, overwrite: bool) -> Path:
    """Run ``write(tmp_dir)`` on a temporary sibling of ``target`` and rename it into place, so a crash
    never leaves a half-written model where a loader would find it."""
    target = target.resolve()
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists; pass overwrite=True or choose another directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# GGUF: symmetric group-32 INT4 is Q4_0 ((q - 8) * d, fp16 d per 32 weights), INT8 group 32 is Q8_0.

GGUF_ARCHITECTURES = ("llama",)   # transformers reads these back; each needs its name map and q/k permutation
GGUF_BLOCK = 32


def _gguf_servability(scheme: Scheme, model) -> tuple[bool, str]:
    model_type = getattr(model.module.config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        return False, (f"GGUF export covers {', '.join(GGUF_ARCHITECTURES)} (what quantlab writes and transformers "
                       f"reads back), not {model_type!r}; export compressed-tensors instead")
    if not scheme.symmetric or scheme.granularity != "group" or scheme.group_size != GGUF_BLOCK \
            or scheme.bits not in (4, 8):
        return False, (f"{scheme.describe()} has no GGUF block type: Q4_0 is symmetric INT4 and Q8_0 symmetric INT8, "
                       f"both in groups of {GGUF_BLOCK} with float16 scales; use bits 4 or 8, group_size 32, symmetric")
    for name, width in _linear_widths(model).items():
        if width % GGUF_BLOCK:
            return False, f"{name}'s input width {width} is not a multiple of the GGUF block ({GGUF_BLOCK})"
    return True, ""


def gguf_blocks(codes: torch.Tensor, scales: torch.Tensor, bits: int):
    """quantlab codes (out, in) and float16 scales (out, in/32) as Q4_0 / Q8_0 block bytes (out, in/32*bytes)."""
    import numpy as np

    out_features, in_features = codes.shape
    n_blocks = in_features // GGUF_BLOCK
    d = scales.to(torch.float16).contiguous().numpy().reshape(out_features, n_blocks, 1).view(np.uint8)
    if bits == 4:
        # block_q4_0: d, then 16 bytes whose low nibbles are weights 0..15 and high nibbles 16..31, stored q + 8.
        u = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(out_features, n_blocks, GGUF_BLOCK).numpy()
        qs = u[..., : GGUF_BLOCK // 2] | (u[..., GGUF_BLOCK // 2:] << np.uint8(4))
    else:
        # block_q8_0: d, then the 32 int8 codes.
        qs = codes.to(torch.int8).reshape(out_features, n_blocks, GGUF_BLOCK).numpy().view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(out_features, -1)


def _llama_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for q/k (its rotary pairs halves differently); transformers undoes it on load."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _llama_unpermute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``_llama_permute``: llama.cpp's q/k rows back in Hugging Face order (GGUF import)."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def llama_gguf_writer(path, cfg):
    """A gguf.GGUFWriter for ``path`` with a transformers LlamaConfig's hyperparameters written: what
    llama.cpp and transformers' GGUF loader read to rebuild the architecture."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    return writer


def export_gguf(quantized, path) -> ExportInfo:
    """Write ``quantized`` (a Llama, symmetric INT4/INT8 group 32) as a GGUF file with Q4_0/Q8_0 Linears built
    from quantlab's codes and scales; embeddings, norms and lm_head stay F32. Written to a temporary file,
    then renamed. No tokenizer metadata is written (transformers loads the model without it)."""
    import gguf

    _require_servable(quantized, GGUF)
    if any(qt.g_idx is not None for qt in quantized.qtensors.values()):
        raise ValueError("GGUF blocks are consecutive columns: act-order groups (g_idx) cannot be stored; "
                         "quantize with static_groups: true or act_order: false")
    module, scheme = quantized.materialize().module, quantized.scheme
    cfg = module.config
    qtype = gguf.GGMLQuantizationType.Q4_0 if scheme.bits == 4 else gguf.GGMLQuantizationType.Q8_0
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    bytes_quantized = 0
    try:
        writer = llama_gguf_writer(tmp, cfg)
        writer.add_string(f"{METADATA_KEY}.scheme", scheme.describe())
        writer.add_string(f"{METADATA_KEY}.grid", scheme.grid)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
        tied = getattr(cfg, "tie_word_embeddings", False)
        for key, value in module.state_dict().items():
            base, _, suffix = key.rpartition(".")
            if tied and key == "lm_head.weight":
                continue   # GGUF llama without output.weight reuses token_embd
            gguf_name = names.get_name(base)
            if gguf_name is None:
                raise ValueError(f"{key} has no GGUF llama tensor name; the model is not a plain Llama")
            if base in quantized.qtensors:
                qt = quantized.qtensors[base]
                codes, scales = qt.codes, qt.scales
                heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(base.rpartition(".")[2])
                if heads:
                    codes, scales = _llama_permute(codes, heads), _llama_permute(scales, heads)
                blocks = gguf_blocks(codes, scales, scheme.bits)
                writer.add_tensor(f"{gguf_name}.{suffix}", blocks, raw_dtype=qtype)
                bytes_quantized += blocks.nbytes
            else:
                writer.add_tensor(f"{gguf_name}.{suffix}", value.detach().to(torch.float32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ExportInfo(path=path, format=GGUF, files=(path.name,), bytes_on_disk=path.stat().st_size,
                      bytes_quantized=bytes_quantized, n_quantized=len(quantized.qtensors),
                      metadata={"scheme": scheme.describe(), "ggml_type": qtype.name, "grid": scheme.grid})
