"""Read quantized checkpoints written by other tools: the float model plus quantlab QTensors from the file.

``load_checkpoint(uri)`` takes
  hf:DIR     a Hugging Face directory in compressed-tensors ``pack-quantized`` format, or GPTQ format
             (qweight/qzeros/scales/g_idx and quantize_config.json, or config.json's quantization_config);
  gguf:FILE  a GGUF Llama whose block Linears are Q4_0 or Q8_0 (F16/F32 ones stay float; K-quants are
             refused), with its tokenizer files beside it (or tokenizer metadata in the file);
and returns a calibrate.QuantizedModel: ``model`` is the float model (a quantlab HFModel) whose quantized
Linears hold exactly ``qtensors[name].dequantize()`` in float32, ``qtensors`` are rebuilt from the file's
own tensors (codes, scales, zeros, g_idx), and ``bytes['bytes_linear']`` is read from the file's tensor
sizes (``bytes_on_disk``: the weight files themselves).

Code conventions on the way in: compressed-tensors stores signed codes (asymmetric ones shifted by
-2^(b-1), as are their zero points); GPTQ stores unsigned codes and, in its v1 format, zero - 1 (a
symmetric 4-bit GPTQ zero of 8 is stored as 7). Symmetric checkpoints become ``grid='full'`` schemes
unless quantlab's own export metadata says the codes are on the restricted grid (then checked). GGUF
Q4_0 stores codes + 8 in nibbles and Q8_0 int8 codes, both with a float16 scale per 32 weights, and
q/k rows in llama.cpp's rotary order (undone here); the gguf library's own Q4_0 quantizer divides by the
signed peak over -8, so its scales may be negative and its codes reach -8.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from quantlab.accounting import KEEP_KINDS, deployable_bytes
from quantlab.quant import QTensor, Scheme, group_index

HF_PREFIX = "hf:"
GGUF_PREFIX = "gguf:"


class CheckpointError(ValueError):
    """A checkpoint file is not what it claims to be (or holds a layout quantlab cannot represent)."""


def load_checkpoint(uri: str, device: str = "cpu"):
    """``hf:DIR`` (compressed-tensors or GPTQ) or ``gguf:FILE`` -> calibrate.QuantizedModel."""
    if uri.startswith(HF_PREFIX):
        path = Path(uri[len(HF_PREFIX):]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: {path} is not a directory; hf:DIR needs a Hugging Face model directory")
        kind, config = _hf_quantization(path)
        read = _read_compressed_tensors if kind == "compressed-tensors" else _read_gptq
        qtensors, scheme = read(path, config)
        return _assemble(path, None, qtensors, scheme, kind, uri, device)
    if uri.startswith(GGUF_PREFIX):
        file = Path(uri[len(GGUF_PREFIX):]).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"{uri}: {file} is not a file; gguf:FILE needs a .gguf file")
        qtensors, scheme, nbytes = _read_gguf(file)
        return _assemble(file.parent, file.name, qtensors, scheme, "gguf", uri, device, linear_nbytes=nbytes)
    raise ValueError(f"unknown checkpoint {uri!r}; use hf:DIR (compressed-tensors or GPTQ) or gguf:FILE")


def mismatch(reference, imported, uri: str) -> Optional[str]:
    """Why ``imported`` (a checkpoint's LanguageModel) is not the spec's ``reference`` model quantized:
    another architecture, other tensor names or shapes, or another tokenizer. None when it is."""
    ref_module, imp_module = reference.module, imported.module
    if type(ref_module).__name__ != type(imp_module).__name__:
        return (f"{uri} is a {type(imp_module).__name__}, the spec's model a {type(ref_module).__name__}; "
                "a checkpoint scheme must quantize the spec's own model")
    ref_shapes = {k: tuple(v.shape) for k, v in ref_module.state_dict().items()}
    imp_shapes = {k: tuple(v.shape) for k, v in imp_module.state_dict().items()}
    differing = sorted(k for k in ref_shapes.keys() | imp_shapes.keys() if ref_shapes.get(k) != imp_shapes.get(k))
    if differing:
        return (f"{uri} has other tensors than the spec's model ({', '.join(differing[:3])}"
                f"{' ...' if len(differing) > 3 else ''}); a checkpoint scheme must quantize the spec's own model")
    def vocabulary(model):   # the tokenizer's identity, not the name of the directory it came from
        return {k: v for k, v in model.tokenizer.items() if k != "name"}

    if vocabulary(reference) != vocabulary(imported):
        return (f"{uri} has another tokenizer than the spec's model ({vocabulary(imported)} vs {vocabulary(reference)}); "
                "perplexities under different tokenizers are not comparable")
    return None


# ----------------------------------------------------------------------------------------------
# What the directory claims


def _hf_quantization(path: Path) -> tuple[str, dict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; hf:DIR needs a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    qconfig = config.get("quantization_config")
    if (path / "quantize_config.json").is_file():
        qconfig = {"quant_method": "gptq", **json.loads((path / "quantize_config.json").read_text())}
    if not qconfig:
        raise CheckpointError(f"{path}/config.json has no quantization_config (and there is no quantize_config.json): "
                              "it is a float model; load it with hf:PATH as a model instead")
    method = qconfig.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors", {**config, "quantization_config": qconfig}
    if method == "gptq":
        return "gptq", qconfig
    raise CheckpointError(f"{path}: quant_method {method!r} is not supported; quantlab reads compressed-tensors "
                          "(pack-quantized) and GPTQ checkpoints")


def _tensors(path: Path) -> dict:
    """Every tensor of the directory's safetensors files, by name."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files; quantlab reads safetensors checkpoints only")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


# ----------------------------------------------------------------------------------------------
# compressed-tensors


def _read_compressed_tensors(path: Path, config: dict) -> tuple[dict, Scheme]:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    qconfig = config["quantization_config"]
    groups = list(qconfig.get("config_groups", {}).values())
    if len(groups) != 1 or not isinstance(groups[0], dict) or not groups[0].get("weights"):
        raise CheckpointError(f"{path}: quantlab reads compressed-tensors checkpoints with one weight-quantized "
                              f"config group, found {len(groups)}")
    args = groups[0]["weights"]
    fmt = groups[0].get("format") or qconfig.get("format")
    if fmt != "pack-quantized" or args.get("type", "int") != "int":
        raise CheckpointError(f"{path}: compressed-tensors format {fmt!r} ({args.get('type')} weights) is not "
                              "supported; quantlab reads int pack-quantized checkpoints")
    if groups[0].get("input_activations"):
        raise CheckpointError(f"{path}: activations are quantized too; quantlab reads weight-only checkpoints")
    bits, symmetric, strategy = int(args["num_bits"]), bool(args.get("symmetric", True)), args.get("strategy")
    if strategy not in ("group", "channel"):
        raise CheckpointError(f"{path}: compressed-tensors strategy {strategy!r} is not supported (group or channel)")
    meta = config.get("quantlab_export", {})
    grid = meta.get("grid", "full") if symmetric else "restricted"
    scheme = Scheme(bits, group_size=args.get("group_size") if strategy == "group" else None,
                    symmetric=symmetric, grid=grid if grid in ("full", "restricted") else "full")
    shift = 0 if symmetric else 2 ** (bits - 1)
    tensors = _tensors(path)
    qtensors = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        name = key[: -len(".weight_packed")]
        shape = tuple(int(s) for s in tensors[f"{name}.weight_shape"])
        scales = tensors[f"{name}.weight_scale"]
        codes = unpack_from_int32(tensors[key], bits, torch.Size(shape)).to(torch.int16) + shift
        zeros = None
        if not symmetric:
            packed_zeros = tensors.get(f"{name}.weight_zero_point")
            if packed_zeros is None:
                raise CheckpointError(f"{path}: {name} is asymmetric but has no weight_zero_point")
            zeros = unpack_from_int32(packed_zeros, bits, torch.Size((shape[0], scales.shape[-1])),
                                      packed_dim=0).to(torch.int16) + shift
        g_idx = tensors.get(f"{name}.weight_g_idx")
        qtensors[name] = _checked(path, name, QTensor(_narrow(codes, scheme), scales, zeros, scheme,
                                                      _reordering(g_idx, shape[1], scheme)))
    if not qtensors:
        raise CheckpointError(f"{path}: config says compressed-tensors but no tensor is named *.weight_packed")
    return qtensors, scheme


# ----------------------------------------------------------------------------------------------
# GPTQ


def _read_gptq(path: Path, qconfig: dict) -> tuple[dict, Scheme]:
    bits = int(qconfig.get("bits", 4))
    if bits not in (2, 4, 8):
        raise CheckpointError(f"{path}: GPTQ bits={bits} is not supported; quantlab reads 2-, 4- and 8-bit GPTQ "
                              "(3-bit words straddle int32 boundaries)")
    group_size = int(qconfig.get("group_size", 128))
    symmetric = bool(qconfig.get("sym", True))
    fmt = qconfig.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
    # v1 stores zero - 1 (the reference CUDA kernel adds the 1 back): read it the way that kernel does.
    zero_offset = 1 if fmt == "gptq" else 0
    scheme = Scheme(bits, group_size=group_size if group_size > 0 else None, symmetric=symmetric,
                    grid="full" if symmetric else "restricted")
    tensors = _tensors(path)
    qtensors = {}
    for key in sorted(k for k in tensors if k.endswith(".qweight")):
        name = key[: -len(".qweight")]
        try:
            qzeros, scales = tensors[f"{name}.qzeros"], tensors[f"{name}.scales"]
        except KeyError as missing:
            raise CheckpointError(f"{path}: {name} has qweight but no {missing.args[0]}; not a GPTQ checkpoint") from None
        q = _unpack_rows(tensors[key], bits).t()                          # (out, in) unsigned codes
        zeros = _unpack_rows(qzeros.t(), bits).t() + zero_offset          # (n_groups, out)
        out_features, in_features = q.shape
        zeros = zeros[:, :out_features].t().contiguous()                   # (out, n_groups)
        if symmetric:
            midpoint = 2 ** (bits - 1)
            if not (zeros == midpoint).all():
                raise CheckpointError(f"{path}: quantize_config says sym but {name}'s zero points are not all "
                                      f"{midpoint}; set sym: false or check checkpoint_format (v1 stores zero - 1)")
            codes, zeros = q - midpoint, None
        else:
            codes = q
        g_idx = tensors.get(f"{name}.g_idx")
        qt = QTensor(_narrow(codes, scheme), scales.t().contiguous(), zeros, scheme,
                     _reordering(g_idx, in_features, scheme))
        qtensors[name] = _checked(path, name, qt, allow_v1_zero=not symmetric)
    if not qtensors:
        raise CheckpointError(f"{path}: quantization config says GPTQ but no tensor is named *.qweight")
    return qtensors, scheme


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ packing: each int32 of row i holds rows i*k .. i*k+k-1 (k = 32/bits), lowest bits first."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF                      # int32 -> its unsigned bit pattern
    values = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2 ** bits - 1)   # (rows, k, cols)
    return values.reshape(-1, packed.shape[1]).to(torch.int16)


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp): Q4_0 and Q8_0 are quantlab schemes exactly (symmetric, groups of 32, float16 scales)

