"""The byte accountant: one answer to "how big is this deployed model", for every scheme and keep."""
import pytest
import torch

from quantlab.accounting import deployable_bytes, float_element_bytes, kept_module_values
from quantlab.calibrate import quantize_model
from quantlab.quant import PRESETS, quantize_rtn


def quantized_linears(model, scheme):
    return {n: quantize_rtn(model.module.get_submodule(n).weight.detach(), scheme) for n in model.all_linear_names()}


def test_float_schemes_count_every_parameter_at_their_dtype(minigpt):
    params = sum(p.numel() for p in minigpt.module.parameters())  # tied lm_head counted once by parameters()
    assert deployable_bytes(minigpt, {}, PRESETS["fp32"], keep=[])["bytes_total"] == 4 * params
    assert deployable_bytes(minigpt, {}, PRESETS["fp16"], keep=[])["bytes_total"] == 2 * params


def test_integer_schemes_count_packed_linears_and_kept_kinds_in_float16(minigpt):
    int4 = PRESETS["int4-g64"]
    qtensors = quantized_linears(minigpt, int4)
    kept = deployable_bytes(minigpt, qtensors, int4, keep=["embeddings", "lm_head", "norms"])
    assert kept["bytes_linear"] == sum(q.nbytes for q in qtensors.values())
    assert kept["bits_per_weight"] == pytest.approx(8 * kept["bytes_linear"] / kept["params_linear"])
    # Dropping every kind from keep stores them in float32: twice the bytes for everything but Linears
    # (Linear biases stay float16 either way).
    dropped = deployable_bytes(minigpt, qtensors, int4, keep=[])
    sizes = float_element_bytes(minigpt, [], int4)
    other_fp32 = sum(p.numel() for p in minigpt.module.parameters() if sizes.get(id(p)) == 4)
    assert dropped["bytes_total"] - kept["bytes_total"] == 2 * other_fp32 > 0


def test_kept_modules_are_stored_in_float16_quantized_weights_left_out_and_the_model_unchanged(make_minigpt):
    model = make_minigpt()
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    quantized = set(model.all_linear_names())
    values = kept_module_values(model, quantized, keep=["embeddings", "lm_head", "norms"])
    for name, p in model.module.named_parameters():
        assert p.equal(before[name])
        if name.removesuffix(".weight") in quantized:
            assert name not in values
        else:
            assert values[name].dtype == torch.float16 and values[name].float().equal(before[name].half().float())


def test_quantize_model_reports_the_accountants_bytes_for_the_keep_it_was_given(minigpt):
    # quant.model_bytes once counted every kept kind as float16 whatever `keep` said, so a spec with
    # keep: [] showed fewer bytes than it deployed.
    int4 = PRESETS["int4-g64"]
    for keep in ([], ["embeddings"], ["embeddings", "lm_head", "norms"]):
        quantized = quantize_model(minigpt, int4, None, keep=keep)
        assert quantized.bytes == deployable_bytes(quantized.model, quantized.qtensors, int4, keep)
    assert (quantize_model(minigpt, int4, None, keep=[]).bytes["bytes_total"]
            > quantize_model(minigpt, int4, None).bytes["bytes_total"])


def test_tied_parameters_are_counted_once_and_file_layouts_can_override_a_linears_bytes(minigpt):
    int4 = PRESETS["int4-g64"]
    qtensors = quantized_linears(minigpt, int4)
    base = deployable_bytes(minigpt, qtensors, int4, keep=["embeddings", "lm_head", "norms"])
    unique = sum(p.numel() for p in minigpt.module.parameters())
    assert base["params_total"] == unique
    name = next(iter(qtensors))
    overridden = deployable_bytes(minigpt, qtensors, int4, keep=["embeddings", "lm_head", "norms"],
                                  linear_nbytes={name: qtensors[name].nbytes + 100})
    assert overridden["bytes_total"] == base["bytes_total"] + 100
