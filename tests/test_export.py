"""Export to compressed-tensors on tiny random Llama and Qwen2 models built in-process (nothing downloaded).

Each case quantizes with quantlab, exports, loads the directory back with transformers'
AutoModelForCausalLM.from_pretrained on CPU and compares logits with the ones quantlab evaluated; the
packed codes are read straight from the safetensors file and compared with quantlab's codes.
"""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, CompressedTensorsConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    Qwen2Config, Qwen2ForCausalLM)

from quantlab import export  # noqa: E402
from quantlab.calibrate import quantize_model  # noqa: E402
from quantlab.models.checkpoint import load_checkpoint  # noqa: E402
from quantlab.models.hf import wrap_hf  # noqa: E402
from quantlab.testing import TINY_VOCAB, tiny_tokenizer  # noqa: E402
from quantlab.quant import FloatScheme, Scheme  # noqa: E402

VOCAB = TINY_VOCAB


def tiny_model(family: str, hidden: int = 64, intermediate: int = 128):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=1)
    if family == "llama":
        module = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":   # q/k/v carry biases; tied embeddings exercise the dropped lm_head copy
        module = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        module = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=1))
    return wrap_hf(module, tiny_tokenizer(), f"tiny-{family}")


CASES = {
    # name: (scheme, quantize_model keyword arguments)
    "rtn-g32": (Scheme(4, group_size=32), dict(method="rtn")),
    "gptq-g32-act-order": (Scheme(4, group_size=32), dict(method="gptq", act_order=True)),
    "gptq-g64-act-order-full": (Scheme(4, group_size=64, grid="full"), dict(method="gptq", act_order=True)),
    "rtn-g64-asym": (Scheme(4, group_size=64, symmetric=False), dict(method="rtn")),
    "gptq-g32-asym": (Scheme(4, group_size=32, symmetric=False), dict(method="gptq")),
    "gptq-g32-asym-act-order-static": (Scheme(4, group_size=32, symmetric=False),
                                       dict(method="gptq", act_order=True, static_groups=True)),
    "rtn-int8-channel": (Scheme(8), dict(method="rtn")),
}
CALIBRATION = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tiny_models():
    return {family: tiny_model(family) for family in ("llama", "qwen2")}


