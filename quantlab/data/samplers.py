"""Calibration samplers: fixed-length token windows drawn from a corpus, reproducibly, and what is wrong
with a set of them (too few distinct windows)."""
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


# More than this fraction of the windows repeating an earlier window is reported (a health event): the
# calibration set is then smaller than ``n_samples`` says. Windows drawn from a corpus of N tokens repeat by
# chance with probability about n_samples^2 / (2 N), negligible for any corpus meant for calibration; a
# tenth repeated means the corpus offers too few distinct windows (it is barely longer than seq_len).
DUPLICATE_WINDOW_LIMIT = 0.1


def duplicate_windows(windows: torch.Tensor) -> int:
    """How many of the (S, L) windows repeat an earlier one (S minus the number of distinct windows)."""
    if windows.dim() != 2:
        raise ValueError(f"duplicate_windows expects (n_samples, seq_len) windows, got shape {tuple(windows.shape)}")
    return windows.shape[0] - torch.unique(windows, dim=0).shape[0] if windows.shape[0] else 0


def calibration_health(windows) -> list:
    """Health events of a calibration set: ``duplicate_calibration_windows`` when more than
    DUPLICATE_WINDOW_LIMIT of the windows repeat an earlier one; [] for None (no calibration)."""
    if windows is None or windows.shape[0] == 0:
        return []
    repeated = duplicate_windows(windows)
    if repeated <= DUPLICATE_WINDOW_LIMIT * windows.shape[0]:
        return []
    n, length = windows.shape
    return [{"event": "duplicate_calibration_windows", "layer": None,
             "detail": f"{repeated} of {n} calibration windows of {length} tokens repeat another "
                       f"({n - repeated} distinct): the corpus offers too few distinct windows; use a longer "
                       "corpus, a shorter seq_len or fewer samples"}]

