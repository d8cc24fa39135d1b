"""Calibration samplers: fixed-length token windows drawn from a corpus, reproducibly."""
from __future__ import annotations

import torch


def calibration_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` consecutive tokens from the (N,) stream ``tokens``,
    returned as (n_samples, seq_len) int64. Start offsets are uniform over every complete window
    and drawn with replacement from a generator seeded with ``seed`` (the global RNG is untouched),
    so the same seed gives the same windows on every run."""
    if tokens.dim() != 1 or tokens.dtype != torch.long:
        raise ValueError(f"calibration_windows expects a 1-D int64 token stream (model.encode(text)), "
                         f"got dtype {tokens.dtype} and shape {tuple(tokens.shape)}")
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples ({n_samples}) and seq_len ({seq_len}) must both be at least 1")
    if tokens.numel() < seq_len:
        raise ValueError(f"the calibration corpus has {tokens.numel()} tokens, fewer than one window of "
                         f"seq_len={seq_len}; use a larger corpus or a shorter seq_len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_samples,), generator=generator)  # (S,)
    offsets = torch.arange(seq_len)                                                            # (L,)
    return tokens[starts[:, None] + offsets[None, :]]                                          # (S, L)
