"""What does fanning the MiniGPT catalogue out on Ray buy on one machine, and what does Ray cost per task?

    python benchmarks/bench_ray.py                # specs/minigpt/*.yaml, each timing from a fresh temporary cache
    python benchmarks/bench_ray.py --threads 2    # torch threads per scheme (sequential and per task alike)

Three cold runs of the whole catalogue (schemes, sweep points, reports; nothing cached before each):

- sequential: ``quantlab.run`` spec after spec, in this process;
- ray: a local 2-worker cluster (``ray.init(num_cpus=2)``, its start-up timed apart), ``fan_out`` of every
  unit as a task, then the same ``quantlab.run`` calls, which find every scheme cached;
- the per-task scheduling overhead, two ways: the round trip of a no-op task on the warm cluster
  (submit, run, get; median of 50), and the fan-out's wall time x 2 workers less the seconds the tasks
  reported computing, per task (idle workers while baselines finish, stragglers, worker start-up).

Every task computes on as many torch threads as this process (quantlab.distributed explains why: results
depend on the thread count) and declares as many CPUs, so the comparison is at equal threads per scheme:
one by default, two tasks at a time on the 2-CPU cluster. With ``--threads 2`` on a 2-CPU cluster the
tasks run one at a time, and the figure is Ray's overhead alone.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench_gptq.py: shared machines

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

CATALOGUE = Path(__file__).resolve().parent.parent / "specs" / "minigpt"


def run_all(specs, cache_dir: Path, out_dir: Path) -> None:
    from quantlab.pipeline import run

    for spec in specs:
        run(spec, cache_dir=cache_dir, out_dir=out_dir / spec.name)


def noop() -> int:
    return 0


def main() -> None:
    import ray

    from quantlab.cache import SchemeCache
    from quantlab.distributed import fan_out, plan
    from quantlab.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per scheme (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = [load_spec(p) for p in sorted(CATALOGUE.glob("*.yaml"))]
    print(f"{len(specs)} specs in {CATALOGUE}, torch {torch.__version__}, {args.threads} torch thread(s) per scheme, "
          f"{os.cpu_count()} CPU(s)")

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        planned = len(plan(specs, SchemeCache(tmp / "seq-cache")))
        started = time.perf_counter()
        run_all(specs, tmp / "seq-cache", tmp / "seq-out")
        sequential = time.perf_counter() - started
        units = len([p for p in (tmp / "seq-cache").glob("*.json") if not p.name.startswith("fingerprint-")])

        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, logging_level="WARNING")
        startup = time.perf_counter() - started
        try:
            started = time.perf_counter()
            fanned = fan_out(specs, cache_dir=tmp / "ray-cache", progress=False)
            fanned_seconds = time.perf_counter() - started
            run_all(specs, tmp / "ray-cache", tmp / "ray-out")
            on_ray = time.perf_counter() - started

            task = ray.remote(num_cpus=1)(noop)
            ray.get(task.remote())   # a warm worker
            trips = []
            for _ in range(50):
                t = time.perf_counter()
                ray.get(task.remote())
                trips.append(time.perf_counter() - t)
        finally:
            ray.shutdown()

    assert not fanned.failures, fanned.failures
    busy = sum(f.seconds for f in fanned.finished)
    idle_per_task = (fanned_seconds * 2 - busy) / len(fanned.finished)
    print(f"units (scheme x sweep point, distinct keys): {planned} planned, {units} stored by the sequential run, "
          f"{len(fanned.units)} Ray tasks")
    if not planned == units == len(fanned.units):
        print("  (the counts differ: quantlab's source changed during the benchmark, and with it every key)")
    print(f"sequential, cold:                 {sequential:7.1f} s  (1.00x)")
    print(f"ray, 2 workers, cold:             {on_ray:7.1f} s  ({sequential / on_ray:.2f}x faster), of which fan-out "
          f"{fanned_seconds:.1f} s and the cached runs {on_ray - fanned_seconds:.1f} s; cluster start-up "
          f"{startup:.1f} s more ({sequential / (on_ray + startup):.2f}x with it)")
    print(f"task seconds reported by workers: {busy:7.1f} s  ({busy / sequential:.2f}x the sequential wall time)")
    print(f"scheduling overhead per task:     {statistics.median(trips) * 1e3:7.1f} ms no-op round trip (median of "
          f"50); {idle_per_task:.2f} s of worker time per task not spent computing in the fan-out")


if __name__ == "__main__":
    main()
