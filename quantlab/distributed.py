"""Fan spec runs out on Ray: every uncached (spec, scheme, sweep point) one task, the scheme cache the join point.

quantlab's unit of work is one scheme's result under one spec (or one sweep point of it), stored in the
scheme cache (quantlab.cache) under a key of everything that determines it. ``fan_out`` plans the units
of some specs exactly as a sequential run would meet them (quantlab.pipeline), drops those already
cached, and submits the rest as Ray tasks; each worker computes its unit with the pipeline's own code
(``SpecRun.scheme_result``) and stores it in the cache, under the per-key file lock and with the atomic
write a sequential run uses. The local process then runs each spec as usual: every scheme is a cache hit,
so its assertions, golden checks and report come from the same entries a sequential run would have
stored. Ray does the scheduling and the retries; quantlab only plans and reports.

- A spec's baseline is computed first: every other scheme's KL divergence and ppl_gap are measured
  against it, so each unit waits on its baseline's task (a Ray dependency), and reads the baseline's
  stored log-probs from the cache directory.
- The cache directory must be one every node sees at the same path (a shared file system): the planner
  leaves a probe file there, and a worker that cannot see it fails its task with ``CacheNotShared``
  instead of storing results no one else would find.
- A worker that dies (killed, pre-empted, out of memory) has its task retried by Ray (``max_retries``);
  the file lock dies with the process and entries are renamed into place whole, so a retry finds no
  partial entry. A task that raises is not retried (quantlab's computations are deterministic): its
  error is reported under the scheme's name, and every other unit still runs.
- Torch results depend on the number of intra-op threads (GPTQ's Hessians are sums whose order follows
  the thread split), so each task computes on as many threads as the planning process uses, and
  declares as many CPUs (at most a node's): the cache then holds what a sequential run of this process
  would have stored. ``OMP_NUM_THREADS=1`` on the submitting process runs one scheme per core.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from quantlab.cache import RESULTS_CACHE_ENV, SchemeCache, default_cache_dir
from quantlab.spec import Spec

log = logging.getLogger("quantlab")

LOCAL = "local"                     # the address that starts a fresh local cluster (Ray's own keyword)
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20   # tasks pass specs and small dicts only; Ray's default takes 30% of RAM
MAX_RETRIES = 3                     # retries of a task whose worker died (not of one that raised)


class CacheNotShared(RuntimeError):
    """A worker cannot see the planner's cache directory: its results would be stored where no one reads them."""


class KeyMismatch(RuntimeError):
    """A worker keys a unit differently from the planner: its code, libraries, model files or device differ."""


@dataclass
class Unit:
    """One (spec, scheme, sweep point) result to compute, with every planned run that needs it."""

    spec: Spec                      # the spec it is computed under: a sweep point's variant, or the spec
    scheme: str
    key: str                        # its scheme cache key
    label: str                      # "int4-g64-gptq" or "int4-g64-gptq [calibration.samples=8]"
    needed_by: list = field(default_factory=list)      # (spec source, label) of each run that reads it
    after: Optional[str] = None     # the key of the planned baseline unit it waits for
    fingerprints: list = field(default_factory=list)   # specs whose protocol fingerprint this unit stores

    @property
    def cuda(self) -> bool:
        return self.spec.device == "cuda"


@dataclass
class Finished:
    """What a task reported: where it ran, for how long, and whether it stored the entry itself."""

    unit: Unit
    node: str
    seconds: float
    computed: bool                  # False: another process had stored the entry first
    pid: int                        # the worker process that ran it (a retry runs in another)


@dataclass
class FanOut:
    """The outcome of ``fan_out``: the planned units, those finished, and the error of each that failed."""

    units: list
    finished: list
    failures: dict                  # unit key -> error message
    seconds: float
    cache_dir: Path

    def errors_for(self, spec: Spec) -> list:
        """'label: error' for every unit of ``spec`` that failed (empty when all of its schemes are stored)."""
        return [f"{label}: {self.failures[u.key]}" for u in self.units if u.key in self.failures
                for source, label in u.needed_by if source == spec.source]


# ---------------------------------------------------------------------------------------------
# Planning


def _points(spec: Spec) -> list:
    """(the spec a unit is computed under, the sweep value's label) for the spec, then each sweep point."""
    out = [(spec, None)]
    if spec.sweep is not None:
        key, values = spec.sweep
        out += [(spec.with_value(key, value), f"{key}={value}") for value in values]
    return out


