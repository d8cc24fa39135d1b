"""Tiny models built in-process, for tests (quantlab's and yours) that must not download anything.

A byte-level BPE tokenizer trained on a few sentences and a randomly initialised 2-layer Llama are
enough to exercise loading, calibration, export and import end to end in seconds. Needs the `hf` extra.
"""
from __future__ import annotations

import torch

from quantlab.distributed import torch_threads  # noqa: F401  (re-exported for tests)

TINY_VOCAB = 300
SENTENCE = "To be, or not to be, that is the question."


def tiny_tokenizer(sentences=(SENTENCE,), vocab_size: int = TINY_VOCAB):
    """Byte-level BPE: any text encodes (no unknown token) and decodes back exactly; <s> is id 0, </s> 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(sentences), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, *, hidden_size: int = 64, intermediate_size: int = 128, vocab_size: int = TINY_VOCAB):
    """A randomly initialised 2-layer Llama with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                        intermediate_size=intermediate_size, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=1))


