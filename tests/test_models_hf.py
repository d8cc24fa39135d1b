"""The Hugging Face adapter on tiny randomly initialised Llama, OPT and GPT-2 models built in-process.

Each model is saved with a tiny byte-level BPE tokenizer (trained here on a few sentences) to a temp
directory and loaded back with load_hf, so the on-disk path is exercised too. Nothing is downloaded.
"""
import copy
import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, BloomConfig, BloomForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
    LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, MptConfig, MptForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from quantlab.calibrate import _first_block_inputs, _next_block_inputs, quantize_model  # noqa: E402
from quantlab.evaluate import EvalPlan, evaluate  # noqa: E402
from quantlab.models.base import UNBOUNDED_CONTEXT  # noqa: E402
from quantlab.models.hf import HFModel, conv1d_as_linear, find_blocks, load_hf, wrap_hf  # noqa: E402
from quantlab.quant import PRESETS, Scheme  # noqa: E402

SENTENCES = [
    "To be, or not to be, that is the question.",
    "Yesterday he walked to the store; tomorrow she will walk to the market.",
    "The quick brown fox jumps over the lazy dog.",
]
VOCAB = 1000
HIDDEN = 64


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text encodes (no unknown token) and decodes back exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def tiny_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    special = {"bos_token_id": 0, "eos_token_id": 1}  # the tokenizer's <s> and </s>
    if family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **special)
        return LlamaForCausalLM(config)
    if family == "opt":
        config = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
                           pad_token_id=VOCAB - 1, **special)
        return OPTForCausalLM(config)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **special)
    return GPT2LMHeadModel(config)


# Where each family keeps its blocks, and how many Linear layers a block has: the answers that the
# generic search in hf.py must find without being told.
FAMILIES = {
    "llama": ("model.layers", 7),            # q, k, v, o, gate, up, down
    "opt": ("model.decoder.layers", 6),      # k, v, q, out, fc1, fc2
    "gpt2": ("transformer.h", 4),            # c_attn, attn.c_proj, c_fc, mlp.c_proj (Conv1D -> Linear)
}


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    """{family: directory} with each tiny model and the tokenizer saved by save_pretrained."""
    tokenizer = tiny_tokenizer()
    dirs = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        tiny_model(family).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        dirs[family] = directory
    return dirs


@pytest.fixture(scope="module")
def loaded(saved_dirs):
    return {family: load_hf(directory) for family, directory in saved_dirs.items()}


def tokens(batch=2, length=12, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_blocks_and_their_linears_are_found_without_a_name_table(loaded, family):
    model = loaded[family]
    blocks_path, linears_per_block = FAMILIES[family]
    assert isinstance(model, HFModel)
    assert [model.block_prefix(i) for i in range(len(model.blocks))] == [f"{blocks_path}.0", f"{blocks_path}.1"]
    assert [len(model.linear_names(i)) for i in range(2)] == [linears_per_block] * 2
    assert model.vocab_size == VOCAB and model.max_seq_len == 128


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_are_float32_and_match_transformers_own_forward(saved_dirs, loaded, family):
    reference = AutoModelForCausalLM.from_pretrained(saved_dirs[family], local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(input_ids=tokens(), use_cache=False).logits
    got = loaded[family].logits(tokens())
    assert got.dtype == torch.float32 and got.shape == (2, 12, VOCAB)
    # GPT-2's Conv1D -> Linear swap changes only the weight layout, never the result.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_inputs_then_every_block_then_head_reproduce_logits(loaded, family):
    """The path sequential calibration takes (block 0's inputs, then block by block) must compute
    exactly what the full forward pass does: Llama's rotary embeddings and every mask included."""
    model = loaded[family]
    hidden, kwargs = model.block_inputs(tokens())
    assert hidden.shape == (2, 12, HIDDEN)
    for i in range(len(model.blocks)):
        hidden = model.run_block(i, hidden, kwargs)  # (B, T, C)
    torch.testing.assert_close(model.head(hidden), model.logits(tokens()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_adds_no_special_tokens_and_records_that_in_the_fingerprint(loaded, family):
    model = loaded[family]
    tokenizer = model.hf_tokenizer
    ids = model.encode(SENTENCES[0])
    assert ids.dtype == torch.long and ids.ndim == 1
    assert tokenizer.bos_token_id not in ids.tolist() and tokenizer.eos_token_id not in ids.tolist()
    assert model.tokenizer["add_bos"] is False
    assert model.tokenizer["vocab_size"] == len(tokenizer) == 300


@functools.lru_cache(maxsize=1)
def wrapped_tiny_llama() -> HFModel:
    """For Hypothesis tests, which cannot take function-scoped fixtures: wrap_hf on an in-process model."""
    return wrap_hf(tiny_model("llama"), tiny_tokenizer(), "tiny-llama")


@given(text=st.text(max_size=40))
def test_decode_inverts_encode_for_any_text(text):
    model = wrapped_tiny_llama()
    assert model.decode(model.encode(text)) == text


def test_tokenizer_fingerprint_is_the_same_wherever_the_model_is_saved(saved_dirs, tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    tiny_model("llama").save_pretrained(tmp_path)
    here, there = load_hf(saved_dirs["llama"], name="m"), load_hf(tmp_path, name="m")
    assert here.tokenizer == there.tokenizer
    assert str(tmp_path) not in str(there.tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_gives_an_independent_model(loaded, family):
    """Quantization replaces weights on a deep copy; the original must not change."""
    original = loaded[family]
    before = original.logits(tokens())
    clone = copy.deepcopy(original)
    assert clone.blocks is clone.module.get_submodule(FAMILIES[family][0])  # not the original's blocks
    first_linear = clone.module.get_submodule(clone.linear_names(0)[0])
    first_linear.weight.zero_()
    assert not torch.equal(clone.logits(tokens()), before)
    assert torch.equal(original.logits(tokens()), before)
    assert torch.equal(clone.encode(SENTENCES[1]), original.encode(SENTENCES[1]))


@given(in_features=st.integers(1, 16), out_features=st.integers(1, 16), rows=st.integers(1, 4))
def test_conv1d_becomes_an_nn_linear_with_the_same_output(in_features, out_features, rows):
    torch.manual_seed(in_features * 100 + out_features)
    conv = Conv1D(out_features, in_features)
    nn.init.normal_(conv.bias)
    x = torch.randn(rows, 3, in_features)
    linear = conv1d_as_linear(conv)
    assert linear.weight.shape == (out_features, in_features)
    torch.testing.assert_close(linear(x), conv(x), rtol=0, atol=1e-6)


def test_find_blocks_picks_the_repeated_layers_holding_most_parameters():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))              # many, but small
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.LayerNorm(64)])         # not one class
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))          # the blocks

    toy = Toy()
    name, blocks = find_blocks(toy)
    assert name == "layers" and blocks is toy.layers


