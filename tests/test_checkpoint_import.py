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
