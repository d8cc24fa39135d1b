"""The sequential calibration pipeline: what it quantizes, against which inputs, what it reports."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from quantlab import calibrate, paused
from quantlab.calibrate import InputStatistics, _input_groups, quantize_model
from quantlab.paused import PausedRun, RetainedMemory
from quantlab.gptq import gptq_quantize, relative_loss
from quantlab.models.base import LanguageModel
from quantlab.models.minigpt import CHECKPOINT_DIR, load_checkpoint
from quantlab.quant import PRESETS, FloatScheme, Scheme, quantize_rtn

INT4_G16 = Scheme(4, group_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minigpt(make_minigpt):
    """A 32-token context: the context-length checks below read it."""
    return make_minigpt(block_size=32)


def random_tokens(n: int, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gptq_result(minigpt):
    return quantize_model(minigpt, INT4_G16, random_tokens(8), method="gptq", heldout=random_tokens(4, seed=1))


def capture_input(model: LanguageModel, linear_name: str, tokens: torch.Tensor) -> torch.Tensor:
    """What ``linear_name`` reads when ``model`` runs on ``tokens``: (tokens, in)."""
    captured = []
    handle = model.module.get_submodule(linear_name).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            model.logits(tokens)
    finally:
        handle.remove()
    return torch.cat(captured)


# ----------------------------------------------------------------------------------------------
# What is quantized


def test_input_model_is_untouched(minigpt, gptq_result, make_minigpt):
    fresh = make_minigpt(block_size=32)
    for (name, p), (_, q) in zip(minigpt.module.named_parameters(), fresh.module.named_parameters()):
        assert torch.equal(p, q), name


def test_block_linears_hold_the_dequantized_weights(minigpt, gptq_result):
    assert set(gptq_result.qtensors) == set(minigpt.all_linear_names())
    materialized = gptq_result.materialize()
    for name, qtensor in gptq_result.qtensors.items():
        assert torch.equal(materialized.module.get_submodule(name).weight, qtensor.dequantize())


@pytest.mark.parametrize("scheme, method", [(PRESETS["int4-g64"], "gptq"), (PRESETS["fp16"], "float"),
                                            (FloatScheme("bfloat16"), "float")])
def test_the_quantized_model_computes_with_swapped_in_weights_exactly_as_a_copy_holding_them(minigpt, scheme, method):
    # No copy per scheme: the float model computes with the quantized weights swapped in per call.
    result = quantize_model(minigpt, scheme, random_tokens(4), method=method)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in minigpt.module.named_parameters()}
    assert result.model.module is minigpt.module
    with torch.no_grad():
        swapped = result.model.logits(random_tokens(2, seed=3))
        copied = result.materialize().logits(random_tokens(2, seed=3))
        float_logits = minigpt.logits(random_tokens(2, seed=3))
    assert torch.equal(swapped, copied)
    assert not torch.equal(swapped, float_logits)
    for name, p in minigpt.module.named_parameters():   # back to the float weights, in the same storage
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]), name


def test_an_evaluated_quantization_is_freed_with_its_last_reference(minigpt):
    # Not left to Python's cycle collector: a spec run evaluates one scheme after another, and each
    # scheme's codes staying until the collector happened to run grew its memory scheme by scheme.
    import gc
    import weakref

    from quantlab.evaluate import EvalPlan, evaluate

    quantized = quantize_model(minigpt, PRESETS["int4-g64"], None)
    gone = weakref.ref(quantized)
    codes = weakref.ref(next(iter(quantized.qtensors.values())).codes)
    plan = EvalPlan(random_tokens(1, seq_len=200)[0], seq_len=32, batch_size=2)
    gc.disable()
    try:
        evaluate(quantized.model, plan)
        del quantized
        assert gone() is None and codes() is None
    finally:
        gc.enable()


def test_a_call_that_fails_inside_the_model_still_gives_the_float_weights_back(minigpt, gptq_result):
    before = {name: p.detach().clone() for name, p in minigpt.module.named_parameters()}
    handle = minigpt.module.get_submodule("blocks.1.mlp.c_proj").register_forward_pre_hook(
        lambda module, args: (_ for _ in ()).throw(RuntimeError("fails mid-model")))
    try:
        with pytest.raises(RuntimeError, match="fails mid-model"), torch.no_grad():
            gptq_result.model.logits(random_tokens(2))
    finally:
        handle.remove()
    for name, p in minigpt.module.named_parameters():
        assert torch.equal(p, before[name]), name


def test_embeddings_norms_and_lm_head_are_not_quantized_only_stored_in_float16(minigpt, gptq_result):
    quantized = dict(gptq_result.materialize().module.named_parameters())
    for name, p in minigpt.module.named_parameters():
        if not any(name.startswith(linear + ".weight") for linear in gptq_result.qtensors):
            assert torch.equal(quantized[name], p.half().float()), name


def test_bytes_count_packed_linears_and_float16_for_the_rest(minigpt, gptq_result):
    linear_params = {n: minigpt.module.get_submodule(n).weight for n in gptq_result.qtensors}
    other = sum(p.numel() for p in minigpt.module.parameters() if all(p is not w for w in linear_params.values()))
    assert gptq_result.bytes["bytes_linear"] == sum(q.nbytes for q in gptq_result.qtensors.values())
    assert gptq_result.bytes["bytes_total"] == gptq_result.bytes["bytes_linear"] + 2 * other


def test_rtn_without_calibration_is_plain_rtn_per_layer(minigpt):
    result = quantize_model(minigpt, INT4_G16, None)
    for name, qtensor in result.qtensors.items():
        assert torch.equal(qtensor.codes, quantize_rtn(minigpt.module.get_submodule(name).weight, INT4_G16).codes)
    assert result.health == []
    assert all(layer["rel_loss"] is None for layer in result.layers.values())


@pytest.mark.parametrize("preset, element_bytes", [("fp16", 2), ("fp32", 4)])
def test_float_schemes_round_through_their_dtype(minigpt, preset, element_bytes):
    result = quantize_model(minigpt, PRESETS[preset], None)
    weight = minigpt.module.get_submodule("blocks.0.mlp.c_fc").weight
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[preset]
    assert torch.equal(result.materialize().module.get_submodule("blocks.0.mlp.c_fc").weight, weight.to(dtype).float())
    assert result.qtensors == {}
    assert result.bytes["bytes_total"] == element_bytes * sum(p.numel() for p in minigpt.module.parameters())


# ----------------------------------------------------------------------------------------------
# Against which inputs


class ToyBlock(nn.Module):
    """A Llama-shaped block: q, k, v read one tensor, gate and up read another."""

    def __init__(self, width: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.gate, self.up = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        x = x + self.o(self.q(x) * self.k(x) + self.v(x))
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class ToyModel(LanguageModel):
    def logits(self, tokens):
        x = self.module.embed(tokens)
        for block in self.module.blocks:
            x = block(x)
        return self.module.head(x)


def toy_model() -> ToyModel:
    torch.manual_seed(0)
    module = nn.Module()
    module.embed, module.blocks, module.head = nn.Embedding(256, 16), nn.ModuleList([ToyBlock(16)]), nn.Linear(16, 256)
    return ToyModel("toy", module.eval(), module.blocks, vocab_size=256, max_seq_len=32)


def test_linears_reading_the_same_tensor_form_one_group_in_execution_order():
    model = toy_model()
    with torch.no_grad():
        groups = _input_groups(model, 0, [model.block_inputs(random_tokens(2, 8))])
    assert [group.names for group in groups] == [["blocks.0.q", "blocks.0.k", "blocks.0.v"], ["blocks.0.o"],
                      ["blocks.0.gate", "blocks.0.up"], ["blocks.0.down"]]


def test_a_group_shares_one_hessian():
    layers = quantize_model(toy_model(), INT4_G16, random_tokens(4, 8), method="gptq").layers
    for statistic in ("h_cond", "input_absmax", "n_tokens"):
        assert layers["blocks.0.q"][statistic] == layers["blocks.0.k"][statistic] == layers["blocks.0.v"][statistic]
    assert layers["blocks.0.q"]["input_absmax"] != layers["blocks.0.o"]["input_absmax"]


@pytest.mark.parametrize("layer", ["blocks.0.attn.c_proj", "blocks.1.attn.c_attn"])
def test_layer_hessians_come_from_inputs_through_the_already_quantized_layers(minigpt, layer):
    # Coarse INT3 so quantized and float inputs differ clearly. blocks.0.attn.c_proj reads the output
    # of the quantized c_attn; blocks.1.attn.c_attn reads the output of the quantized block 0.
    scheme, tokens = Scheme(3, group_size=16), random_tokens(8)
    result = quantize_model(minigpt, scheme, tokens, method="rtn")
    W = minigpt.module.get_submodule(layer).weight
    W_rtn = quantize_rtn(W, scheme).dequantize()
    # The float model with only its Linears quantized: the kept modules' float16 storage is applied
    # after calibration, so it is not part of what the Hessians saw.
    only_linears = copy.deepcopy(minigpt)
    with torch.no_grad():
        for name, qtensor in result.qtensors.items():
            only_linears.module.get_submodule(name).weight.copy_(qtensor.dequantize())
    X_sequential = capture_input(only_linears, layer, tokens)
    X_float = capture_input(minigpt, layer, tokens)
    sequential = relative_loss(W, W_rtn, X_sequential.T @ X_sequential / X_sequential.shape[0])
    from_float_model = relative_loss(W, W_rtn, X_float.T @ X_float / X_float.shape[0])
    assert result.layers[layer]["rtn_rel_loss"] == pytest.approx(sequential, rel=1e-4)
    assert result.layers[layer]["rtn_rel_loss"] != pytest.approx(from_float_model, rel=1e-3)


class SharedLinearBlock(nn.Module):
    """One Linear called twice (weight sharing, a recurrent step), then an ordinary one."""

    def __init__(self, width: int):
        super().__init__()
        self.shared, self.out = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        x = x + self.shared(x)
        x = x + self.shared(torch.tanh(x))
        return x + self.out(x)


def shared_linear_model() -> ToyModel:
    torch.manual_seed(0)
    module = nn.Module()
    module.embed, module.blocks = nn.Embedding(256, 16), nn.ModuleList([SharedLinearBlock(16)])
    module.head = nn.Linear(16, 256)
    return ToyModel("shared", module.eval(), module.blocks, vocab_size=256, max_seq_len=32)


def test_a_linear_called_twice_is_quantized_once_on_the_hessian_of_both_calls():
    model, tokens = shared_linear_model(), random_tokens(4, 8)
    result = quantize_model(model, INT4_G16, tokens, method="gptq")
    # The shared Linear is the block's first layer, so both calls read float-model inputs.
    X = capture_input(model, "blocks.0.shared", tokens)                      # (2 * 4 * 8, 16)
    W = model.module.get_submodule("blocks.0.shared").weight.detach()
    expected = gptq_quantize(W, X.T @ X / X.shape[0], INT4_G16)
    layer = result.layers["blocks.0.shared"]
    assert layer["n_tokens"] == 2 * 4 * 8
    assert torch.equal(result.qtensors["blocks.0.shared"].codes, expected.qtensor.codes)
    assert layer["rel_loss"] == pytest.approx(expected.rel_loss, rel=1e-5)
    assert 0 < layer["rel_loss"] < layer["rtn_rel_loss"]


class RoutedBlock(nn.Module):
    """Two Linear experts, each token routed to one by the sign of its first feature."""

    def __init__(self, width: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, x):
        flat, out = x.reshape(-1, x.shape[-1]), torch.zeros_like(x).reshape(-1, x.shape[-1])
        route = (flat[:, 0] > 0).long()
        for i, expert in enumerate(self.experts):
            picked = route == i
            if picked.any():
                out[picked] = expert(flat[picked])
        return x + out.reshape(x.shape)


def test_an_expert_that_only_later_batches_reach_is_calibrated_on_their_tokens():
    torch.manual_seed(0)
    module = nn.Module()
    module.embed, module.blocks = nn.Embedding(256, 16), nn.ModuleList([RoutedBlock(16)])
    module.head = nn.Linear(16, 256)
    model = ToyModel("routed", module.eval(), module.blocks, vocab_size=256, max_seq_len=32)
    # Batch 0 (two windows) only holds tokens routed to expert 0, batch 1 only tokens routed to expert 1.
    to_second = module.embed.weight[:, 0] > 0
    first, second = torch.arange(256)[~to_second], torch.arange(256)[to_second]
    tokens = torch.cat([first[:16].reshape(2, 8), second[:16].reshape(2, 8)])
    result = quantize_model(model, INT4_G16, tokens, method="gptq", batch_size=2)
    assert result.health == []
    assert result.layers["blocks.0.experts.0"]["n_tokens"] == result.layers["blocks.0.experts.1"]["n_tokens"] == 16
    assert result.layers["blocks.0.experts.1"]["rel_loss"] < result.layers["blocks.0.experts.1"]["rtn_rel_loss"]


def test_running_mean_hessian_equals_the_batch_formula():
    X = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    stats = InputStatistics(6)
    for chunk in X.split(7):
        stats.add(chunk)
    assert torch.allclose(stats.hessian, X.T @ X / 100, rtol=1e-5, atol=1e-6)
    assert stats.n_tokens == 100
    assert torch.equal(stats.channel_absmax, X.abs().amax(dim=0))


def quantize_by_reruns(monkeypatch, *args, **kwargs):
    """quantize_model with every block quantized the way the pipeline did before the one-pass runs:
    the block rerun up to each group's input, then once more to propagate."""
    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "_quantize_block_in_one_pass",
                      lambda *args, memory: calibrate._quantize_block_by_reruns(*args))
        return quantize_model(*args, **kwargs)


