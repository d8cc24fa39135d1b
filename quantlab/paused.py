"""One batch's run of one decoder block on a thread of its own, paused wherever a hook asks until resumed.

The one-pass calibration (quantlab.calibrate) runs every calibration batch through a block once while
the block's Linears are quantized group by group: each batch's run stops at a group's input, the group is
quantized from what all runs read there, and the runs go on with the new weights. A forward pass cannot
be suspended in Python except by running it on a thread that waits, so each run is a thread, and the
threads are used as coroutines: exactly one thread works at any time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import threading
from typing import Optional

import torch

from quantlab.models.base import LanguageModel

Batch = tuple  # (hidden (B, T, C), kwargs): what one block receives for one batch of token windows


# How far the resident set may grow past what the last trim left before the paused runs' freed memory
# is handed back (RetainedMemory). Trimming after every pause would fault each batch's transient memory
# back in page by page; benchmarks/bench_calibrate.py --trim-budget-mib measures the trade.
RETAINED_BYTES = 512 << 20


def return_free_memory() -> None:
    """Hand the memory the process has freed back to the system (glibc's malloc_trim).

    glibc gives each thread its own malloc arena and keeps what a thread frees for that thread's later
    use, so with one thread per batch every batch's transient peak (attention, MLP intermediates) would
    stay resident at once. Measured on SmolLM2 (GPTQ, 4 batches of 8 x 512 tokens): peak RSS 720 MB above
    the loaded model without trimming, growing with the calibration set. The call itself costs
    microseconds; the price is that memory used again afterwards is faulted back in page by page.
    A no-op where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident_bytes() -> Optional[int]:
    """This process's resident set in bytes (Linux /proc/self/statm), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class RetainedMemory:
    """Trims the C heap (return_free_memory) only once the resident set has grown more than ``budget``
    bytes past what the last trim left, so the freed memory the paused runs' arenas keep is bounded by
    the budget without being faulted back in after every pause. It starts with a trim, so what was freed
    before (a mixed scheme's sensitivity Hessians) is not counted as live. Where the resident set cannot
    be read it trims every time."""

    def __init__(self, budget: Optional[int] = None):
        self.budget = RETAINED_BYTES if budget is None else budget
        return_free_memory()
        self.floor = resident_bytes()

    def release_if_over_budget(self) -> None:
        now = resident_bytes()
        if now is None or self.floor is None or now > self.floor + self.budget:
            return_free_memory()
            self.floor = resident_bytes()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class Aborted(BaseException):
    """Raised inside a paused run that will not be resumed; a BaseException, so model code that catches
    Exception does not swallow it."""


class PausedRun:
    """One batch's run of one block on a thread of its own, which stops wherever ``pause_at`` is called
    (from a forward pre-hook) until the main thread lets it go on.

    Exactly one thread works at any time: the main thread waits while a run goes on, and a run waits
    while it is paused, so the runs are coroutines and the results do not depend on thread timing.
    Grad mode is per thread in torch, so each run sets its own ``no_grad``.
    """

    NOT_STARTED, DONE = -1, math.inf
    _local = threading.local()   # which run, if any, the current thread is

    def __init__(self, model: LanguageModel, block_index: int, batch: Batch, memory: RetainedMemory):
        self.memory = memory    # shared by a calibration's block runs: trims what they free, past its budget
        self.position = self.NOT_STARTED   # the group index it is paused at; DONE when it has finished
        self.inputs: dict = {}               # group index -> the input tensor it stopped at
        self.output: Optional[torch.Tensor] = None
        self._error: Optional[BaseException] = None
        self._aborted = False
        self._go, self._stopped = threading.Semaphore(0), threading.Semaphore(0)
        self._thread = threading.Thread(target=self._run, args=(model, block_index, batch), daemon=True,
                                        name=f"quantlab-block-{block_index}")

    @classmethod
    def current(cls) -> Optional["PausedRun"]:
        return getattr(cls._local, "run", None)

    def _run(self, model: LanguageModel, block_index: int, batch: Batch) -> None:
        self._local.run = self
        try:
            with torch.no_grad():
                self.output = model.run_block(block_index, *batch)
        except Aborted:
            pass
        except BaseException as error:   # re-raised on the main thread by advance()
            self._error = error
        finally:
            self.position = self.DONE
            self._stopped.release()

    def pause_at(self, group_index: int) -> None:
        """On the run's own thread: stop here until ``advance`` is called."""
        self.position = group_index
        self._stopped.release()
        self._go.acquire()
        if self._aborted:
            raise Aborted

    def advance(self) -> None:
        """On the main thread: let the run go on to its next pause, or to its end."""
        if self.position == self.DONE:
            return
        if self.position == self.NOT_STARTED:
            self._thread.start()
        else:
            self._go.release()
        self._stopped.acquire()
        self.memory.release_if_over_budget()
        if self._error is not None:
            raise self._error

    def advance_to(self, group_index: int) -> None:
        """Advance until the run is paused at ``group_index`` or a later group, or has finished."""
        while self.position < group_index:
            self.advance()

    def finish(self) -> torch.Tensor:
        self.advance_to(self.DONE)
        return self.output

    def abort(self) -> None:
        """End a paused run without finishing it (after an error or Ctrl-C on the main thread)."""
        if self.position not in (self.NOT_STARTED, self.DONE):
            self._aborted = True
            self._go.release()
            self._thread.join()
