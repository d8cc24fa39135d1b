"""The ``random`` corpus: uniform random token ids, calibration data with no language in it.

It is token ids rather than text (uniform over the model's vocabulary, which no text encodes to), so it
is read with ``quantlab.data.corpus_tokens(model, "random", split)``; each split has its own seed.
"""
from __future__ import annotations

import torch

RANDOM_CORPUS_TOKENS = 1 << 20   # ~1M tokens: windows of 512 drawn from it repeat with probability ~n^2 / 2M
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def random_tokens(vocab_size: int, n_tokens: int, seed: int) -> torch.Tensor:
    """(n_tokens,) int64 token ids drawn uniformly from [0, vocab_size) by a generator seeded with ``seed``
    (the global RNG is untouched): the ``random`` corpus, calibration data with no language in it."""
    if vocab_size < 1 or n_tokens < 1:
        raise ValueError(f"random_tokens needs vocab_size >= 1 and n_tokens >= 1, got {vocab_size} and {n_tokens}")
    return torch.randint(0, vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(seed))


def random_corpus(vocab_size: int, split: str = "train") -> torch.Tensor:
    """The ``random`` corpus's ``split``: RANDOM_CORPUS_TOKENS uniform token ids below ``vocab_size``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    return random_tokens(vocab_size, RANDOM_CORPUS_TOKENS, SPLIT_SEEDS[split])