def same_quantization(a, b) -> None:
    assert a.qtensors.keys() == b.qtensors.keys()
    for name in a.qtensors:
        assert torch.equal(a.qtensors[name].codes, b.qtensors[name].codes), name
        assert torch.equal(a.qtensors[name].scales, b.qtensors[name].scales), name
        without_seconds = [{k: v for k, v in result.layers[name].items() if k != "seconds"} for result in (a, b)]
        assert without_seconds[0] == without_seconds[1], name
    assert a.health == b.health


@pytest.mark.parametrize("options", [{}, {"act_order": True, "static_groups": True}])
def test_one_pass_gives_the_codes_and_statistics_of_rerunning_the_block_per_group(monkeypatch, minigpt, options):
    args = (minigpt, INT4_G16, random_tokens(8))
    kwargs = dict(method="gptq", heldout=random_tokens(4, seed=1), batch_size=3, **options)
    same_quantization(quantize_model(*args, **kwargs), quantize_by_reruns(monkeypatch, *args, **kwargs))


def test_one_pass_gives_the_codes_of_rerunning_the_block_on_a_llama(monkeypatch, tiny_llama_dir):
    from quantlab.models import load_model

    model = load_model(f"hf:{tiny_llama_dir}")
    tokens = torch.randint(0, model.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(method="gptq", batch_size=2, heldout=tokens[:2])
    same_quantization(quantize_model(model, INT4_G16, tokens, **kwargs),
                      quantize_by_reruns(monkeypatch, model, INT4_G16, tokens, **kwargs))


@pytest.mark.parametrize("options", [{}, {"act_order": True, "static_groups": True}, {"awq": True}])
def test_a_groups_linears_solved_together_get_the_codes_of_their_own_solves(monkeypatch, tiny_llama_dir, options):
    from quantlab.models import load_model

    model = load_model(f"hf:{tiny_llama_dir}")
    tokens = torch.randint(0, model.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    stacked = []
    shared = calibrate.gptq_quantize_shared

    def spy(weights, *args, **kwargs):
        stacked.append(len(weights))
        return shared(weights, *args, **kwargs)

    monkeypatch.setattr(calibrate, "gptq_quantize_shared", spy)
    together = quantize_model(model, INT4_G16, tokens, method="gptq", batch_size=2, **options)
    monkeypatch.setattr(calibrate, "_solve_group_together", lambda *args: {})
    alone = quantize_model(model, INT4_G16, tokens, method="gptq", batch_size=2, **options)
    assert stacked.count(3) == stacked.count(2) == len(model.blocks)     # q, k, v and gate, up per block
    assert together.qtensors.keys() == alone.qtensors.keys()
    for name in alone.qtensors:
        assert torch.equal(together.qtensors[name].codes, alone.qtensors[name].codes), name
        assert torch.equal(together.qtensors[name].scales, alone.qtensors[name].scales), name
        assert together.layers[name]["rel_loss"] == pytest.approx(alone.layers[name]["rel_loss"], rel=1e-5), name


def count_linear_calls(model: LanguageModel) -> tuple:
    """(calls per Linear name, a function that removes the counting hooks), counted on every copy of
    ``model``: deepcopy copies the hooks."""
    calls: dict = {}
    handles = []
    for name, module in model.module.named_modules():
        if isinstance(module, nn.Linear):
            def count(module, args, name=name):
                calls[name] = calls.get(name, 0) + 1
            handles.append(module.register_forward_pre_hook(count))
    return calls, lambda: [handle.remove() for handle in handles]


def test_every_linear_runs_once_per_calibration_batch(make_minigpt):
    model = make_minigpt(n_layer=3)
    calls, remove = count_linear_calls(model)
    try:
        quantize_model(model, INT4_G16, random_tokens(8), method="gptq", batch_size=2)
    finally:
        remove()
    # Four batches through each block once, plus the look at batch 0 that finds the block's groups.
    # Finding block 0's inputs runs no block, and the head never runs.
    expected = dict.fromkeys(model.all_linear_names(), 4 + 1)
    assert calls == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA); CI machines have none")
def test_a_model_on_a_cuda_device_is_quantized_there_with_the_codes_a_cpu_model_gets(make_minigpt):
    # Every tensor the engine makes follows the model's device: a CPU-only allocation fails here.
    cpu, cuda = make_minigpt(), make_minigpt()
    cuda.module.to("cuda")
    tokens = random_tokens(4)
    on_cpu = quantize_model(cpu, INT4_G16, tokens, method="rtn")
    on_cuda = quantize_model(cuda, INT4_G16, tokens.cuda(), method="gptq", act_order=True)
    assert all(qt.codes.device.type == "cuda" for qt in on_cuda.qtensors.values())
    for name, qtensor in quantize_model(cuda, INT4_G16, tokens.cuda(), method="rtn").qtensors.items():
        assert torch.equal(qtensor.codes.cpu(), on_cpu.qtensors[name].codes), name
    with torch.no_grad():
        assert torch.isfinite(on_cuda.model.logits(tokens.cuda())).all()


def test_an_error_inside_a_paused_block_run_reaches_the_caller_and_leaves_no_run_behind(make_minigpt):
    import threading

    model = make_minigpt()

    def fail(module, args):
        if PausedRun.current() is not None:
            raise ValueError("broken block")

    handle = model.module.get_submodule("blocks.1.mlp.c_proj").register_forward_pre_hook(fail)
    try:
        with pytest.raises(ValueError, match="broken block"):
            quantize_model(model, INT4_G16, random_tokens(4), method="gptq", batch_size=2)
    finally:
        handle.remove()
    assert not [t for t in threading.enumerate() if t.name.startswith("quantlab-block")]


def test_retained_memory_hands_freed_memory_back_only_once_past_its_budget(monkeypatch):
    readings = iter([1000, 1100, 1600, 1200, 1300, 1800, 1250])    # bytes resident, one per reading
    trims = []
    monkeypatch.setattr(paused, "resident_bytes", lambda: next(readings))
    monkeypatch.setattr(paused, "return_free_memory", lambda: trims.append(True))
    memory = RetainedMemory(budget=500)          # trims, then reads 1000: the floor
    assert len(trims) == 1                       # what was freed before it does not count as kept
    for expected_trims in (1, 2, 2, 3):          # reads 1100; 1600 > 1500 (then 1200); 1300; 1800 > 1700
        memory.release_if_over_budget()
        assert len(trims) == expected_trims
    assert memory.floor == 1250                  # what the last trim left


def test_paused_runs_trim_with_no_budget_and_once_at_the_end_within_a_large_one_for_the_same_codes(make_minigpt, monkeypatch):
    import itertools

    model = make_minigpt()
    trims = []
    growing = itertools.count(step=4096)     # a resident set that grows at every reading
    monkeypatch.setattr(paused, "resident_bytes", lambda: next(growing))
    monkeypatch.setattr(paused, "return_free_memory", lambda: trims.append(True))
    monkeypatch.setattr(calibrate, "return_free_memory", lambda: trims.append(True))
    codes = {}
    for budget in (0, 1 << 40):
        trims.clear()
        monkeypatch.setattr(paused, "RETAINED_BYTES", budget)
        result = quantize_model(model, INT4_G16, random_tokens(4), method="gptq", batch_size=2)
        codes[budget] = {name: q.codes for name, q in result.qtensors.items()}
        # No budget: a trim after every pause, 2 blocks x 2 batches x (4 groups + the end), and the ones
        # before the first block and after the last. A large budget: only those two.
        assert len(trims) == (1 + 2 * 2 * 5 + 1 if budget == 0 else 2)
    assert all(torch.equal(codes[0][name], codes[1 << 40][name]) for name in codes[0])


def test_the_trim_budget_bounds_what_the_paused_runs_keep_across_blocks_not_per_block(make_minigpt, monkeypatch):
    import itertools

    model = make_minigpt()
    trims = []
    step = 4096
    growing = itertools.count(step=step)     # a resident set that grows at every reading
    monkeypatch.setattr(paused, "resident_bytes", lambda: next(growing))
    monkeypatch.setattr(paused, "return_free_memory", lambda: trims.append(True))
    monkeypatch.setattr(calibrate, "return_free_memory", lambda: trims.append(True))
    # One block's runs read the resident set 2 batches x 5 pauses = 10 times: a budget of 15 readings'
    # growth is never passed within a block, and is passed in the second. A budget that started again
    # at every block would let each block keep its own 15 on top of what the last one kept.
    monkeypatch.setattr(paused, "RETAINED_BYTES", 15 * step)
    quantize_model(model, INT4_G16, random_tokens(4), method="gptq", batch_size=2)
    assert len(trims) == 3   # before the first block, once in block 1, after the last block


# ----------------------------------------------------------------------------------------------
# What is reported


def test_gptq_beats_rtn_on_every_layer_of_a_random_minigpt(gptq_result):
    for name, layer in gptq_result.layers.items():
        assert layer["rel_loss"] < layer["rtn_rel_loss"], name
    assert gptq_result.mean("rel_loss") < gptq_result.mean("rtn_rel_loss")


def test_every_layer_reports_every_statistic(gptq_result):
    for name, layer in gptq_result.layers.items():
        for statistic in ("rel_loss", "rtn_rel_loss", "heldout_rel_loss", "damp", "seconds", "h_cond",
                          "h_diag_spread", "input_absmax", "outlier_ratio"):
            assert isinstance(layer[statistic], float) and layer[statistic] >= 0, (name, statistic)
        assert layer["n_tokens"] == 8 * 32


def test_gptq_without_calibration_reports_no_calibration_tokens_per_layer(minigpt):
    result = quantize_model(minigpt, INT4_G16, None, method="gptq")
    assert [(h["layer"], h["event"]) for h in result.health] == [
        (name, "no_calibration_tokens") for name in minigpt.all_linear_names()]
    assert len(result.qtensors) == len(minigpt.all_linear_names())


def test_same_inputs_give_the_same_quantized_model(minigpt, gptq_result):
    again = quantize_model(minigpt, INT4_G16, random_tokens(8), method="gptq", heldout=random_tokens(4, seed=1))
    for name, qtensor in gptq_result.qtensors.items():
        assert torch.equal(again.qtensors[name].codes, qtensor.codes), name
    assert again.layers.keys() == gptq_result.layers.keys()
    assert all(again.layers[n]["rel_loss"] == gptq_result.layers[n]["rel_loss"] for n in again.layers)


def test_progress_bar_is_silent_unless_asked(minigpt, capsys):
    quantize_model(minigpt, INT4_G16, None)
    assert capsys.readouterr().err == ""
    quantize_model(minigpt, INT4_G16, None, progress=True)
    assert "block" in capsys.readouterr().err


@pytest.mark.parametrize("tokens, message", [
    (torch.rand(2, 8), "integer token tensor"),
    (torch.zeros(2, 64, dtype=torch.long), "reads at most 32"),
    (torch.full((2, 8), 300), r"must lie in \[0, 256\)"),
])
def test_bad_calibration_tokens_are_rejected_with_a_fix(minigpt, tokens, message):
    with pytest.raises(ValueError, match=message):
        quantize_model(minigpt, INT4_G16, tokens, method="gptq")


def test_unknown_method_is_rejected(minigpt):
    with pytest.raises(ValueError, match="method must be one of float, rtn, gptq, awq"):
        quantize_model(minigpt, INT4_G16, None, method="smoothquant")


# ----------------------------------------------------------------------------------------------
# The trained MiniGPT

CHECKPOINT = Path(CHECKPOINT_DIR) / "minigpt-shakespeare"


@pytest.mark.slow
@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").is_file(), reason="MiniGPT checkpoint not committed yet")
def test_more_calibration_samples_lower_the_held_out_error_on_the_trained_minigpt():
    from quantlab.data import calibration_windows, load_text

    model = load_checkpoint(CHECKPOINT)
    train = model.encode(load_text("shakespeare", "train"))
    heldout = calibration_windows(model.encode(load_text("shakespeare", "validation")), 8, 64, seed=1)
    held_out_error = []
    for n_samples in (4, 16, 64):
        result = quantize_model(model, Scheme(4, group_size=64), calibration_windows(train, n_samples, 64, seed=0),
                                method="gptq", heldout=heldout)
        held_out_error.append(result.mean("heldout_rel_loss"))
    assert held_out_error[0] > held_out_error[1] > held_out_error[2]