GGUF_BLOCK = 32
GGUF_QUANT_BITS = {"Q4_0": 4, "Q8_0": 8}
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")   # a block Linear kept in float: loaded as is, no QTensor
# A Llama block's Linears in Hugging Face names; the GGUF names come from the gguf package's own map.
LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _read_gguf(file: Path) -> tuple[dict, Scheme, dict]:
    """({HF Linear name: QTensor}, scheme, {name: bytes of its GGUF tensor}) of a Llama GGUF file."""
    import gguf

    from quantlab.export import _llama_unpermute

    try:
        reader = gguf.GGUFReader(file)
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{file} is not a readable GGUF file ({error})") from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        # Each architecture has its own tensor names and llama.cpp row permutation; only Llama's is undone here.
        raise CheckpointError(f"{file} is a GGUF {arch!r} model; quantlab reads GGUF llama files only "
                              "(export the model as compressed-tensors and use hf:DIR instead)")
    n_blocks = int(_gguf_field(reader, "llama.block_count"))
    heads = {"q_proj": int(_gguf_field(reader, "llama.attention.head_count"))}
    heads["k_proj"] = int(_gguf_field(reader, "llama.attention.head_count_kv", heads["q_proj"]))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    linears = {f"{names.get_name(hf)}.weight": hf for b in range(n_blocks)
               for hf in (f"model.layers.{b}.{suffix}" for suffix in LLAMA_LINEARS)}
    tensors = {t.name: t for t in reader.tensors if t.name in linears}
    for name, tensor in sorted(tensors.items()):
        kind = tensor.tensor_type.name
        if kind not in GGUF_QUANT_BITS and kind not in GGUF_FLOAT_TYPES:
            # K-quants (super-blocks of 256 with quantized sub-scales) and the others are not a quantlab grid:
            # refused rather than dequantized and evaluated as if quantlab had quantized them.
            raise CheckpointError(f"{file}: {name} is {kind}, which has no quantlab grid; quantlab reads GGUF "
                                  "block Linears in Q4_0, Q8_0 or float (re-quantize with llama-quantize to Q4_0 or Q8_0)")
    kinds = sorted({t.tensor_type.name for t in tensors.values() if t.tensor_type.name in GGUF_QUANT_BITS})
    if not kinds:
        raise CheckpointError(f"{file} has no Q4_0 or Q8_0 block Linears: it is a float model; "
                              "evaluate it as the spec's model or a float scheme instead")
    if len(kinds) > 1:
        raise CheckpointError(f"{file} mixes {' and '.join(kinds)} block Linears; quantlab evaluates one scheme "
                              "per model (re-quantize with llama-quantize --pure)")
    bits = GGUF_QUANT_BITS[kinds[0]]
    # Q4_0 codes span [-8, 7] and Q8_0's int8 storage [-128, 127]: the full grid, unless quantlab's own export
    # says the codes were restricted (then _checked holds the file to it).
    grid = _gguf_field(reader, "quantlab_export.grid", "full")
    scheme = Scheme(bits, group_size=GGUF_BLOCK, grid=grid if grid in ("full", "restricted") else "full")
    qtensors, nbytes = {}, {}
    for name, tensor in sorted(tensors.items()):
        if tensor.tensor_type.name not in GGUF_QUANT_BITS:
            continue
        hf = linears[name]
        codes, scales = gguf_codes(tensor.data, bits)
        head_count = heads.get(hf.rpartition(".")[2])
        if head_count:   # llama.cpp stores q/k rows in its rotary order
            codes, scales = _llama_unpermute(codes, head_count), _llama_unpermute(scales, head_count)
        qtensors[hf] = _checked(file, hf, QTensor(_narrow(codes.contiguous(), scheme), scales.contiguous(), None, scheme))
        nbytes[hf] = int(tensor.n_bytes)
    return qtensors, scheme, nbytes


