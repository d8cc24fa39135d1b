"""Import of quantized checkpoints written by other tools' code, on tiny random Llama models (nothing downloaded).

compressed-tensors: a model quantized and compressed by compressed-tensors' own apply_quantization_config
and ModelCompressor. GPTQ: a directory packed here the way the reference GPTQ code (AutoGPTQ's
QuantLinear.pack) lays out qweight/qzeros/scales/g_idx, written independently of quantlab's reader.
"""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config)
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from quantlab import export  # noqa: E402
from quantlab.calibrate import quantize_model  # noqa: E402
from quantlab.models.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from quantlab.models.hf import wrap_hf  # noqa: E402
from quantlab.testing import TINY_VOCAB, tiny_llama, tiny_tokenizer  # noqa: E402
from quantlab.quant import Scheme, quantize_rtn  # noqa: E402

VOCAB = TINY_VOCAB
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))


LINEARS = [f"model.layers.{b}.{n}" for b in range(2) for n in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def compress_with_compressed_tensors(directory, symmetric: bool):
    """Quantize with compressed-tensors' own lifecycle (min-max scales per group of 32), compress with
    ModelCompressor and save: the checkpoint llm-compressor would write. Returns {name: (codes, scales, zeros)}
    computed by compressed_tensors' own quantize()."""
    model = tiny_llama()
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=32)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"], format="pack-quantized")
    apply_quantization_config(model, config)
    expected = {}
    with torch.no_grad():
        for name in LINEARS:
            module = model.get_submodule(name)
            groups = module.weight.reshape(module.weight.shape[0], -1, 32)
            if symmetric:
                scale, zero = (groups.abs().amax(-1) / 7.5).half(), None
            else:
                lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
                scale = ((hi - lo) / 15).half()
                zero = (torch.round(-lo / scale.float()) - 8).clamp(-8, 7).to(torch.int8)
                module.weight_zero_point.copy_(zero)
            module.weight_scale.copy_(scale)
            codes = ct_quantize(module.weight, scale, zero, args, dtype=torch.int8)
            expected[name] = (codes, scale, zero)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    tiny_tokenizer().save_pretrained(directory)
    return expected


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_reads_a_compressed_tensors_checkpoint(tmp_path, symmetric):
    expected = compress_with_compressed_tensors(tmp_path, symmetric)
    quantized = load_checkpoint(f"hf:{tmp_path}")
    assert quantized.method == "compressed-tensors" and sorted(quantized.qtensors) == sorted(LINEARS)
    # Not quantlab's export, so no claim of the restricted grid: symmetric codes may use -8.
    assert quantized.scheme == Scheme(4, group_size=32, symmetric=symmetric,
                                      grid="full" if symmetric else "restricted")
    shift = 0 if symmetric else 8
    for name, (codes, scales, zeros) in expected.items():
        qt = quantized.qtensors[name]
        assert torch.equal(qt.codes.to(torch.int16), codes.to(torch.int16) + shift), name
        assert torch.equal(qt.scales, scales)
        if zeros is not None:
            assert torch.equal(qt.zeros.to(torch.int16), zeros.to(torch.int16) + shift)
        assert torch.equal(quantized.model.module.get_submodule(name).weight, qt.dequantize())
    assert quantized.bytes["bytes_on_disk"] == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    if symmetric:   # transformers' own loader (asymmetric needs dequantize=True, see test_export.py)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path)
        with torch.no_grad():
            diff = float((reference(input_ids=TOKENS).logits - quantized.model.logits(TOKENS)).abs().max())
        print(f"compressed-tensors import vs transformers: max |logit diff| = {diff:.3g}")
        assert diff <= 1e-5


def test_quantlab_export_reads_back_exactly(tmp_path):
    model = wrap_hf(tiny_llama(), tiny_tokenizer(), "tiny-llama")
    calibration = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    quantized = quantize_model(model, Scheme(4, group_size=32), calibration, method="gptq", act_order=True)
    export.export_compressed_tensors(quantized, tmp_path / "out")
    back = load_checkpoint(f"hf:{tmp_path / 'out'}")
    assert back.scheme == quantized.scheme   # restricted grid, from quantlab's metadata, checked on the codes
    for name, qt in quantized.qtensors.items():
        assert torch.equal(back.qtensors[name].codes, qt.codes) and torch.equal(back.qtensors[name].g_idx, qt.g_idx)
    assert torch.equal(back.model.logits(TOKENS), quantized.model.logits(TOKENS))
    assert back.bytes["bytes_linear"] == quantized.bytes["bytes_linear"]