def plan(specs: Sequence[Spec], cache: SchemeCache) -> list:
    """The units a sequential run of ``specs`` would compute, less those already in ``cache``; each
    key once, baselines before the units that wait on them. Keys are computed as the pipeline computes
    them (no model is loaded)."""
    from quantlab.pipeline import SpecRun, _baseline_first

    units: dict = {}
    runners: dict = {}
    for spec in specs:
        # One runner per model and device, so each model's files are hashed once.
        runner = runners.setdefault((spec.model, spec.device), SpecRun(spec, cache))
        top_keys = {name: runner.cache_key(spec, cfg) for name, cfg in spec.schemes.items()}
        for variant, point in _points(spec):
            baseline_key = runner.cache_key(variant, variant.schemes[variant.baseline])
            for name in _baseline_first(variant):
                key = runner.cache_key(variant, variant.schemes[name])
                if point is not None and key == top_keys[name]:
                    continue   # the swept value does not change this scheme: the spec's own result serves
                label = name if point is None else f"{name} [{point}]"
                if key not in units:
                    if cache.get(key) is not None:
                        continue
                    units[key] = Unit(spec=variant, scheme=name, key=key, label=label,
                                      after=baseline_key if name != variant.baseline else None)
                units[key].needed_by.append((spec.source, label))
                if point is None and name == spec.baseline:
                    units[key].fingerprints.append(spec)
    for unit in units.values():
        if unit.after not in units:
            unit.after = None   # the baseline is cached already: nothing to wait for
    return sorted(units.values(), key=lambda u: u.after is not None)


# ---------------------------------------------------------------------------------------------
# On a worker

_WORKER_RUNNER: dict = {}   # the last (model, device, cache) runner of this worker process: model loaded once


def _worker_runner(spec: Spec, cache_dir: Path):
    from quantlab.pipeline import SpecRun

    key = (spec.model, spec.device, str(cache_dir))
    if key not in _WORKER_RUNNER:
        _WORKER_RUNNER.clear()   # one model at a time in a worker's memory
        _WORKER_RUNNER[key] = SpecRun(spec, SchemeCache(cache_dir))
    return _WORKER_RUNNER[key]


def _node() -> str:
    import socket

    try:
        import ray

        ctx = ray.get_runtime_context()
        return f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"
    except Exception:   # called outside Ray (tests): the host is the node
        return socket.gethostname()


@contextmanager
def torch_threads(count: int):
    """Run the enclosed torch work on ``count`` threads, then restore the previous count. The count is
    process-wide: a Ray task sets it for the worker process it has to itself, and tests use it through
    quantlab.testing (quantlab's engine itself never changes it)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compute_unit(spec: Spec, scheme: str, key: str, cache_dir: str, probe: str, threads: int,
                 fingerprints: Sequence[Spec] = (), after=None) -> dict:
    """Compute one unit into the shared cache (what a Ray task runs); returns where and how long.

    ``after`` is the baseline task's report, passed only so Ray runs this task once the baseline is stored.
    """
    from quantlab.pipeline import _cached_fingerprint

    started = time.perf_counter()
    directory = Path(cache_dir)
    if not (directory / probe).is_file():
        raise CacheNotShared(
            f"the results cache {directory} is not visible on node {_node()}: the planning process left "
            f"{probe} there and this worker cannot see it. Every Ray node must see the cache directory at the "
            f"same path (a shared file system such as NFS); point {RESULTS_CACHE_ENV} at one")
    runner = _worker_runner(spec, directory)
    actual = runner.cache_key(spec, spec.schemes[scheme])
    if actual != key:
        raise KeyMismatch(
            f"this worker keys {scheme} as {actual}, the planning process as {key}: the worker's quantlab "
            "source, result libraries (torch, numpy, ...), model files or device differ from the planner's "
            "(device: auto resolves on each machine); install the same quantlab and libraries on every node")
    writes = runner.cache.writes
    with torch_threads(threads):
        runner.scheme_result(spec, scheme)
        computed = runner.cache.writes > writes
        for other in fingerprints:   # so the local process never loads the model for a fully cached run
            _cached_fingerprint(runner, other)
    return {"key": key, "node": _node(), "seconds": time.perf_counter() - started, "computed": computed,
            "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------
# On the planning process


def _error_text(error: BaseException) -> str:
    """The task's own exception in one line (Ray wraps it in a RayTaskError holding the remote traceback)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