def test_find_blocks_explains_a_model_without_repeated_layers():
    with pytest.raises(ValueError, match="decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_load_hf_says_what_a_model_directory_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_hf(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# Architectures whose blocks are not all alike


def alternating_attention_model(family: str) -> nn.Module:
    """Sliding-window and full-attention layers alternating, with a window (4) shorter than the
    windows the tests feed (12 tokens), so a block given another block's mask computes something else.
    Gemma 3's sliding layers also have their own rotary embeddings."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  bos_token_id=0, eos_token_id=1)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=0))
    return Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16))


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_calibration_runs_every_block_with_its_own_mask_and_positions(family):
    """Calibration's block-by-block path must give each block what the model itself gives it: a
    sliding-window layer its sliding mask, a global layer its full one."""
    module = alternating_attention_model(family)
    model = wrap_hf(module, tiny_tokenizer(), family)
    with torch.no_grad():
        expected = module(input_ids=tokens(), use_cache=False, output_hidden_states=True)
        batches = _first_block_inputs(model, tokens(), batch_size=2)
        for i in range(len(model.blocks) - 1):
            batches = _next_block_inputs(model, i, batches)
            # hidden_states[0] is the embedding output, hidden_states[i + 1] block i's output
            torch.testing.assert_close(batches[0][0], expected.hidden_states[i + 1], rtol=0, atol=1e-5)
        last = _next_block_inputs(model, len(model.blocks) - 1, batches)[0][0]
    # The last entry of hidden_states is taken after the final norm: compare logits instead.
    torch.testing.assert_close(model.head(last), expected.logits, rtol=0, atol=1e-5)


def alibi_model(family: str) -> nn.Module:
    """ALiBi models: no position table, so Bloom's config states no context length; MPT's
    ``max_seq_len`` is the length its ALiBi bias table is built for."""
    torch.manual_seed(0)
    special = {"bos_token_id": 0, "eos_token_id": 1}
    if family == "bloom":
        return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4, **special))
    return MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=2, n_heads=4, max_seq_len=64,
                                    expansion_ratio=2, **special))


@pytest.mark.parametrize("family, context", [("bloom", UNBOUNDED_CONTEXT), ("mpt", 64)])
def test_alibi_models_load_calibrate_and_evaluate(family, context):
    model = wrap_hf(alibi_model(family), tiny_tokenizer(), family)
    assert model.max_seq_len == context
    assert [len(model.linear_names(i)) for i in range(2)] == [4, 4]   # qkv, attention output, MLP in and out
    hidden, kwargs = model.block_inputs(tokens())
    for i in range(len(model.blocks)):
        hidden = model.run_block(i, hidden, kwargs)
    torch.testing.assert_close(model.head(hidden), model.logits(tokens()), rtol=0, atol=1e-5)
    result = quantize_model(model, Scheme(4, group_size=16), tokens(4), method="gptq", batch_size=2)
    assert set(result.layers) == set(model.all_linear_names())
    assert all(math.isfinite(layer["rel_loss"]) and layer["rel_loss"] > 0 for layer in result.layers.values())
    metrics = evaluate(result.model, EvalPlan(tokens=tokens(1, 48).reshape(-1), seq_len=12, kl=False))
    assert math.isfinite(metrics["ppl"])


def tiny_mixtral() -> nn.Module:
    """Mixture of experts as transformers 5 stores it: each layer's experts in 3-D parameters
    (experts, out, in), not nn.Linear layers."""
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=1))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_experts_stored_as_3d_parameters_are_refused_not_left_in_float16(method):
    model = wrap_hf(tiny_mixtral(), tiny_tokenizer(), "tiny-mixtral")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj .*not an nn\.Linear"):
        quantize_model(model, Scheme(4, group_size=16), tokens(2), method=method)
    # Float schemes round every parameter, experts included: nothing is left out.
    assert quantize_model(model, PRESETS["fp16"], None).bytes["bytes_total"] == 2 * sum(
        p.numel() for p in model.module.parameters())