def test_restricted_claim_with_minus_eight_is_refused(tmp_path):
    model = wrap_hf(tiny_llama(), tiny_tokenizer(), "tiny-llama")
    quantized = quantize_model(model, Scheme(4, group_size=32, grid="full"), None)
    # RTN on the full grid rarely reaches -8 (the rounded-up float16 scale keeps |w|/scale under 7.5): put one there.
    quantized.qtensors[LINEARS[0]].codes[0, 0] = -8
    directory = export.export_compressed_tensors(quantized, tmp_path / "out").path
    config = json.loads((directory / "config.json").read_text())
    config["quantlab_export"]["grid"] = "restricted"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"codes span \[-8, 7\] but the file claims INT4 group 32 sym \[-7, 7\]"):
        load_checkpoint(f"hf:{directory}")


# ----------------------------------------------------------------------------------------------
# GPTQ


def gptq_pack_rows(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ QuantLinear.pack: row i of the result holds input rows i*k .. i*k+k-1, lowest bits first."""
    k = 32 // bits
    w = intweight.to(torch.int64)
    packed = torch.zeros(w.shape[0] // k, w.shape[1], dtype=torch.int64)
    for j in range(k):
        packed |= w[j::k] << (bits * j)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)   # the same 32 bits, as int32


def write_gptq_dir(directory, symmetric: bool, checkpoint_format: str, act_order: bool):
    """A GPTQ checkpoint of the tiny Llama, 4-bit groups of 32, from quantlab RTN codes (full grid when symmetric,
    so zero = 8). Returns {name: QTensor} as written."""
    model = tiny_llama()
    scheme = Scheme(4, group_size=32, symmetric=symmetric, grid="full" if symmetric else "restricted")
    state = {k: v for k, v in model.state_dict().items()}
    written = {}
    for name in LINEARS:
        weight = state.pop(f"{name}.weight")
        out_features, in_features = weight.shape
        g_idx = None
        if act_order:   # a column permutation with whole groups of 32, like GPTQ desc_act
            order = torch.randperm(in_features, generator=torch.Generator().manual_seed(3))
            g_idx = torch.empty(in_features, dtype=torch.long)
            g_idx[order] = torch.arange(in_features) // 32
        qt = quantize_rtn(weight, scheme, g_idx)
        if not symmetric:
            qt.zeros[0, 0] = 0   # the zero v1 cannot store (random weights rarely give one)
        unsigned = qt.codes.to(torch.int16) + (8 if symmetric else 0)
        zeros = torch.full(qt.scales.shape, 8) if symmetric else qt.zeros.to(torch.int64)
        stored = (zeros - (1 if checkpoint_format == "gptq" else 0)) & 0xF
        state[f"{name}.qweight"] = gptq_pack_rows(unsigned.t(), 4)
        # qzeros (n_groups, out/8): packed along the output dimension.
        state[f"{name}.qzeros"] = gptq_pack_rows(stored, 4).t().contiguous()
        state[f"{name}.scales"] = qt.scales.t().contiguous()
        state[f"{name}.g_idx"] = (g_idx if g_idx is not None else torch.arange(in_features) // 32).to(torch.int32)
        written[name] = qt
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    (directory / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 32, "desc_act": act_order, "sym": symmetric, "checkpoint_format": checkpoint_format}))
    tiny_tokenizer().save_pretrained(directory)
    return written


@pytest.mark.parametrize("symmetric, fmt, act_order", [(True, "gptq", True), (True, "gptq", False),
                                                       (False, "gptq_v2", False), (False, "gptq", True)])
def test_reads_a_gptq_checkpoint(tmp_path, symmetric, fmt, act_order):
    written = write_gptq_dir(tmp_path, symmetric, fmt, act_order)
    quantized = load_checkpoint(f"hf:{tmp_path}")
    assert quantized.method == "gptq"
    for name, qt in written.items():
        got = quantized.qtensors[name]
        assert torch.equal(got.codes.to(torch.int16), qt.codes.to(torch.int16)), name
        assert torch.equal(got.scales, qt.scales)
        if fmt == "gptq" and not symmetric:
            # v1 stores zero - 1, so a zero of 0 comes back as 16, as the v1 kernel computes; others exact.
            assert (qt.zeros == 0).any()
            assert torch.equal(got.zeros.to(torch.int16), torch.where(qt.zeros == 0, 16, qt.zeros).to(torch.int16))
            continue
        assert (got.zeros is None) == symmetric and (got.zeros is None or torch.equal(got.zeros, qt.zeros))
        assert (got.g_idx is None) == (not act_order)
        if act_order:
            assert torch.equal(got.g_idx, qt.g_idx)
        assert torch.equal(quantized.model.module.get_submodule(name).weight, qt.dequantize())


def test_gptq_sym_with_varying_zeros_is_refused(tmp_path):
    write_gptq_dir(tmp_path, symmetric=False, checkpoint_format="gptq_v2", act_order=False)
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    (tmp_path / "quantize_config.json").write_text(json.dumps({**config, "sym": True}))
    with pytest.raises(CheckpointError, match="quantize_config says sym but"):
        load_checkpoint(f"hf:{tmp_path}")


def test_not_what_it_claims(tmp_path):
    float_dir = tmp_path / "float"
    tiny_llama().save_pretrained(float_dir)
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_checkpoint(f"hf:{float_dir}")
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (float_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no tensor is named \\*.qweight"):
        load_checkpoint(f"hf:{float_dir}")
    with pytest.raises(ValueError, match="use hf:DIR"):
        load_checkpoint(f"onnx:{float_dir}")


# ----------------------------------------------------------------------------------------------
# GGUF written by the gguf library (llama.cpp's Python package), not by quantlab's export


def write_gguf_with_the_gguf_library(path, module, linear_types: dict, default: str = "Q4_0"):
    """The tiny Llama as llama.cpp's convert_hf_to_gguf.py lays it out: its metadata keys, q/k rows permuted into
    llama.cpp's rotary order, each block Linear as ``linear_types.get(HF name, default)``: Q4_0 / Q8_0 quantized
    by gguf.quants.quantize (the library's port of ggml-quants.c), F16, or Q4_K as raw zero bytes (the library
    cannot quantize K-quants; the reader must refuse the type before reading any block)."""
    import gguf
    import numpy as np

    cfg = module.config
    writer = export.llama_gguf_writer(path, cfg)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    written = {}
    for key, value in module.state_dict().items():
        base, _, suffix = key.rpartition(".")
        data = value.detach().to(torch.float32)
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(base.rpartition(".")[2])
        if heads:
            data = export._llama_permute(data, heads)
        data = data.numpy()
        name = f"{names.get_name(base)}.{suffix}"
        kind = linear_types.get(base, default) if base in LINEARS else "F32"
        if kind in ("Q4_0", "Q8_0"):
            blocks = gguf.quants.quantize(data, gguf.GGMLQuantizationType[kind])
            writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
            written[base] = (kind, data)
        elif kind == "Q4_K":   # 144 bytes per 256 weights
            writer.add_tensor(name, np.zeros((data.shape[0], data.shape[1] // 256 * 144), np.uint8),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        else:
            writer.add_tensor(name, data.astype(np.float16 if kind == "F16" else np.float32))
            written[base] = (kind, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def library_codes(rows, kind: str) -> torch.Tensor:
    """The codes gguf.quants.quantize picks, restated from its code (quants.py): Q4_0 scales by the signed
    value of largest magnitude over -8 and truncates x/d + 8.5 into [0, 15]; Q8_0 rounds x/(amax/127)."""
    import numpy as np

    blocks = rows.reshape(-1, 32)
    if kind == "Q4_0":
        peak = np.take_along_axis(blocks, abs(blocks).argmax(axis=-1, keepdims=True), axis=-1)
        d = peak / -8
        inverse = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
        q = np.trunc(blocks * inverse + np.float32(8.5)).astype(np.uint8).clip(0, 15).astype(np.int16) - 8
    else:
        d = abs(blocks).max(axis=1, keepdims=True) / 127
        inverse = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
        q = np.round(blocks * inverse).astype(np.int16)   # np_roundf: halves away from zero; ties never occur here
    return torch.from_numpy(q.reshape(rows.shape))


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_reads_a_gguf_quantized_by_the_gguf_library(tmp_path, kind):
    import gguf

    module = tiny_llama()
    kept_float = "model.layers.1.mlp.down_proj"
    written = write_gguf_with_the_gguf_library(tmp_path / "model.gguf", module, {kept_float: "F16"}, default=kind)
    tiny_tokenizer().save_pretrained(tmp_path)
    quantized = load_checkpoint(f"gguf:{tmp_path / 'model.gguf'}")
    assert quantized.method == "gguf"
    # Not quantlab's export: no claim of a restricted grid (Q4_0 uses -8 whenever a block's peak is positive).
    assert quantized.scheme == Scheme(4 if kind == "Q4_0" else 8, group_size=32, grid="full")
    # An F16 block Linear is loaded as it is: float, no QTensor, not counted as quantized.
    assert sorted(quantized.qtensors) == sorted(set(LINEARS) - {kept_float})
    float_weight = torch.from_numpy(written[kept_float][1]).half().float()
    assert torch.equal(quantized.model.module.get_submodule(kept_float).weight, float_weight)
    reader = {t.name: t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    n_heads = {"q_proj": 4, "k_proj": 2}
    for name, qt in quantized.qtensors.items():
        rows = written[name][1]
        codes = library_codes(rows, kind)
        library_values = torch.from_numpy(gguf.quants.dequantize(
            gguf.quants.quantize(rows, gguf.GGMLQuantizationType[kind]), gguf.GGMLQuantizationType[kind]).copy())
        heads = n_heads.get(name.rpartition(".")[2])
        if heads:   # the file is in llama.cpp's q/k row order, quantlab's QTensor in Hugging Face's
            codes, library_values = export._llama_unpermute(codes, heads), export._llama_unpermute(library_values, heads)
        assert torch.equal(qt.codes.to(torch.int16), codes), name
        assert torch.equal(qt.dequantize(), library_values), name
        assert torch.equal(quantized.model.module.get_submodule(name).weight, qt.dequantize()), name
    if kind == "Q4_0":
        assert min(int(qt.codes.min()) for qt in quantized.qtensors.values()) == -8
    # Bytes are the file's own tensor sizes: 18 (Q4_0) or 34 (Q8_0) bytes per 32 weights, plus the F16 Linear's
    # 2 bytes a weight (the accounting counts a float block Linear as float16).
    per_block = 18 if kind == "Q4_0" else 34
    quantized_bytes = sum(qt.codes.numel() // 32 * per_block for qt in quantized.qtensors.values())
    assert quantized_bytes == sum(int(t.n_bytes) for t in reader.values() if t.tensor_type.name == kind)
    assert quantized.bytes["bytes_linear"] == quantized_bytes + 2 * float_weight.numel() == sum(
        int(reader[f"{gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(n)}.weight"].n_bytes) for n in LINEARS)
    # transformers' own GGUF loader (its own dequantizer) computes the same model.
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        diff = float((reference(input_ids=TOKENS).logits - quantized.model.logits(TOKENS)).abs().max())
    assert diff <= 1e-5


@pytest.mark.parametrize("types, message", [
    ({"model.layers.0.self_attn.q_proj": "Q4_K"}, r"blk\.0\.attn_q\.weight is Q4_K, which has no quantlab grid"),
    ({"model.layers.1.mlp.up_proj": "Q8_0"}, r"mixes Q4_0 and Q8_0 block Linears"),
    ({name: "F16" for name in LINEARS}, r"no Q4_0 or Q8_0 block Linears: it is a float model"),
], ids=["k-quant", "mixed", "float"])
def test_gguf_types_quantlab_cannot_represent_are_refused(tmp_path, types, message):
    # Widths of 256 so that a K-quant super-block fits a row.
    write_gguf_with_the_gguf_library(tmp_path / "model.gguf", tiny_llama(hidden_size=256, intermediate_size=256), types)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(f"gguf:{tmp_path / 'model.gguf'}")


def test_gguf_without_a_tokenizer_says_where_to_put_one(tmp_path):
    write_gguf_with_the_gguf_library(tmp_path / "model.gguf", tiny_llama(), {})
    with pytest.raises(CheckpointError, match=r"no tokenizer metadata and no tokenizer files beside it; save"):
        load_checkpoint(f"gguf:{tmp_path / 'model.gguf'}")