def gguf_codes(blocks, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q8_0 rows (out, in/32 * block bytes, uint8) -> (codes (out, in) int16, float16 scales (out, in/32)).

    ggml-quants.h: block_q4_0 is a float16 d then 16 bytes, byte j holding weight j in its low nibble and
    weight j+16 in its high nibble, each stored q + 8; block_q8_0 is d then 32 int8 codes. Weight = q * d."""
    import numpy as np

    rows = np.ascontiguousarray(blocks, dtype=np.uint8)
    width = 2 + (GGUF_BLOCK // 2 if bits == 4 else GGUF_BLOCK)
    out_features = rows.shape[0]
    rows = rows.reshape(out_features, -1, width)
    scales = np.ascontiguousarray(rows[..., :2]).view(np.float16)[..., 0]
    qs = rows[..., 2:]
    if bits == 4:
        codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).astype(np.int16) - 8
    else:
        codes = np.ascontiguousarray(qs).view(np.int8).astype(np.int16)
    return (torch.from_numpy(codes.reshape(out_features, -1).copy()),
            torch.from_numpy(scales.copy()))


# ----------------------------------------------------------------------------------------------
# Shared


def _reordering(g_idx: Optional[torch.Tensor], in_features: int, scheme: Scheme) -> Optional[torch.Tensor]:
    """A g_idx that only restates natural order is dropped (quantlab neither stores nor counts it)."""
    if g_idx is None or g_idx.numel() == 0 or (g_idx < 0).any():
        return None
    g_idx = g_idx.to(torch.long)
    return None if torch.equal(g_idx, group_index(in_features, scheme)) else g_idx


def _narrow(codes: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    return codes.to(torch.int8 if scheme.qmin < 0 or scheme.qmax < 128 else torch.int16)


def _checked(path, name: str, qt: QTensor, allow_v1_zero: bool = False) -> QTensor:
    """Codes (and zero points) inside the scheme's grid, or a one-line error saying what the file holds."""
    scheme = qt.scheme
    lo, hi = int(qt.codes.min()), int(qt.codes.max())
    if lo < scheme.qmin or hi > scheme.qmax:
        raise CheckpointError(f"{path}: {name}'s codes span [{lo}, {hi}] but the file claims {scheme.describe()}; "
                              "the checkpoint's metadata does not match its tensors")
    if qt.zeros is not None:
        # GPTQ v1 cannot store a zero of 0 (stored -1 wraps to 2^b-1), so a v1 kernel reads 2^b: keep it, exactly.
        top = scheme.qmax + (1 if allow_v1_zero else 0)
        if int(qt.zeros.min()) < 0 or int(qt.zeros.max()) > top:
            raise CheckpointError(f"{path}: {name}'s zero points leave [0, {top}]; the file is not {scheme.describe()}")
    return qt


def _assemble(directory: Path, gguf_file: Optional[str], qtensors: dict, scheme: Scheme, kind: str, uri: str,
              device: str, linear_nbytes: Optional[dict] = None):
    """Float model from the directory's config and unquantized tensors, quantized Linears set from qtensors.
    ``linear_nbytes``: each quantized Linear's bytes as the file stores them (default: from its QTensor)."""
    from quantlab.calibrate import QuantizedModel
    from quantlab.models.hf import wrap_hf

    module, tokenizer, weight_files = _float_module(directory, gguf_file, qtensors, kind)
    model = wrap_hf(module, tokenizer, uri, source={"kind": kind, "path": str(directory.resolve()),
                                                    **({"gguf_file": gguf_file} if gguf_file else {})})
    linear_names = set(model.all_linear_names())
    with torch.no_grad():
        for name, qt in qtensors.items():
            if name not in linear_names:
                raise CheckpointError(f"{uri}: quantized tensor {name} is not a block Linear of "
                                      f"{type(module).__name__}; the checkpoint does not match its config")
            linear = module.get_submodule(name)
            if tuple(linear.weight.shape) != qt.shape:
                raise CheckpointError(f"{uri}: {name} is {qt.shape} in the file but {tuple(linear.weight.shape)} "
                                      "in config.json's architecture")
            # Exactly quantlab's dequantization in float32: what quantlab evaluates for a quantized model.
            linear.weight.copy_(qt.dequantize().to(linear.weight.dtype))
    module.to(device)
    file_bytes = linear_nbytes or {name: _file_nbytes(qt) for name, qt in qtensors.items()}
    bytes_ = deployable_bytes(model, qtensors, scheme, KEEP_KINDS, linear_nbytes=file_bytes)
    bytes_["bytes_on_disk"] = sum(f.stat().st_size for f in weight_files)
    return QuantizedModel(base=model, scheme=scheme, method=kind, qtensors=qtensors, bytes=bytes_,
                          weights_in_base=True)


def _file_nbytes(qt: QTensor) -> int:
    """Bytes the checkpoint spends on one Linear: packed codes + scales (at their stored dtype) + zeros + g_idx."""
    n = qt.nbytes - 2 * qt.scales.numel() + qt.scales.numel() * qt.scales.element_size()
    return n


def _float_module(directory: Path, gguf_file: Optional[str], qtensors: dict, kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if gguf_file:
        # transformers' GGUF loader dequantizes with its own arithmetic; the Linears are then overwritten
        # with quantlab's dequantization of the same codes and scales.
        module = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32,
                                                      local_files_only=True)
        tokenizer = _tokenizer(directory, gguf_file=gguf_file)
        return module, tokenizer, [directory / gguf_file]
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # build the float architecture, not a quantized one
    config.dtype = torch.float32
    module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = _tensors(directory)
    quantized_keys = {k for name in qtensors for k in tensors if k.startswith(f"{name}.")}
    float_state = {k: v for k, v in tensors.items() if k not in quantized_keys}
    missing, unexpected = module.load_state_dict(float_state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False)
            and module.get_output_embeddings() is not None and k.startswith(_name_of(module, module.get_output_embeddings()))}
    missing = [k for k in missing if k not in tied and k.rpartition(".")[0] not in qtensors]
    # Buffers such as rotary inv_freq are recomputed, never stored.
    missing = [k for k in missing if k in dict(module.named_parameters())]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: tensors do not match config.json's {type(module).__name__} "
                              f"(missing {missing[:3]}, unexpected {sorted(unexpected)[:3]})")
    if tied:
        module.tie_weights()
    return module, _tokenizer(directory), sorted(directory.glob("*.safetensors"))


def _name_of(root, target) -> str:
    return next(name for name, m in root.named_modules() if m is target)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _tokenizer(directory: Path, gguf_file: Optional[str] = None):
    """The tokenizer saved in ``directory``; for a GGUF file without tokenizer files beside it, the one its
    metadata describes. Files beside a GGUF come first: transformers rebuilds a GGUF tokenizer as another
    class (GPT2Tokenizer for byte-level BPE), which the spec's model's tokenizer would not match."""
    from transformers import AutoTokenizer

    beside = not gguf_file or any((directory / name).is_file() for name in TOKENIZER_FILES)
    if gguf_file and not beside:
        import gguf

        if "tokenizer.ggml.model" not in gguf.GGUFReader(directory / gguf_file).fields:
            raise CheckpointError(f"{directory / gguf_file} has no tokenizer metadata and no tokenizer files beside "
                                  f"it; save the model's tokenizer into {directory} (tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                             **({} if beside else {"gguf_file": gguf_file}))
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{directory}: no usable tokenizer ({type(error).__name__}); save the tokenizer "
                              "files (tokenizer.json, tokenizer_config.json) next to the weights") from None
