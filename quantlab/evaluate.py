"""Evaluation: perplexity, KL divergence from the baseline, multiple-choice task accuracy, NaN counts.

The protocol, identical for every scheme and model kind (and stated in ``EvalPlan.fingerprint()``):

- The evaluation token stream is cut at ``max_tokens`` and then into non-overlapping windows of
  ``seq_len`` tokens, as the GPTQ paper evaluates WikiText-2; an incomplete last window is dropped.
- Each window is run on its own with no BOS added. Positions 1..seq_len-1 are scored: token t+1 is
  predicted from tokens <= t of the same window, so every window scores ``seq_len - 1`` tokens.
  (MiniGPT's training script records exactly this: 256-token windows of the first 65,536 test tokens.)
- ppl = exp(mean NLL over all scored tokens). Its standard error is taken across windows, not tokens:
  neighbouring tokens of a text are hard or easy together, so treating 65k per-token NLLs as
  independent would understate the uncertainty; windows are long, disjoint stretches of text and much
  closer to independent samples. se(mean NLL) = std(window mean NLL) / sqrt(windows), and the delta
  method gives se(ppl) = ppl * se(mean NLL). With a single window there is no spread to measure: None.
- KL(baseline || model) per scored position, over the full vocabulary, streamed batch by batch.
- The paired statistics llama.cpp's perplexity tool reports for a KL-divergence run (ln(PPL(Q)/PPL(base)),
  the NLL correlation, KLD and Δp percentiles, standard errors) come from ``quantlab.statistics``, with
  every standard error taken across windows as above; the per-window means (``window_nll``,
  ``window_kld``, ``window_top1``) and each task's per-item 0/1 ``correct`` are kept in the result, so
  an assertion can compare two schemes pair by pair.

Every metric that could not be computed (no baseline, one window, NaN logits) is None, never NaN, so
results serialise to strict JSON.

(One module past 400 lines on purpose: the protocol above is one thing, and perplexity, KL divergence,
task scoring and the stored baseline log-probs share its plan, its window pass and its NaN accounting;
split, the convention would be stated in several places. The statistics themselves are pure functions
in quantlab.statistics.)
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.nn import functional as F

from quantlab import statistics
from quantlab.metrics import FAMILIES, METRICS, ppl_gap
from quantlab.models.base import LanguageModel
from quantlab.offload import is_placeholder, offload_of, resident
from quantlab.results import finite as finite_or_none

# Per-window means kept in each scheme's result, so two schemes can be compared window by window.
WINDOW_KEYS = ("window_nll", "window_kld", "window_top1")

# The keys ``evaluate`` returns: the registry's evaluation metrics and percentile families, the per-window
# means, plus the per-task results.
METRIC_KEYS = (tuple(name for name, m in METRICS.items() if m.source == "evaluate") + tuple(FAMILIES)
               + WINDOW_KEYS + ("tasks",))

# Without a file to store them in, caching the baseline's log-probs in memory saves one baseline forward
# pass per window for every scheme after the first; above this size (SmolLM2: 49,152 x 4 bytes per
# scored token, so ~5,000 tokens) they are recomputed window by window instead so memory stays bounded.
DEFAULT_MAX_CACHED_BYTES = 1 << 30
# With a file (``BaselineLogProbs(..., path=...)``, what a spec run uses) the limit is disk, not memory:
# SmolLM2 on 32,768 tokens would write 3.2 GB into the cache directory on every protocol change, which a
# shared CI disk may not have. Above this size the file is not written and the in-memory rules apply.
DEFAULT_MAX_FILE_BYTES = 2 << 30
# Vocabulary-wide float32 log-probs are the largest tensors evaluation makes (SmolLM2: 100 MB per 512-token
# window); they are computed for as many windows of a batch at a time as fit in this, at least one.
LOG_PROBS_CHUNK_BYTES = 64 << 20


# A model that names its head is evaluated block-major (window_logits): the hidden states of every window
# of a pass are held at once, up to this many bytes (SmolLM2 on 65,536 tokens: 151 MB); more windows make
# more passes. An offloaded model takes all windows in one pass, so that each block is read once.
BLOCK_STATES_BYTES = 256 << 20


def windows_per_chunk(seq_len: int, vocab_size: int) -> int:
    """How many windows' (seq_len - 1, vocab_size) float32 log-probs fit in LOG_PROBS_CHUNK_BYTES (>= 1)."""
    return max(1, LOG_PROBS_CHUNK_BYTES // (max(seq_len - 1, 1) * vocab_size * 4))


# Within a chunk, the positions are scored a piece at a time, each piece start to finish (log-softmax,
# NLL, KL, top-1) while its vocabulary-wide tensors are still in the CPU's cache, rather than one tensor
# operation after another over a whole window (SmolLM2: 100 MB each), which waits on memory at every
# step: benchmarks/bench_evaluate.py --smollm2 measures it. Every operation works row by row (position
# by position), so the numbers are those of one whole-window step; only a sum over a large vocabulary may
# be split among threads differently for fewer rows (SmolLM2: kld_mean moves by 3e-11 of itself; on
# MiniGPT's shapes bit for bit, tests/test_evaluate.py).
SCORE_PIECE_BYTES = 2 << 20


def positions_per_piece(n_windows: int, vocab_size: int) -> int:
    """How many positions of ``n_windows`` windows' float32 log-probs fit in SCORE_PIECE_BYTES (>= 1)."""
    return max(1, SCORE_PIECE_BYTES // (max(n_windows, 1) * vocab_size * 4))

# How the baseline's log-probs are stored on disk: float16, as llama.cpp's KL-divergence base file.
STORED_DTYPE = np.float16


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class EvalPlan:
    """What to evaluate and how: the same plan is used for every scheme of a run.

    ``tokens`` is the evaluation split as one (N,) stream of token ids; ``tasks`` maps a task name to
    its multiple-choice items (anything with ``completions()`` and ``answer``, e.g. ``MCItem``).
    """

    tokens: torch.Tensor
    seq_len: int
    max_tokens: Optional[int] = None
    tasks: dict = field(default_factory=dict)
    kl: bool = True
    length_normalize: bool = False
    batch_size: int = 8
    device: str = "cpu"

    def __post_init__(self):
        if not isinstance(self.tokens, torch.Tensor):
            self.tokens = torch.as_tensor(self.tokens, dtype=torch.long)
        if self.tokens.dim() != 1 or self.tokens.dtype.is_floating_point or self.tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be a 1-D tensor of integer token ids, got dtype {self.tokens.dtype} "
                             f"and shape {tuple(self.tokens.shape)}; flatten the split with tokens.reshape(-1)")
        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2 (one context token and one scored token), "
                             f"got {self.seq_len!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < self.seq_len):
            raise ValueError(f"max_tokens must be null or an integer >= seq_len ({self.seq_len}), "
                             f"got {self.max_tokens!r}")
        available = min(len(self.tokens), self.max_tokens or len(self.tokens))
        if available < self.seq_len:
            raise ValueError(f"the evaluation split has {available} tokens, fewer than one window of seq_len "
                             f"{self.seq_len}; lower seq_len or use a longer split")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name, items in self.tasks.items():
            for item in items:
                if not hasattr(item, "completions") or not hasattr(item, "answer"):
                    raise ValueError(f"task {name!r} holds {type(item).__name__}, not a multiple-choice item "
                                     "with completions() and answer; build items with quantlab.data.tasks.MCItem")
        self.device = check_device(self.device)

    def windows(self) -> torch.Tensor:
        return make_windows(self.tokens, self.seq_len, self.max_tokens)

    def windows_sha256(self) -> str:
        return hashlib.sha256(self.windows().to(torch.int64).numpy().tobytes()).hexdigest()

    def fingerprint(self) -> dict:
        """The evaluation protocol, for results.json: two runs are comparable when these match."""
        windows = self.windows()
        return {
            "seq_len": self.seq_len,
            "max_tokens": self.max_tokens,
            "windowing": "non-overlapping, incomplete last window dropped",
            "scored_positions": f"1..{self.seq_len - 1} of each window (no BOS added)",
            "windows": windows.shape[0],
            "eval_tokens": windows.shape[0] * (self.seq_len - 1),
            "tokens_sha256": self.windows_sha256(),
            "ppl_stderr": "across windows, delta method",
            "kl": "KL(baseline || model), full vocabulary, per scored position" if self.kl else None,
            "tasks": {name: len(items) for name, items in self.tasks.items()},
            "task_scoring": "summed log-likelihood of the continuation"
                            + (", divided by its UTF-8 bytes" if self.length_normalize else ""),
        }


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_device(device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N', refused with a fix when that device is not present."""
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but this machine has no CUDA GPU; use device: cpu")
    return device


# ----------------------------------------------------------------------------------------------
# Pure numerics: tensors in, tensors (or numbers) out


def make_windows(tokens: torch.Tensor, seq_len: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """tokens[:max_tokens] as non-overlapping (windows, seq_len) rows; an incomplete last window is dropped."""
    stream = tokens[:max_tokens] if max_tokens is not None else tokens
    n_windows = len(stream) // seq_len
    return stream[: n_windows * seq_len].reshape(n_windows, seq_len).to(torch.long)


def next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T-1, V) float32 log-probs of tokens 1..T-1 (the last position predicts
    past the window and is not scored)."""
    return next_token_log_probs_of(logits[:, :-1])


def next_token_log_probs_of(scored_logits: torch.Tensor) -> torch.Tensor:
    """(B, P, V) logits of scored positions -> (B, P, V) float32 log-probs, position by position."""
    return F.log_softmax(scored_logits.float(), dim=-1)


def token_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probs and (B, T) target ids -> (B, T) negative log-likelihoods."""
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_per_position(baseline_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(baseline || model) = sum_v p(v) (log p(v) - log q(v)) at each position: (B, T, V) x2 -> (B, T)."""
    return F.kl_div(log_probs, baseline_log_probs, log_target=True, reduction="none").sum(-1)


def top1_agrees(log_probs: torch.Tensor, baseline_top1: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probs and (B, T) the baseline's argmax tokens -> (B, T) bool: is the baseline's top
    token the model's top token? Read as "its log-prob is the largest": a gather and a max, where an
    argmax over the vocabulary costs several times more (a token tied for the top agrees)."""
    return log_probs.gather(-1, baseline_top1.unsqueeze(-1)).squeeze(-1) == log_probs.amax(-1)


def perplexity_summary(nll: torch.Tensor, byte_level: bool = False) -> dict:
    """(windows, scored per window) NLLs -> ppl, ppl_stderr (across windows), nll_mean, eval_tokens, bits_per_byte."""
    nll = nll.double()
    window_means = nll.mean(dim=1)                          # (W,)
    nll_mean = float(nll.mean())
    ppl = exp_or_none(nll_mean)
    stderr = None
    if ppl is not None and len(window_means) > 1:
        stderr = ppl * float(window_means.std()) / math.sqrt(len(window_means))
    return {
        "ppl": ppl,
        "ppl_stderr": finite_or_none(stderr),
        "nll_mean": finite_or_none(nll_mean),
        "eval_tokens": nll.numel(),
        "bits_per_byte": finite_or_none(nll_mean / math.log(2)) if byte_level else None,
    }


def kl_summary(kld: torch.Tensor, agree: torch.Tensor) -> dict:
    """Per-position KL divergences and top-1 agreements (any shape) -> mean, median, p99, agreement."""
    kld = kld.double().flatten().numpy()
    if not np.isfinite(kld).all():
        # Non-finite logits: their argmax is meaningless too, so agreement is not reported either.
        return dict.fromkeys(("kld_mean", "kld_median", "kld_p99", "top1_agreement"))
    median, p99 = np.quantile(kld, [0.5, 0.99])
    return {"kld_mean": float(kld.mean()), "kld_median": float(median), "kld_p99": float(p99),
            "top1_agreement": float(agree.double().mean())}


def binomial_stderr(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on n independent items."""
    return math.sqrt(acc * (1.0 - acc) / n)


def exp_or_none(x: float) -> Optional[float]:
    """exp(x), or None where it is not a finite number (NaN, or so large it overflows)."""
    try:
        return finite_or_none(math.exp(x))
    except OverflowError:
        return None


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN and Inf elements of ``t``."""
    if not t.is_floating_point():
        return 0
    # One reduction settles the usual all-finite case; the exact count takes three passes over t.
    if torch.isfinite(t.sum()):
        return 0
    return int((~torch.isfinite(t)).sum())


# ----------------------------------------------------------------------------------------------
# The baseline's next-token distributions, shared by every scheme of a run


class BaselineLogProbs:
    """The baseline model's log-probs on a plan's windows, for KL divergence and ppl_gap.

    Build it once per run and pass it to ``evaluate`` for every scheme. Three ways to hold them:

    - ``path`` given (what a spec run does): stored once in a float16 ``.npy`` file and read back window
      batch by window batch, so every scheme costs one forward pass (its own) whatever the split's
      length. It is written and read with plain file I/O at each window's offset, not through a memory
      mapping: a mapping's pages count in the process's resident set as they are touched, so reading
      the file through one grew a run's RSS by the whole file (SmolLM2, 8 x 512 tokens: 400 MB; 32,768
      tokens: 3.2 GB) although the data was needed a window at a time. The file is written under a
      temporary name and renamed into place, so a half-written file is never read; an existing file
      of the right shape is reused without running the baseline at all. KL and the paired statistics
      are then computed in float32 against float16-rounded baseline log-probs (``STORED_DTYPE``),
      renormalised; top-1 agreement uses the baseline's exact argmax, stored beside them. The floor
      this sets (the baseline against its own file, MiniGPT: KL 9e-8, ppl_gap 2e-6) is far below any
      integer scheme's standard errors but not below an fp16 scheme's own KL (1.8e-7). A file larger
      than ``max_file_bytes`` is not written: the two rules below apply instead.
    - no path, all log-probs within ``max_cached_bytes``: computed here once and kept in memory (float32).
    - no path, larger: recomputed window batch by window batch during each evaluation (one baseline
      forward pass per window per scheme), so memory stays bounded by one batch.
    """

    def __init__(self, model: LanguageModel, plan: EvalPlan, max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES,
                 path: Union[str, Path, None] = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.model = model
        self.windows = plan.windows()                                       # (W, T)
        self.device = plan.device
        self.path = Path(path) if path is not None else None
        n_windows, seq_len = self.windows.shape
        self.shape = (n_windows, seq_len - 1, model.vocab_size)
        self.cached: Optional[torch.Tensor] = None                          # (W, T-1, V) when cached
        self.stored: Optional[np.ndarray] = None                            # (W, T-1, V) float16, mapped, unread
        self.stored_top1: Optional[np.ndarray] = None                       # (W, T-1) int32, exact argmax
        if self.path is not None and n_windows * (seq_len - 1) * model.vocab_size * 2 > max_file_bytes:
            self.path = None   # too large to store: fall back to memory or recomputation below
        if self.path is not None:
            self.stored, self.stored_top1 = self._open()
            if self.stored is None:
                self._write(plan.batch_size)
                self.stored, self.stored_top1 = self._open()
                if self.stored is None:
                    raise OSError(f"the baseline log-probs written to {self.path} could not be read back")
            return
        place(model, plan.device)
        cache_bytes = n_windows * (seq_len - 1) * model.vocab_size * 4
        if cache_bytes <= max_cached_bytes:
            with torch.inference_mode():
                self.cached = torch.cat([
                    next_token_log_probs(logits).cpu()
                    for _, _, logits in window_logits(model, self.windows, plan.batch_size, plan.device)
                ])

    @torch.inference_mode()
    def _compute(self, windows: torch.Tensor) -> torch.Tensor:
        return next_token_log_probs(self.model.logits(windows.to(self.device)))

    @property
    def top1_path(self) -> Path:
        return self.path.with_name(self.path.name.replace(".npy", "") + ".top1.npy")

    def _open(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """The stored log-probs and argmax tokens as read-only memory maps (their shape, dtype and data
        offset: rows are read from the files by _read_rows), or (None, None) when absent or not this
        plan's shape. The log-probs file is renamed into place last, so it stands for both."""
        try:
            stored = np.load(self.path, mmap_mode="r")
            top1 = np.load(self.top1_path, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return None, None
        if (stored.shape != self.shape or stored.dtype != STORED_DTYPE or top1.shape != self.shape[:2]
                or top1.dtype != np.int32):
            return None, None
        return stored, top1

    def _write(self, batch_size: int) -> None:
        """One baseline pass over the windows into a temporary file, renamed into place when complete."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp_top1 = self.top1_path.with_name(f"{self.top1_path.name}.{os.getpid()}.tmp")
        place(self.model, self.device)
        try:
            with open(tmp, "wb") as out, open(tmp_top1, "wb") as top1:
                _write_npy_header(out, STORED_DTYPE, self.shape)
                _write_npy_header(top1, np.int32, self.shape[:2])
                written = 0   # windows come in order: each chunk is appended
                with torch.inference_mode():   # around the loop: the logits are computed as it asks for them
                    for start, _, logits in window_logits(self.model, self.windows, batch_size, self.device):
                        chunk = windows_per_chunk(self.shape[1] + 1, self.shape[2])   # as run_windows does
                        for i in range(0, len(logits), chunk):
                            assert start + i == written, "window_logits yields the windows in order"
                            log_probs = next_token_log_probs(logits[i:i + chunk])             # (n, T-1, V)
                            log_probs.to(torch.float16).cpu().numpy().tofile(out)
                            # The argmax of the float32 log-probs: float16 rounding can tie near-equal top tokens.
                            log_probs.argmax(-1).to(torch.int32).cpu().numpy().tofile(top1)
                            written += len(log_probs)
                        del logits
            os.replace(tmp_top1, self.top1_path)
            os.replace(tmp, self.path)          # last: its presence means both files are complete
        finally:
            for leftover in (tmp, tmp_top1):
                if leftover.exists():
                    leftover.unlink()

    def check_windows(self, start: int, windows: torch.Tensor) -> None:
        """Refuse windows other than rows start..start+B of the plan these log-probs were prepared for."""
        if not torch.equal(self.windows[start:start + len(windows)], windows.cpu()):
            raise ValueError("the baseline log-probs were prepared for other windows; build BaselineLogProbs "
                             "from the same EvalPlan that is evaluated")

    def for_windows(self, start: int, windows: torch.Tensor) -> torch.Tensor:
        """Log-probs (B, T-1, V) float32 on the plan's device for ``windows``, rows start..start+B of the plan."""
        return self.log_probs_of(self.rows_for_windows(start, windows))

    def rows_for_windows(self, start: int, windows: torch.Tensor) -> torch.Tensor:
        """What is held for ``windows`` (rows start..start+B of the plan), (B, T-1, V) on the plan's device:
        the stored float16 rows as read, or float32 log-probs (cached or computed). ``log_probs_of`` turns
        any slice of them into log-probs, so a caller can read a window once and score it in pieces."""
        self.check_windows(start, windows)
        if self.stored is not None:
            return torch.from_numpy(_read_rows(self.stored, start, len(windows))).to(self.device)
        if self.cached is not None:
            return self.cached[start:start + len(windows)].to(self.device)
        return self._compute(windows)

    def log_probs_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 log-probs of a slice of ``rows_for_windows``: stored float16 rows are renormalised in
        float32, since rounding leaves sum(exp) a little off 1, and that offset, not the rounding itself,
        is most of the KL the stored file would add (measured on MiniGPT: 3.6e-7 per position before,
        the fp16 scheme's own KL is 1.8e-7). Float32 log-probs are returned as they are."""
        if rows.dtype == torch.float32:
            return rows
        return torch.log_softmax(rows.float(), dim=-1)

    @property
    def recomputes(self) -> bool:
        """Neither stored nor cached: ``for_windows`` runs the baseline model."""
        return self.stored is None and self.cached is None

    def stored_top1_rows(self, start: int, n: int) -> Optional[torch.Tensor]:
        """The stored argmax tokens (n, T-1) of rows start..start+n, or None when nothing is stored."""
        if self.stored_top1 is None:
            return None
        return torch.from_numpy(_read_rows(self.stored_top1, start, n)).long()


def _write_npy_header(file, dtype, shape: tuple) -> None:
    """The .npy header of a C-order array of ``dtype`` and ``shape``: its data is then appended."""
    np.lib.format.write_array_header_1_0(
        file, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


def _read_rows(stored: np.memmap, start: int, n: int) -> np.ndarray:
    """Rows start..start+n of a stored .npy array, read from its file into memory of their own (a
    writable copy), not through the mapping (see BaselineLogProbs: the mapping's pages would stay
    counted in this process's resident set)."""
    n = max(0, min(n, stored.shape[0] - start))
    row = int(np.prod(stored.shape[1:], dtype=np.int64))
    rows = np.fromfile(stored.filename, dtype=stored.dtype, count=n * row,
                       offset=stored.offset + start * row * stored.dtype.itemsize)
    return rows.reshape((n, *stored.shape[1:]))


# ----------------------------------------------------------------------------------------------
# The window pass: every window through the model once, NLL and (optionally) KL in the same pass


@dataclass
class WindowPass:
    """Per-position results of one pass over the windows; all (W, T-1) CPU tensors."""

    nll: torch.Tensor
    baseline_nll: Optional[torch.Tensor]
    kld: Optional[torch.Tensor]
    top1_agree: Optional[torch.Tensor]
    nonfinite_logits: int
    forward_tokens: int
    seconds: float


@torch.inference_mode()
def run_windows(model: LanguageModel, plan: EvalPlan, baseline: Optional[BaselineLogProbs] = None) -> WindowPass:
    """Run every window of the plan through ``model`` once, batch by batch, keeping only per-position
    numbers: at no point are more than one batch's logits held."""
    windows = plan.windows()                                                  # (W, T)
    if plan.seq_len > model.max_seq_len:
        raise ValueError(f"seq_len {plan.seq_len} is longer than {model.name}'s context of {model.max_seq_len} "
                         f"tokens; set seq_len to at most {model.max_seq_len}")
    place(model, plan.device)
    started = time.perf_counter()
    nll, baseline_nll, kld, agree = [], [], [], []
    nonfinite = 0
    for start, batch, logits in window_logits(model, windows, plan.batch_size, plan.device):   # (B, T, V)
        nonfinite += count_nonfinite(logits)
        # A baseline recomputed here runs on the whole batch, as the scheme did (batch-size-dependent
        # kernels would otherwise make the two differ); stored or cached log-probs are read per window.
        recomputed = (baseline.for_windows(start, batch)
                      if baseline is not None and baseline.model is not model and baseline.recomputes else None)
        # Then a chunk of windows at a time (windows_per_chunk): a few vocabulary-wide log-prob tensors
        # of that size are held, not of the whole batch; one window at a time for SmolLM2.
        chunk = windows_per_chunk(batch.shape[1], logits.shape[-1])
        for i in range(0, len(batch), chunk):
            scores = _score_chunk(model, logits[i:i + chunk], batch[i:i + chunk], start + i, plan.device,
                                  baseline, None if recomputed is None else recomputed[i:i + chunk])
            for column, part in zip((nll, baseline_nll, kld, agree), scores):
                if part is not None:
                    column.append(part)
        del logits, recomputed
    if plan.device.startswith("cuda"):
        torch.cuda.synchronize()  # kernels run asynchronously: time what ran, not what was queued
    seconds = time.perf_counter() - started
    return WindowPass(nll=torch.cat(nll), baseline_nll=_cat_or_none(baseline_nll), kld=_cat_or_none(kld),
                      top1_agree=_cat_or_none(agree), nonfinite_logits=nonfinite,
                      forward_tokens=windows.numel(), seconds=seconds)


def _score_chunk(model: LanguageModel, logits: torch.Tensor, windows: torch.Tensor, start: int, device: str,
                 baseline: Optional[BaselineLogProbs], recomputed: Optional[torch.Tensor]) -> tuple:
    """(NLL, baseline NLL, KL, top-1 agreement), each (n, T-1) on the CPU (the last three None without a
    baseline), of n windows (rows start..start+n of the plan) from their (n, T, V) logits, a piece of
    positions at a time (positions_per_piece)."""
    scored = logits[:, :-1]                                  # (n, T-1, V): the last position predicts past the window
    targets = windows[:, 1:].to(device)                      # (n, T-1)
    reference_rows = top1 = None
    if baseline is not None:
        if baseline.model is model:
            # The baseline scored against itself is its own logits: exact (KL 0), not the stored float16
            # copy, and no second read.
            baseline.check_windows(start, windows)
        else:
            reference_rows = recomputed if recomputed is not None else baseline.rows_for_windows(start, windows)
            if reference_rows.shape[-1] != scored.shape[-1]:
                raise ValueError(f"the baseline has {reference_rows.shape[-1]} logits per position and the model "
                                 f"{scored.shape[-1]}: KL divergence needs the same vocabulary")
        top1 = baseline.stored_top1_rows(start, len(windows))
        top1 = None if top1 is None else top1.to(device)
    pieces = []
    step = positions_per_piece(len(windows), scored.shape[-1])
    for p in range(0, scored.shape[1], step):
        piece = slice(p, p + step)
        log_probs = next_token_log_probs_of(scored[:, piece])                # (n, piece, V)
        nll = token_nll(log_probs, targets[:, piece])
        if baseline is None:
            pieces.append((nll.cpu(),))
            continue
        reference = log_probs if reference_rows is None else baseline.log_probs_of(reference_rows[:, piece])
        top = top1[:, piece] if top1 is not None else reference.argmax(-1)
        pieces.append((nll.cpu(), token_nll(reference, targets[:, piece]).cpu(),
                       kl_per_position(reference, log_probs).cpu(), top1_agrees(log_probs, top).cpu()))
    joined = tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))
    return joined + (None,) * (4 - len(joined))


def window_logits(model: LanguageModel, windows: torch.Tensor, batch_size: int, device: str):
    """(start, windows, logits (n, T, V)) for consecutive rows of ``windows``, as ``model.logits`` on
    batches of ``batch_size`` windows gives them.

    A model that names its head (``head_names``: MiniGPT's and a transformers model's final norm and LM
    head) is run block-major (block_major_logits): each block's weights are then swapped in (a
    quantization, quantlab.swap) or read (an offloaded model, quantlab.offload) once per pass rather than
    once per batch, and its head runs on as many windows at a time as windows_per_chunk allows, so no
    batch's logits exist at once (SmolLM2's (8, 512, 49152) float32 logits are 805 MB). Other models
    yield a batch's logits."""
    if not model.head_names:
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            yield start, batch, model.logits(batch.to(device))
        return
    head_windows = windows_per_chunk(windows.shape[1], model.vocab_size)
    state_bytes = None if offload_of(model) is not None else BLOCK_STATES_BYTES
    yield from block_major_logits(model, windows, batch_size, head_windows, device, state_bytes)


def block_major_logits(model: LanguageModel, windows: torch.Tensor, batch_size: int, head_windows: int,
                       device: str = "cpu", state_bytes: Optional[int] = None):
    """(start, windows, logits) for consecutive rows of ``windows``, as a window batch's model.logits
    would give them, computed block-major: every batch of a pass through block 0, then block 1 (held
    once: see ``holding``), and so on, then the head on ``head_windows`` windows at a time. Batches are
    ``batch_size`` windows, as in a batch-by-batch pass, so each block computes on the same shapes and
    gives the same numbers. A pass takes batches until their hidden states reach ``state_bytes`` (None:
    every window in one pass)."""
    first = 0
    while first < len(windows):
        starts, states, held = [], [], 0
        with torch.inference_mode():
            while first < len(windows) and (state_bytes is None or not states or held < state_bytes):
                hidden, kwargs = model.block_inputs(windows[first:first + batch_size].to(device))
                starts.append(first)
                states.append((hidden, kwargs))
                held += hidden.numel() * hidden.element_size()
                first += batch_size
            for b in range(len(model.blocks)):
                with holding(model, b):
                    states = [(model.run_block(b, hidden, kwargs), kwargs) for hidden, kwargs in states]
        for start, (hidden, _) in zip(starts, states):
            for i in range(0, len(hidden), head_windows):
                part = hidden[i:i + head_windows]
                with torch.inference_mode():
                    logits = model.head(part)
                yield start + i, windows[start + i:start + i + len(part)], logits
        del states


def holding(model: LanguageModel, block_index: int):
    """A context in which block ``block_index`` of ``model`` is ready to run batch after batch: a
    quantization's values swapped in once (quantlab.swap.SwappedModel.holding), an offloaded model's
    block read once (quantlab.offload.resident); nothing to do for a float model held whole."""
    hold = getattr(model, "holding", None)
    return hold(block_index) if hold is not None else resident(model, block_index)


def place(model: LanguageModel, device: str) -> None:
    """Move the model to ``device``; an offloaded model reads its blocks onto its own device, which must be it."""
    offload = offload_of(model)
    if offload is None:
        model.module.to(device)
    elif torch.device(device) != offload.device:
        raise ValueError(f"{model.name} is offloaded onto {offload.device} (its blocks are read there one at a "
                         f"time) and cannot move to {device}; load it with device {device}")


def _cat_or_none(parts: list[torch.Tensor]) -> Optional[torch.Tensor]:
    return torch.cat(parts) if parts else None


# ----------------------------------------------------------------------------------------------
# Multiple-choice tasks


def choice_sequences(model: LanguageModel, item) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(context ids, continuation ids, continuation UTF-8 bytes) for each choice of ``item``.

    Trailing whitespace of the prefix moves to the continuation, so a subword tokenizer sees " walked"
    as in running text, not a lone space token followed by "walked". An empty prefix leaves nothing to predict the first
    continuation token from (no BOS is used anywhere), so a newline stands in as the start of text.
    """
    sequences = []
    for prefix, continuation in item.completions():
        context_text = prefix.rstrip()
        continuation_text = prefix[len(context_text):] + continuation
        context = model.encode(context_text if context_text else "\n")
        tokens = model.encode(continuation_text)
        if len(context) == 0:
            raise ValueError(f"the model's tokenizer encodes the prefix {context_text!r} to no tokens; "
                             "give the item a context before the blank")
        if len(tokens) == 0:
            raise ValueError(f"a choice of item {item!r} has an empty continuation; every choice needs text to score")
        if len(tokens) >= model.max_seq_len:
            raise ValueError(f"a continuation of {len(tokens)} tokens does not fit the model's context of "
                             f"{model.max_seq_len}; shorten the item's text after the blank")
        keep = model.max_seq_len - len(tokens)
        sequences.append((context[-keep:], tokens, len(continuation_text.encode("utf-8"))))
    return sequences


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches, shortest first, each at most ``batch_tokens`` once padded to its
    longest member (a longer sequence gets a batch of its own). Short task sentences then share one
    forward pass by the dozen, at the memory cost of one evaluation window batch."""
    batches, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


@torch.inference_mode()
def continuation_log_likelihoods(model: LanguageModel, sequences, batch_tokens: int = 2048,
                                 device: str = "cpu") -> tuple[torch.Tensor, int]:
    """Summed log-likelihood of each continuation given its context: (len(sequences),) float64, and the
    number of non-finite logits seen. Sequences are batched by length and right-padded; a causal model
    never looks right, so padding changes no scored position."""
    place(model, device)
    scores = torch.empty(len(sequences), dtype=torch.float64)
    nonfinite = 0
    lengths = [len(context) + len(continuation) for context, continuation, _ in sequences]
    for rows in length_batches(lengths, batch_tokens):
        batch = torch.zeros(len(rows), lengths[rows[-1]], dtype=torch.long)  # (B, L), 0-padded on the right
        for r, i in enumerate(rows):
            batch[r, :lengths[i]] = torch.cat(sequences[i][:2])
        # A model with a separate head gives its logits a chunk of sequences at a time (window_logits),
        # so a batch's (B, L, V) logits never exist at once.
        parts = []
        for _, part, logits in window_logits(model, batch, len(batch), device):   # (n, L, V)
            nonfinite += count_nonfinite(logits)
            parts.append(token_nll(next_token_log_probs(logits), part[:, 1:].to(device)).cpu())
        nll = torch.cat(parts)                                                  # (B, L-1)
        for r, i in enumerate(rows):
            context, continuation = sequences[i][0], sequences[i][1]
            # Token j of the full sequence is predicted at position j-1.
            first = len(context) - 1
            scores[i] = -nll[r, first:first + len(continuation)].double().sum()
    return scores, nonfinite


def score_items(model: LanguageModel, items, length_normalize: bool = False, batch_tokens: int = 2048,
                device: str = "cpu") -> tuple[list[bool], int]:
    """Whether the model picks each item's answer, and the non-finite logits seen.

    An item counts as correct only when the answer scores strictly higher than every other choice: a
    model that cannot tell the choices apart (ties, NaN scores) gets no credit, whatever the answer's
    position in the list.
    """
    per_item = [choice_sequences(model, item) for item in items]
    for item, seqs in zip(items, per_item):
        if not _is_int(item.answer) or not 0 <= item.answer < len(seqs):
            raise ValueError(f"item {item!r} has answer {item.answer!r}, not the index of one of its "
                             f"{len(seqs)} choices; answers count from 0")
    flat = [seq for seqs in per_item for seq in seqs]
    scores, nonfinite = continuation_log_likelihoods(model, flat, batch_tokens, device)
    if length_normalize:
        # By bytes, not tokens, so the normalisation means the same for every tokenizer.
        scores = scores / torch.tensor([n_bytes for _, _, n_bytes in flat], dtype=torch.float64)
    correct, offset = [], 0
    for item, seqs in zip(items, per_item):
        item_scores = scores[offset:offset + len(seqs)]
        offset += len(seqs)
        answer = item_scores[item.answer]
        others = torch.cat([item_scores[:item.answer], item_scores[item.answer + 1:]])
        correct.append(bool(torch.isfinite(item_scores).all() and (answer > others).all()))
    return correct, nonfinite


def accuracy_summary(correct: list[bool]) -> dict:
    n = len(correct)
    if n == 0:
        return {"acc": None, "acc_stderr": None, "n": 0}
    acc = sum(correct) / n
    return {"acc": acc, "acc_stderr": binomial_stderr(acc, n), "n": n}


# ----------------------------------------------------------------------------------------------
# Public metrics


def perplexity(model: LanguageModel, tokens: torch.Tensor, seq_len: int, max_tokens: Optional[int] = None,
               batch_size: int = 8, device: str = "cpu") -> dict:
    """Perplexity of ``model`` on ``tokens`` under the module's windowing protocol.

    Returns ppl, ppl_stderr, nll_mean, eval_tokens (scored tokens) and bits_per_byte (byte-level
    tokenizers only, else None).
    """
    plan = EvalPlan(tokens, seq_len, max_tokens, batch_size=batch_size, device=device)
    return perplexity_summary(run_windows(model, plan).nll, _byte_level(model))


def kl_divergence(model: LanguageModel, baseline: Union[LanguageModel, BaselineLogProbs], tokens: torch.Tensor,
                  seq_len: int, max_tokens: Optional[int] = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """KL(baseline || model) of the next-token distributions on the same windows: kld_mean, kld_median,
    kld_p99 (over scored positions) and top1_agreement (share of positions whose argmax tokens agree).

    A baseline given as a model is recomputed window by window: used once, caching would only cost memory.
    """
    plan = EvalPlan(tokens, seq_len, max_tokens, batch_size=batch_size, device=device)
    reference = _as_baseline(baseline, plan)
    result = run_windows(model, plan, reference)
    return kl_summary(result.kld, result.top1_agree)


def task_accuracy(model: LanguageModel, items, length_normalize: bool = False, batch_tokens: int = 2048,
                  device: str = "cpu") -> dict:
    """Multiple-choice accuracy: each choice's continuation scored by its summed log-likelihood given
    its prefix (divided by its UTF-8 bytes if ``length_normalize``), argmax against the answer.
    Choices are batched up to ``batch_tokens`` tokens per forward pass (padding included).
    Returns acc, acc_stderr = sqrt(acc (1 - acc) / n) and n; acc is None for no items."""
    correct, _ = score_items(model, items, length_normalize, batch_tokens, check_device(device))
    return accuracy_summary(correct)


def nan_count(model: LanguageModel) -> int:
    """NaN and Inf elements in the model's parameters and buffers (tied tensors counted once)."""
    tensors = list(model.module.parameters()) + list(model.module.buffers())
    # An offloaded model's blocks that are not resident hold placeholders (NaN, no storage): not weights.
    unique = {id(t): t for t in tensors if not is_placeholder(t)}.values()
    return sum(count_nonfinite(t.detach()) for t in unique)


def evaluate(model: LanguageModel, plan: EvalPlan, baseline: Union[LanguageModel, BaselineLogProbs, None] = None) -> dict:
    """All evaluation metrics of one scheme's model, under one protocol for every scheme and model kind.

    The model runs once per window: NLL, and KL divergence against ``baseline`` when the plan asks for
    it, come from the same logits. Pass a ``BaselineLogProbs`` built once per run so the baseline's
    log-probs are shared by every scheme (a bare baseline model is recomputed window by window).

    nan_count is the NaN/Inf elements in the weights plus those in all logits computed here; the
    metrics they poison come back as None. tokens_per_second is the window pass's throughput (tokens
    through the model per second), eval_seconds the whole evaluation including tasks.
    Returns a dict with exactly ``METRIC_KEYS``; ppl_gap is filled when a baseline is given (measured
    on the same windows), else left for the caller (see ``ppl_gap``).
    """
    started = time.perf_counter()
    reference = _as_baseline(baseline, plan) if plan.kl and baseline is not None else None
    windows = run_windows(model, plan, reference)
    ppl = perplexity_summary(windows.nll, _byte_level(model))
    kl = kl_summary(windows.kld, windows.top1_agree) if reference is not None else dict.fromkeys(
        ("kld_mean", "kld_median", "kld_p99", "top1_agreement"))
    gap = None
    if windows.baseline_nll is not None:
        gap = ppl_gap(ppl["ppl"], perplexity_summary(windows.baseline_nll)["ppl"])
    paired = paired_statistics(windows)

    tasks, task_nonfinite = {}, 0
    for name, items in plan.tasks.items():
        # As many tokens per forward pass as a window batch: the same memory, far fewer passes.
        correct, nonfinite = score_items(model, items, plan.length_normalize, plan.batch_size * plan.seq_len,
                                         plan.device)
        tasks[name] = {**accuracy_summary(correct), "correct": [int(c) for c in correct]}
        task_nonfinite += nonfinite

    seconds = time.perf_counter() - started
    return {
        "ppl": ppl["ppl"],
        "ppl_stderr": ppl["ppl_stderr"],
        "ppl_gap": finite_or_none(gap),
        "bits_per_byte": ppl["bits_per_byte"],
        **kl,
        **paired,
        "tasks": tasks,
        "nan_count": nan_count(model) + windows.nonfinite_logits + task_nonfinite,
        "eval_tokens": ppl["eval_tokens"],
        "eval_seconds": seconds,
        "tokens_per_second": windows.forward_tokens / windows.seconds if windows.seconds > 0 else None,
    }


def paired_statistics(windows: WindowPass) -> dict:
    """The statistics of ``quantlab.statistics`` for one window pass: window_nll always; with a baseline
    the paired log-ratio, NLL correlation, Δp and KL statistics (None where not computed)."""
    nll = windows.nll.double()
    out = dict.fromkeys(("ppl_gap_stderr", "ln_ppl_ratio", "ln_ppl_ratio_stderr", "nll_correlation", "kld_stderr",
                         "kld_percentiles", "top1_agreement_stderr", "delta_p_mean", "delta_p_stderr", "delta_p_rms",
                         "delta_p_rms_stderr", "delta_p_percentiles", *WINDOW_KEYS))
    out["window_nll"] = statistics.window_means(nll)
    if windows.baseline_nll is not None:
        base = windows.baseline_nll.double()
        out.update(statistics.log_ppl_ratio(out["window_nll"], statistics.window_means(base)))
        out.update(statistics.delta_p_statistics(nll, base))
    if windows.kld is not None:
        out.update(statistics.kl_statistics(windows.kld, windows.top1_agree))
    return out


def _as_baseline(baseline: Union[LanguageModel, BaselineLogProbs], plan: EvalPlan) -> BaselineLogProbs:
    if isinstance(baseline, BaselineLogProbs):
        return baseline
    return BaselineLogProbs(baseline, plan, max_cached_bytes=0)


def _byte_level(model: LanguageModel) -> bool:
    return model.tokenizer.get("kind") == "bytes"