def connect(address: Optional[str]):
    """Connect to the Ray cluster at ``address`` (``local``/None: start one on this machine); returns
    whether this call started the connection (and so should end it). An existing connection is kept."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError("running on Ray needs the ray package: pip install 'quantlab[ray]'") from None
    if ray.is_initialized():
        return False
    address = address or LOCAL
    if address == LOCAL:
        ray.init(address=LOCAL, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def fan_out(specs: Sequence[Spec], address: Optional[str] = None, *, cache_dir=None, progress: bool = True,
            threads: Optional[int] = None, cpus_per_task: Optional[float] = None) -> FanOut:
    """Compute every uncached unit of ``specs`` as a Ray task into the cache at ``cache_dir`` (default: the
    cache a run uses), on the cluster at ``address`` (None: a local one, started and stopped here; an
    existing ``ray.init`` connection is used as it is). Each task computes on ``threads`` torch threads
    (default: this process's) and declares ``cpus_per_task`` CPUs (default: as many as its threads, at
    most the largest node's, so no task waits for a node that cannot exist), and a GPU for a spec on
    cuda. Progress: one line per finished task and an overall bar. Returns a FanOut; failed units are in
    its ``failures``, and nothing is raised for them."""
    import torch
    from tqdm import tqdm

    from quantlab.files import write_text

    started = time.perf_counter()
    cache_dir = Path(cache_dir or default_cache_dir()).expanduser().resolve()
    cache = SchemeCache(cache_dir)
    units = plan(specs, cache)
    result = FanOut(units=units, finished=[], failures={}, seconds=0.0, cache_dir=cache_dir)
    if not units:
        result.seconds = time.perf_counter() - started
        return result

    import ray

    threads = threads or torch.get_num_threads()
    probe = f".ray-probe-{uuid.uuid4().hex}"
    write_text(cache_dir / probe, "quantlab: every Ray worker must see this file\n")
    started_here = False
    try:
        started_here = connect(address)
        if cpus_per_task is None:
            largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
            cpus_per_task = max(1, min(threads, largest))
        task = ray.remote(compute_unit)
        refs, by_ref = {}, {}
        for unit in units:   # baselines first, so their references exist when the others are submitted
            ref = task.options(num_cpus=cpus_per_task, num_gpus=1 if unit.cuda else 0, max_retries=MAX_RETRIES,
                               retry_exceptions=False, name=f"quantlab {unit.label}").remote(
                unit.spec, unit.scheme, unit.key, str(cache_dir), probe, threads, unit.fingerprints,
                refs.get(unit.after))
            refs[unit.key] = ref
            by_ref[ref] = unit
        pending = list(by_ref)
        bar = tqdm(total=len(units), desc="quantlab on ray", unit="task", disable=not progress)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                unit = by_ref[done[0]]
                try:
                    report = ray.get(done[0])
                except Exception as e:   # the task raised, its worker died past the retries, or its baseline failed
                    result.failures[unit.key] = _error_text(e)
                    line = f"FAILED {unit.label} ({unit.spec.name}): {result.failures[unit.key]}"
                else:
                    result.finished.append(Finished(unit, report["node"], report["seconds"], report["computed"],
                                                    report["pid"]))
                    line = f"done   {unit.label} ({unit.spec.name}) on {report['node']} in {report['seconds']:.1f} s"
                bar.update(1)
                if progress:
                    bar.write(line)
        finally:
            bar.close()
    finally:
        if started_here:
            ray.shutdown()
        (cache_dir / probe).unlink(missing_ok=True)
    _name_failed_baselines(result)
    result.seconds = time.perf_counter() - started
    return result


def _name_failed_baselines(result: FanOut) -> None:
    """A unit whose baseline failed never ran: say so, rather than repeat the baseline's error as its own."""
    by_key = {u.key: u for u in result.units}
    for unit in result.units:
        if unit.after in result.failures and unit.key in result.failures:
            result.failures[unit.key] = (f"not run: its baseline {by_key[unit.after].label} failed "
                                         f"({result.failures[unit.after]})")


def failure_message(spec: Spec, errors: Sequence[str]) -> str:
    """The one message a spec with failed units fails with (CLI and pytest)."""
    return (f"{len(errors)} unit(s) of {spec.source} failed on the Ray cluster, so its results are incomplete; "
            "the others are stored in the cache:\n" + "\n".join(f"  {e}" for e in errors))