def load_back(directory, asymmetric: bool):
    """transformers' own loader. Asymmetric pack-quantized needs dequantize=True with transformers 5.23 +
    compressed-tensors 0.18: the default path builds the packed module on the meta device without
    packing the zero point, then refuses the checkpoint's (correctly) packed weight_zero_point."""
    if not asymmetric:
        return AutoModelForCausalLM.from_pretrained(directory)
    with pytest.warns(UserWarning, match="already has a `quantization_config`"):
        return AutoModelForCausalLM.from_pretrained(directory,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_round_trip_through_transformers(tiny_models, family, case, tmp_path, record_property):
    scheme, kwargs = CASES[case]
    quantized = quantize_model(tiny_models[family], scheme, CALIBRATION, **kwargs)
    info = export.export_compressed_tensors(quantized, tmp_path / "out")

    loaded = load_back(info.path, asymmetric=not scheme.symmetric)
    with torch.no_grad():
        got = loaded(input_ids=TOKENS).logits.float()
    want = quantized.model.logits(TOKENS)
    diff = float((got - want).abs().max())
    record_property("max_abs_logit_diff", diff)
    print(f"{family} {case}: max |logit diff| = {diff:.3g}")
    # Symmetric: compressed-tensors dequantizes code * scale exactly, so the logits are quantlab's to the
    # last bit (diff 0 measured). Asymmetric goes through dequantize=True, which forms (code - zero) * scale
    # in the float16 scale dtype: float16 rounding of the weights, ~3e-4 on these logits.
    assert diff <= (1e-5 if scheme.symmetric else 2e-3)

    # The codes in the file are quantlab's codes.
    tensors = load_file(info.path / "model.safetensors")
    shift = 0 if scheme.symmetric else 2 ** (scheme.bits - 1)
    for name, qt in quantized.qtensors.items():
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], scheme.bits, torch.Size(qt.shape))
        assert torch.equal(codes.to(torch.int16) + shift, qt.codes.to(torch.int16)), name
        assert torch.equal(tensors[f"{name}.weight_scale"], qt.scales)
        assert (f"{name}.weight_g_idx" in tensors) == (qt.g_idx is not None)
        if qt.g_idx is not None:
            assert torch.equal(tensors[f"{name}.weight_g_idx"].long(), qt.g_idx)
        assert (f"{name}.weight_zero_point" in tensors) == (not scheme.symmetric)
        assert f"{name}.weight" not in tensors
    if kwargs.get("act_order") and not kwargs.get("static_groups"):
        assert any(qt.g_idx is not None for qt in quantized.qtensors.values())

    config = json.loads((info.path / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (scheme.bits, scheme.symmetric)
    assert config["quantlab_export"]["code_range"] == [scheme.qmin, scheme.qmax]
    if scheme.symmetric and scheme.grid == "restricted":
        assert "never use -8" in config["quantlab_export"]["note"] or scheme.bits != 4

    # Sizes: the safetensors file, and the quantized tensors = quantlab's deployable bytes + weight_shape.
    assert info.bytes_on_disk == sum(p.stat().st_size for p in info.path.glob("*.safetensors"))
    assert info.bytes_quantized == quantized.bytes["bytes_linear"] + 16 * len(quantized.qtensors)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(info.files)


def test_refuses_asymmetric_with_act_order_groups(tiny_models, tmp_path):
    quantized = quantize_model(tiny_models["llama"], Scheme(4, group_size=32, symmetric=False), CALIBRATION,
                               method="gptq", act_order=True)
    assert any(qt.g_idx is not None for qt in quantized.qtensors.values())
    with pytest.raises(ValueError, match="static_groups: true"):
        export.export_compressed_tensors(quantized, tmp_path / "out")


def test_refuses_group_size_that_does_not_divide_the_width():
    model = tiny_model("llama", hidden=576, intermediate=64)
    ok, reason = export.servability(Scheme(4, group_size=128), model)
    assert not ok and "576" in reason and "group_size 128" in reason
    assert export.servability(Scheme(4, group_size=64), model) == (True, "")


def test_refusals_name_the_reason(tiny_models):
    llama = tiny_models["llama"]
    cases = {
        FloatScheme("float16"): "float scheme",
        Scheme(3, group_size=32): "INT3",
        Scheme(8, granularity="tensor"): "per-tensor",
    }
    for scheme, words in cases.items():
        ok, reason = export.servability(scheme, llama)
        assert not ok and words in reason, reason
    ok, reason = export.servability(Scheme(4, group_size=32), llama, format="onnx")
    assert not ok and "unknown export format" in reason


def test_refuses_gpt2_conv1d():
    ok, reason = export.servability(Scheme(4, group_size=32), tiny_model("gpt2"))
    assert not ok and "Conv1D" in reason


def test_refuses_minigpt():
    from quantlab.models.registry import load_model

    ok, reason = export.servability(Scheme(4, group_size=64), load_model("minigpt-shakespeare"))
    assert not ok and "not a transformers architecture" in reason


def test_export_raises_with_the_reason(tiny_models, tmp_path):
    quantized = quantize_model(tiny_models["llama"], FloatScheme("float16"), None)
    with pytest.raises(ValueError, match="no integer codes"):
        export.export_compressed_tensors(quantized, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_written_atomically(tiny_models, tmp_path, monkeypatch):
    quantized = quantize_model(tiny_models["llama"], Scheme(4, group_size=32), None)
    target = tmp_path / "out"

    def crash(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_save_tokenizer", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_compressed_tensors(quantized, target)
    assert list(tmp_path.iterdir()) == []   # no target, no partial sibling
    monkeypatch.undo()
    export.export_compressed_tensors(quantized, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_compressed_tensors(quantized, target)
    info = export.export_compressed_tensors(quantized, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and info.n_quantized == 14


# ----------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("scheme, ggml_type", [(Scheme(4, group_size=32, grid="full"), "Q4_0"),
                                               (Scheme(4, group_size=32), "Q4_0"),
                                               (Scheme(8, group_size=32), "Q8_0")],
                         ids=["q4_0-full", "q4_0-restricted", "q8_0"])
def test_gguf_round_trip_through_transformers_and_quantlab(tiny_models, scheme, ggml_type, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    quantized = quantize_model(tiny_models["llama"], scheme, CALIBRATION, method="gptq")
    info = export.export_gguf(quantized, tmp_path / "model.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        diff = float((loaded(input_ids=TOKENS).logits - quantized.model.logits(TOKENS)).abs().max())
    print(f"llama gguf {info.metadata['ggml_type']}: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-5
    # The blocks hold quantlab's codes: the gguf library's own dequantizer gives code * scale (down_proj is
    # not row-permuted).
    tensors = {t.name: t for t in GGUFReader(info.path).tensors}
    block = tensors["blk.0.ffn_down.weight"]
    assert block.tensor_type.name == ggml_type
    qt = quantized.qtensors["model.layers.0.mlp.down_proj"]
    values = torch.from_numpy(dequantize(block.data, block.tensor_type).copy()).reshape(qt.shape)
    assert torch.equal(values, qt.dequantize())
    assert info.bytes_on_disk == info.path.stat().st_size

    # Read back by quantlab (tokenizer files beside the file): the same codes, scales and grid, q/k rows back in
    # Hugging Face order, and the logits quantlab evaluated, bit for bit.
    tiny_tokenizer().save_pretrained(tmp_path)
    back = load_checkpoint(f"gguf:{info.path}")
    assert back.method == "gguf" and back.scheme == scheme and sorted(back.qtensors) == sorted(quantized.qtensors)
    for name, qt in quantized.qtensors.items():
        assert torch.equal(back.qtensors[name].codes.to(torch.int16), qt.codes.to(torch.int16)), name
        assert torch.equal(back.qtensors[name].scales, qt.scales), name
    with torch.no_grad():
        assert torch.equal(back.model.logits(TOKENS), quantized.model.logits(TOKENS))
    # Q4_0 spends 18 bytes per 32 weights, Q8_0 34: exactly quantlab's accounting of the same scheme.
    assert back.bytes["bytes_linear"] == quantized.bytes["bytes_linear"] == info.bytes_quantized
    assert back.bytes["bytes_on_disk"] == info.bytes_on_disk


def test_gguf_refusals(tiny_models):
    llama = tiny_models["llama"]
    ok, reason = export.servability(Scheme(4, group_size=64), llama, format="gguf")
    assert not ok and "Q4_0" in reason
    ok, reason = export.servability(Scheme(4, group_size=32), tiny_models["qwen2"], format="gguf")
    assert not ok and "qwen2" in reason
    assert export.servability(Scheme(4, group_size=32), llama, format="gguf") == (True, "")


def test_a_model_transformers_loaded_from_gguf_exports_as_compressed_tensors(tiny_models, tmp_path):
    # SmolLM2 reaches quantlab this way: transformers keeps its GGUF quantizer on the float model, and
    # save_pretrained refused such a model ("not serializable") until the export hid it while saving.
    quantized = quantize_model(tiny_models["llama"], Scheme(8, group_size=32), None)
    export.export_gguf(quantized, tmp_path / "float.gguf")   # any GGUF the loader reads: the float model is built from it
    module = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="float.gguf", dtype=torch.float32)
    assert module.hf_quantizer is not None
    from_gguf = quantize_model(wrap_hf(module, tiny_tokenizer(), "tiny-llama-gguf"), Scheme(4, group_size=32), None)
    out = export.export_compressed_tensors(from_gguf, tmp_path / "ct").path
    assert module.hf_quantizer is not None and module.config.quantization_config is not None   # given back
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert float((loaded(input_ids=TOKENS).logits - from_gguf.model.logits(TOKENS)).abs().max()) <= 1e-5
