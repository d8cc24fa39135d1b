"""The quantization report: results.json, manifest.json, plots, tables and an interpretation.

Everything here reads a results dict shaped as in DESIGN.md ("results.json") and nothing else, so a
report can be rebuilt from a results.json on disk. Besides the documented keys it uses, when present:
- ``results["schemes"][name]``: {"method": "gptq"|"rtn"|"float", "bits", "granularity",
  "group_size", "symmetric", "grid"} to tell GPTQ schemes apart and pair each with the RTN scheme on
  the same grid;
- ``results["model"]``: {"params_linear", "params_total", and from ``roofline.decode_workload``
  "params_matmul", "activation_elements", "n_matmuls"} for the roofline;
- ``results["machine"]["peak_gflops"]`` and ``["bandwidth_gbs"]`` (``measure_machine()``), else the
  ceilings are measured when the roofline is drawn.
A missing piece makes the matching plot or sentence disappear; it never raises.

Plots are drawn on ``matplotlib.figure.Figure`` objects rather than through pyplot: no global figure
registry (nothing to close or leak) and no backend switching inside a host process such as pytest or
a notebook. PNG bytes are rendered by Agg and written without a Software/date stamp, so the same
results give the same file.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import numbers
import os
import platform
import re
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from quantlab import __version__
from quantlab.roofline import (attainable_gflops, decode_intensity, decode_seconds, decode_workload,  # noqa: F401
                               measure_machine, ridge_intensity)

PLOTS = ("pareto", "accuracy", "calibration_size", "per_layer", "roofline")

PLOT_CAPTIONS = {
    "pareto": "Size against perplexity. The black staircase is the frontier: for any byte budget, "
              "the best perplexity any scheme reaches within it.",
    "accuracy": "Task accuracy per scheme, with binomial standard errors.",
    "calibration_size": "Relative output error (rel_loss) against the number of calibration samples: "
                        "thin lines are layers, the thick line their mean.",
    "per_layer": "Relative output error (rel_loss) of every quantized layer, log colour scale; grey: "
                 "not quantized or not recorded.",
    "roofline": "Roofline of one batch-1 decode step on this machine: each scheme's arithmetic "
                "intensity (every weight byte, scale and activation read) against the measured "
                "compute and bandwidth ceilings.",
}

METHOD_COLOURS = {"float": "tab:gray", "rtn": "tab:blue", "gptq": "tab:red"}
UNKNOWN_METHOD_COLOUR = "tab:purple"
METHOD_MARKERS = {"float": "o", "rtn": "s", "gptq": "^"}
MISSING = "—"


# ----------------------------------------------------------------------------------------------
# Files: JSON and atomic writes


def to_jsonable(obj):
    """A copy of ``obj`` that json can write: NaN and infinities become None (JSON has no NaN, and
    results.json promises null for "not computed"), tuples become lists, numpy/torch scalars and
    arrays become Python numbers and lists, paths become strings."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy or torch scalars and arrays
        return to_jsonable(obj.tolist())
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON ({obj!r:.80}); convert it to a number, "
                    "string, list or dict first")


def write_json(path, obj) -> Path:
    """Write ``obj`` as JSON (sorted keys, indent 2) atomically; NaN/inf are written as null."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"
    return _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_write_bytes(path, data: bytes) -> Path:
    """Write to a temporary file beside ``path``, then rename it over ``path``: readers (CI gates,
    parallel pytest workers) see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# manifest.json


def manifest(spec_name, spec_sha256, seed) -> dict:
    """What produced a run: spec, seed, software versions, machine, git revision, time (UTC)."""
    return {
        "spec": spec_name,
        "spec_sha256": spec_sha256,
        "seed": seed,
        "quantlab_version": __version__,
        "versions": _versions(),
        "machine": _machine_description(),
        "git": _git_state(Path.cwd()),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _versions() -> dict:
    def installed(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    versions = {"python": platform.python_version()}
    for package in ("torch", "numpy", "transformers", "gguf", "safetensors", "matplotlib"):
        versions[package] = installed(package)
    return versions


def _machine_description() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _physical_memory_bytes(),
        "python_implementation": platform.python_implementation(),
    }


def _physical_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX, or the name is unknown here
        return None


def _git_state(directory: Path) -> dict:
    """Revision and dirtiness of the git checkout containing ``directory``; nulls when git is
    missing or this is not a checkout (an installed package, a tarball)."""
    def git(*args):
        done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        revision = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if revision else None
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": revision, "dirty": None if status is None else bool(status)}


# ----------------------------------------------------------------------------------------------
# Reading a results dict


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _scheme_results(results) -> dict:
    return results.get("results") or {}


def _meta(results, scheme) -> dict:
    return (results.get("schemes") or {}).get(scheme) or {}


def _method(results, scheme):
    return _meta(results, scheme).get("method")


def scheme_order(results) -> list:
    """Schemes from largest to smallest model, then by name: a stable order whatever the key order
    of the dict (results.json is written with sorted keys)."""
    def key(name):
        size = _scheme_results(results)[name].get("bytes_total")
        return (0 if _is_number(size) else 1, -(size if _is_number(size) else 0), name)

    return sorted(_scheme_results(results), key=key)


def _ppl_gap(results, scheme):
    """The scheme's recorded ppl_gap, else computed from its and the baseline's ppl."""
    r = _scheme_results(results).get(scheme) or {}
    if _is_number(r.get("ppl_gap")):
        return r["ppl_gap"]
    base = _scheme_results(results).get(results.get("baseline")) or {}
    if _is_number(r.get("ppl")) and _is_number(base.get("ppl")) and base["ppl"] > 0:
        return r["ppl"] / base["ppl"] - 1
    return None


def _usable(results, scheme) -> bool:
    """A scheme can be compared and shipped: finite ppl and size, and no NaN in its outputs."""
    r = _scheme_results(results)[scheme]
    return _is_number(r.get("ppl")) and _is_number(r.get("bytes_total")) and not r.get("nan_count")


def _natural_key(text: str):
    """'blocks.10.attn' sorts after 'blocks.2.attn'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# ----------------------------------------------------------------------------------------------
# The Pareto frontier


def pareto_frontier(results, ppl_rtol: float = 0.0) -> list:
    """Schemes no other scheme dominates, ordered by bytes_total. A dominates B when A has at most B's
    bytes and a perplexity lower than B's by more than ``ppl_rtol`` (relative; 0 = any amount, with a
    tie going to the smaller scheme). Schemes with a NaN, or a null ppl or size, are left out."""
    points = {s: (r["bytes_total"], r["ppl"]) for s, r in _scheme_results(results).items()
              if _usable(results, s)}
    frontier = [s for s, p in points.items() if not any(_dominates(q, p, ppl_rtol) for q in points.values())]
    return sorted(frontier, key=lambda s: (points[s], s))


def _dominates(a, b, ppl_rtol: float = 0.0) -> bool:
    if ppl_rtol > 0:
        return a[0] <= b[0] and a[1] < b[1] * (1 - ppl_rtol)
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def _dominator(results, scheme, frontier):
    """The smallest frontier scheme that dominates ``scheme``."""
    r = _scheme_results(results)[scheme]
    point = (r["bytes_total"], r["ppl"])
    for f in frontier:
        q = _scheme_results(results)[f]
        if _dominates((q["bytes_total"], q["ppl"]), point):
            return f
    return None


# ----------------------------------------------------------------------------------------------
# Plots: each returns the PNG's path, or None when the results hold nothing to draw


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_png(fig, path) -> Path:
    buffer = io.BytesIO()
    # No Software/date metadata: identical results give byte-identical files.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return _atomic_write_bytes(path, buffer.getvalue())


def _title(results, what):
    spec = results.get("spec")
    return f"{spec}: {what}" if spec else what


def plot_pareto(results, path):
    """bytes_total (log x) against perplexity, a labelled dot per scheme, the frontier as a staircase."""
    from matplotlib.lines import Line2D

    usable = [s for s in scheme_order(results) if _usable(results, s)]
    if not usable:
        return None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    rs = _scheme_results(results)
    for s in usable:
        colour = METHOD_COLOURS.get(_method(results, s), UNKNOWN_METHOD_COLOUR)
        ax.scatter(rs[s]["bytes_total"], rs[s]["ppl"], color=colour, zorder=3)
        ax.annotate(s, (rs[s]["bytes_total"], rs[s]["ppl"]), xytext=(4, 4), textcoords="offset points", fontsize=8)
    frontier = pareto_frontier(results)
    # where="post": between two frontier sizes the best reachable ppl is the smaller scheme's.
    ax.step([rs[s]["bytes_total"] for s in frontier], [rs[s]["ppl"] for s in frontier],
            where="post", color="black", linewidth=1, zorder=2)
    handles = [Line2D([], [], color="black", linewidth=1, label="frontier")]
    baseline = results.get("baseline")
    if baseline in usable:
        ax.axhline(rs[baseline]["ppl"], color="gray", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="gray", linestyle=":", label=f"baseline ({baseline})"))
    methods = sorted({_method(results, s) for s in usable} - {None})
    handles += [Line2D([], [], marker="o", linestyle="", color=METHOD_COLOURS.get(m, UNKNOWN_METHOD_COLOUR), label=m)
                for m in methods]
    ax.set_xscale("log")
    ppls = [rs[s]["ppl"] for s in usable]
    # A broken scheme (ppl in the thousands) would flatten every other dot onto one line.
    if min(ppls) > 0 and max(ppls) / min(ppls) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("model size: bytes_total (log scale)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(_title(results, "size against perplexity"), fontsize=10)
    ax.legend(handles=handles, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save_png(fig, path)


def plot_task_accuracy(results, path):
    """Grouped bars: one group per scheme, one bar per task, binomial standard error bars."""
    rs = _scheme_results(results)
    schemes = [s for s in scheme_order(results) if rs[s].get("tasks")]
    tasks = sorted({t for s in schemes for t, v in rs[s]["tasks"].items() if _is_number((v or {}).get("acc"))})
    if not tasks:
        return None
    fig = _figure(min(max(6, 1.5 + 0.5 * len(schemes) * len(tasks)), 16), 4)
    ax = fig.subplots()
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        xs, accs, errs = [], [], []
        for x, s in enumerate(schemes):
            entry = rs[s]["tasks"].get(task) or {}
            if _is_number(entry.get("acc")):
                xs.append(x - 0.4 + width * (i + 0.5))
                accs.append(entry["acc"])
                errs.append(entry["acc_stderr"] if _is_number(entry.get("acc_stderr")) else 0.0)
        ax.bar(xs, accs, width, yerr=errs, capsize=3, label=task)
    ax.set_xticks(range(len(schemes)), schemes, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(_title(results, "task accuracy"), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save_png(fig, path)


def calibration_sweep(results):
    """The first sweep over calibration.samples, or None."""
    for sweep in results.get("sweeps") or []:
        if sweep.get("key") == "calibration.samples":
            return sweep
    return None


def _layer_values(scheme_result, metric) -> dict:
    layers = (scheme_result or {}).get("layers") or {}
    return {name: v[metric] for name, v in layers.items() if _is_number((v or {}).get(metric))}


def plot_calibration_size(results, path):
    """Mean and per-layer rel_loss against calibration samples (log x), one panel per GPTQ scheme
    (every scheme with per-layer losses when none is marked GPTQ)."""
    sweep = calibration_sweep(results)
    if sweep is None:
        return None
    samples = sweep.get("values") or []
    runs = sweep.get("results") or []
    with_data = sorted({s for run in runs for s, r in (run or {}).items() if _layer_values(r, "rel_loss")})
    gptq = [s for s in with_data if _method(results, s) == "gptq"]
    schemes = gptq or with_data
    if not schemes:
        return None
    ncols = min(len(schemes), 3)
    nrows = math.ceil(len(schemes) / ncols)
    fig = _figure(4 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, scheme in zip(axes, schemes):
        per_run = [_layer_values((run or {}).get(scheme), "rel_loss") for run in runs]
        layers = sorted({layer for values in per_run for layer in values}, key=_natural_key)
        for layer in layers:
            xs = [n for n, values in zip(samples, per_run) if layer in values]
            ax.plot(xs, [values[layer] for values in per_run if layer in values], color="tab:blue",
                    linewidth=0.6, alpha=0.35)
        means = [(n, sum(v.values()) / len(v)) for n, v in zip(samples, per_run) if v]
        ax.plot([n for n, _ in means], [m for _, m in means], color="black", linewidth=2, marker="o",
                label="mean over layers")
        ax.set_xscale("log", base=2)
        ax.set_xticks(samples, [str(n) for n in samples], minor=False)
        ax.minorticks_off()
        if all(v > 0 for values in per_run for v in values.values()):
            ax.set_yscale("log")
        ax.set_title(scheme, fontsize=9)
        ax.set_xlabel("calibration samples")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("rel_loss")
    axes[0].legend(fontsize=8)
    for ax in axes[len(schemes):]:
        ax.set_visible(False)
    fig.suptitle(_title(results, "error against calibration size"), fontsize=10)
    return _save_png(fig, path)


# Beyond this many layers one row per layer is unreadable; the heatmap switches to block x kind panels.
MAX_LAYER_ROWS = 48


def plot_per_layer(results, path, metric="rel_loss"):
    """Heatmap of ``metric`` ('rel_loss' or 'rtn_rel_loss') per layer and scheme, log colour scale.

    Up to MAX_LAYER_ROWS layers: one row per layer, one column per scheme, values in the cells.
    More (a 30-block model has 210): one panel per scheme, layer kinds (q_proj, mlp.c_fc, ...)
    against block index, which is also where sensitive kinds and blocks stand out.
    """
    from matplotlib.colors import LogNorm

    rs = _scheme_results(results)
    values = {s: _layer_values(rs[s], metric) for s in scheme_order(results)}
    schemes = [s for s, v in values.items() if v]
    positive = [v for s in schemes for v in values[s].values() if v > 0]
    if not positive:
        return None
    low, high = min(positive), max(positive)
    norm = LogNorm(vmin=low, vmax=high if high > low else low * 10)  # one value still needs a range
    layers = sorted({layer for s in schemes for layer in values[s]}, key=_natural_key)
    positions = {layer: _block_and_kind(layer) for layer in layers}
    if len(layers) > MAX_LAYER_ROWS and all(positions.values()):
        fig = _per_layer_panels(values, schemes, positions, norm, metric)
    else:
        fig = _per_layer_rows(values, schemes, layers, norm, metric)
    fig.suptitle(_title(results, f"per-layer {metric}"), fontsize=10)
    return _save_png(fig, path)


def _block_and_kind(layer):
    """'model.layers.12.self_attn.q_proj' -> (12, 'self_attn.q_proj'); None without a block index."""
    match = re.match(r"^(?:.*?\.)?(\d+)\.(.+)$", layer)
    return (int(match[1]), match[2]) if match else None


def _masked_log_cells(grid):
    """Mask what a log colour scale cannot show (missing, zero): drawn grey."""
    import numpy as np

    return np.ma.masked_where(~(np.isfinite(grid) & (grid > 0)), grid)


def _heatmap_colours():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="lightgray")


def _per_layer_rows(values, schemes, layers, norm, metric):
    import numpy as np

    grid = np.array([[values[s].get(layer, np.nan) for s in schemes] for layer in layers], dtype=float)  # (L, S)
    fig = _figure(min(3 + 1.2 * len(schemes), 16), 1.5 + 0.22 * len(layers))
    ax = fig.subplots()
    image = ax.imshow(_masked_log_cells(grid), aspect="auto", norm=norm, cmap=_heatmap_colours(),
                      interpolation="nearest")
    ax.set_xticks(range(len(schemes)), schemes, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    if grid.size <= 200:  # numbers in the cells stay legible only on small grids
        for (row, col), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(col, row, f"{v:.2g}", ha="center", va="center", fontsize=6,
                        color="white" if v <= 0 or norm(v) < 0.5 else "black")
    fig.colorbar(image, ax=ax, label=f"{metric} (log scale)")
    return fig


def _per_layer_panels(values, schemes, positions, norm, metric):
    import numpy as np

    kinds = sorted({kind for _, kind in positions.values()}, key=_natural_key)
    blocks = sorted({block for block, _ in positions.values()})
    fig = _figure(12, 1 + len(schemes) * (0.8 + 0.25 * len(kinds)))
    axes = fig.subplots(len(schemes), 1, sharex=True, squeeze=False)[:, 0]
    for ax, scheme in zip(axes, schemes):
        grid = np.full((len(kinds), len(blocks)), np.nan)  # (kinds, blocks)
        for layer, v in values[scheme].items():
            block, kind = positions[layer]
            grid[kinds.index(kind), blocks.index(block)] = v
        image = ax.imshow(_masked_log_cells(grid), aspect="auto", norm=norm, cmap=_heatmap_colours(),
                          interpolation="nearest")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_title(scheme, fontsize=9)
    axes[-1].set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    axes[-1].set_xlabel("block")
    fig.colorbar(image, ax=list(axes), label=f"{metric} (log scale)")
    return fig


def machine_ceilings(results, machine=None):
    """The roofline ceilings to use: ``machine`` if given, else those recorded in the results,
    else None (the caller decides whether to measure)."""
    for candidate in (machine, results.get("machine")):
        if candidate and _is_number(candidate.get("peak_gflops")) and _is_number(candidate.get("bandwidth_gbs")):
            return candidate
    return None


def _decode_points(results) -> dict:
    model = results.get("model") or {}
    if not (model.get("params_matmul") or model.get("params_linear")):
        return {}
    rs = _scheme_results(results)
    return {s: decode_intensity(rs[s], model) for s in scheme_order(results) if _is_number(rs[s].get("bytes_total"))}


def plot_roofline(results, machine, path):
    """The machine's roofline with each scheme's decode step placed on it."""
    import numpy as np
    from matplotlib import colormaps

    points = _decode_points(results)
    if not points or machine is None:
        return None
    ridge = ridge_intensity(machine)
    intensities = [p["intensity"] for p in points.values()]
    xs = np.logspace(math.log10(min(intensities + [ridge]) / 10), math.log10(max(intensities + [ridge]) * 10), 200)
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    ax.loglog(xs, [attainable_gflops(x, machine) for x in xs], color="black", linewidth=1.5)
    ax.axvline(ridge, color="gray", linestyle=":", linewidth=1, label=f"ridge point: {ridge:.1f} FLOP/B")
    ax.text(ridge / 1.3, machine["peak_gflops"] * 1.15, "memory-bound", ha="right", fontsize=9, color="dimgray")
    ax.text(ridge * 1.3, machine["peak_gflops"] * 1.15, "compute-bound", ha="left", fontsize=9, color="dimgray")
    # Decode points crowd together on the bandwidth slope, so they are named in a legend (one
    # colour per scheme, one marker per method) rather than by labels that would overprint.
    colours = colormaps["tab10"]
    for i, (scheme, point) in enumerate(points.items()):
        tokens_per_second = 1 / decode_seconds(point, machine)
        ax.scatter(point["intensity"], attainable_gflops(point["intensity"], machine), zorder=3,
                   color=colours(i % 10), marker=METHOD_MARKERS.get(_method(results, scheme), "D"),
                   label=f"{scheme}: {point['intensity']:.2f} FLOP/B, {tokens_per_second:,.0f} tok/s")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(top=machine["peak_gflops"] * 2)
    ax.set_xlabel("arithmetic intensity of one decode step (FLOP/byte)")
    ax.set_ylabel("attainable GFLOP/s")
    ax.set_title(_title(results, f"decode roofline ({machine['peak_gflops']:.0f} GFLOP/s, "
                                  f"{machine['bandwidth_gbs']:.1f} GB/s measured)"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return _save_png(fig, path)


def make_plots(results, out_dir, which=None, machine=None) -> dict:
    """Draw every plot in ``which`` (default: all of PLOTS) whose data the results hold, as
    out_dir/<name>.png. The roofline measures this machine only if no ceilings are given or recorded.
    Returns {name: Path} for the plots drawn."""
    names = PLOTS if which is None else tuple(which)
    unknown = [n for n in names if n not in PLOTS]
    if unknown:
        raise ValueError(f"unknown plot name(s) {', '.join(map(repr, unknown))}; choose from {', '.join(PLOTS)}")
    out_dir = Path(out_dir)
    drawers = {
        "pareto": lambda path: plot_pareto(results, path),
        "accuracy": lambda path: plot_task_accuracy(results, path),
        "calibration_size": lambda path: plot_calibration_size(results, path),
        "per_layer": lambda path: plot_per_layer(results, path),
        "roofline": lambda path: _draw_roofline(results, machine, path),
    }
    written = {name: drawers[name](out_dir / f"{name}.png") for name in names}
    return {name: path for name, path in written.items() if path is not None}


def _draw_roofline(results, machine, path):
    if not _decode_points(results):
        return None  # nothing to place on it: skip the seconds a measurement would cost
    return plot_roofline(results, machine_ceilings(results, machine) or measure_machine(), path)


# ----------------------------------------------------------------------------------------------
# Tables


def _fmt_si(x, unit) -> str:
    """3 significant digits with a decimal prefix: 1234567 B -> '1.23 MB'."""
    if not _is_number(x):
        return MISSING
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _fmt_bytes(n) -> str:
    return _fmt_si(n, "B")


def _fmt_pct(x, signed=False) -> str:
    if not _is_number(x):
        return MISSING
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def _fmt_num(x, digits=4) -> str:
    return f"{x:.{digits}g}" if _is_number(x) else MISSING


def _fmt_with_error(x, err, formatter, error_formatter=None) -> str:
    if not _is_number(x):
        return MISSING
    if not _is_number(err):
        return formatter(x)
    return f"{formatter(x)} ± {(error_formatter or formatter)(err)}"


def _task_names(results) -> list:
    return sorted({t for r in _scheme_results(results).values() for t in (r.get("tasks") or {})})


def metrics_rows(results) -> tuple:
    """(header, rows) of the metrics table, every cell a string: one row per scheme."""
    tasks = _task_names(results)
    frontier = set(pareto_frontier(results))
    header = ["scheme", "method", "ppl", "ppl gap", "KLD", "top-1", *[f"{t} acc" for t in tasks],
              "NaNs", "bytes", "bits/weight", "frontier"]
    rows = []
    for s in scheme_order(results):
        r = _scheme_results(results)[s]
        task_cells = []
        for t in tasks:
            entry = (r.get("tasks") or {}).get(t) or {}
            task_cells.append(_fmt_with_error(entry.get("acc"), entry.get("acc_stderr"), _fmt_pct))
        rows.append([
            s, _method(results, s) or MISSING,
            _fmt_with_error(r.get("ppl"), r.get("ppl_stderr"), _fmt_num, lambda e: _fmt_num(e, 2)),
            "baseline" if s == results.get("baseline") else _fmt_pct(_ppl_gap(results, s), signed=True),
            _fmt_num(r.get("kld_mean"), 3), _fmt_pct(r.get("top1_agreement")), *task_cells,
            str(r["nan_count"]) if _is_number(r.get("nan_count")) else MISSING,
            _fmt_bytes(r.get("bytes_total")), _fmt_num(r.get("bits_per_weight"), 3),
            "yes" if s in frontier else "",
        ])
    return header, rows


def metrics_table_text(results) -> str:
    """The metrics table as aligned plain text, for terminals and notes."""
    header, rows = metrics_rows(results)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)]) + "\n"


def metrics_table_html(results) -> str:
    """The metrics table as an HTML <table>, every cell escaped; the baseline row is bold."""
    header, rows = metrics_rows(results)
    baseline = results.get("baseline")
    cell_style = 'style="padding:2px 8px;border-bottom:1px solid #ddd;text-align:right"'
    parts = ['<table class="quantlab-metrics" style="border-collapse:collapse;font-size:90%">',
             "<thead><tr>" + "".join(f"<th {cell_style}>{html.escape(h)}</th>" for h in header) + "</tr></thead>",
             "<tbody>"]
    for row in rows:
        row_style = ' style="font-weight:bold"' if row[0] == baseline else ""
        parts.append(f"<tr{row_style}>"
                     + "".join(f"<td {cell_style}>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Interpretation: sentences written from the numbers


def interpretation(results, memory_budget_bytes=None, dod_gap=0.15, hope_gap=0.05, machine=None) -> list:
    """What the numbers say, as sentences: the frontier, the best GPTQ scheme's gap against the DoD
    and the hope, the theoretical INT4 decode speed-up, the scheme to ship under a memory budget."""
    sentences = [_frontier_sentence(results)]
    sentences += _gptq_sentences(results, dod_gap, hope_gap)
    sentences += _speedup_sentences(results, machine_ceilings(results, machine))
    if memory_budget_bytes is not None:
        sentences.append(_budget_sentence(results, memory_budget_bytes))
    sentences += _health_sentences(results)
    return sentences


def _frontier_sentence(results) -> str:
    frontier = pareto_frontier(results)
    if not frontier:
        return "No scheme has a finite perplexity and size, so there is no size/perplexity frontier."
    rs = _scheme_results(results)
    listed = ", ".join(f"{s} ({_fmt_bytes(rs[s]['bytes_total'])}, ppl {_fmt_num(rs[s]['ppl'])})" for s in frontier)
    sentence = f"On the size/perplexity frontier (no other scheme is both smaller and better): {listed}."
    dominated = [s for s in scheme_order(results) if _usable(results, s) and s not in frontier]
    if dominated:
        by = {s: _dominator(results, s, frontier) for s in dominated}
        sentence += " Dominated: " + ", ".join(f"{s} (by {by[s]})" for s in dominated) + "."
    unusable = [s for s in scheme_order(results) if not _usable(results, s)]
    if unusable:
        sentence += " Left out for a NaN or a missing perplexity or size: " + ", ".join(unusable) + "."
    return sentence


def _same_grid_rtn(results, gptq_scheme):
    """The RTN scheme quantizing to the same grid as ``gptq_scheme``, if the run has one."""
    grid_keys = ("bits", "granularity", "group_size", "symmetric", "grid")
    target = _meta(results, gptq_scheme)
    if target.get("bits") is None:
        return None  # without its grid described, no pairing can be trusted
    for s in scheme_order(results):
        meta = _meta(results, s)
        if meta.get("method") == "rtn" and all(meta.get(k) == target.get(k) for k in grid_keys):
            return s
    return None


def _gptq_sentences(results, dod_gap, hope_gap) -> list:
    baseline = results.get("baseline")
    gaps = {s: _ppl_gap(results, s) for s in scheme_order(results)
            if _method(results, s) == "gptq" and _usable(results, s)}
    gaps = {s: g for s, g in gaps.items() if g is not None}
    if not gaps:
        return [f"No GPTQ scheme with a perplexity in this run, so the {dod_gap:.0%} DoD on the GPTQ gap "
                "is not assessed."]
    best = min(gaps, key=lambda s: (gaps[s], s))
    gap = gaps[best]
    if gap < hope_gap:
        verdict = f"meets both the {dod_gap:.0%} DoD and the {hope_gap:.0%} hope"
    elif gap < dod_gap:
        verdict = f"meets the {dod_gap:.0%} DoD but misses the {hope_gap:.0%} hope"
    else:
        verdict = f"misses the {dod_gap:.0%} DoD (and the {hope_gap:.0%} hope)"
    sentences = [f"The best GPTQ scheme, {best}, has a perplexity gap of {_fmt_pct(gap, signed=True)} "
                 f"against {baseline}: it {verdict}."]
    rtn = _same_grid_rtn(results, best)
    rtn_gap = _ppl_gap(results, rtn) if rtn and _usable(results, rtn) else None
    if rtn_gap is not None:
        if rtn_gap > 0 and gap < rtn_gap:
            sentences.append(f"Round-to-nearest on the same grid ({rtn}) has a gap of "
                             f"{_fmt_pct(rtn_gap, signed=True)}: GPTQ removes {1 - gap / rtn_gap:.0%} of it.")
        elif gap >= rtn_gap:
            sentences.append(f"GPTQ does not beat round-to-nearest on the same grid ({rtn}, gap "
                             f"{_fmt_pct(rtn_gap, signed=True)}): check the health events and the calibration data.")
    return sentences


def _speedup_sentences(results, machine) -> list:
    points = _decode_points(results)
    baseline = results.get("baseline")
    int4 = [s for s in points if _meta(results, s).get("bits") == 4 and _method(results, s) in ("gptq", "rtn")
            and _usable(results, s)]
    if baseline not in points or not int4:
        return []
    rs = _scheme_results(results)
    chosen = min(int4, key=lambda s: (rs[s]["ppl"], s))
    base, quant = points[baseline], points[chosen]
    intensity_ratio = quant["intensity"] / base["intensity"]
    sentence = (f"One decode step at batch 1 does {_fmt_si(base['flops'], 'FLOP')}; its arithmetic intensity is "
                f"{base['intensity']:.2f} FLOP/byte for {baseline} and {quant['intensity']:.2f} for {chosen} "
                f"({intensity_ratio:.1f}x, the ratio of bytes read per token)")
    if machine is None:
        return [sentence + f". Decode this far below any machine's ridge point is memory-bound, so the theoretical "
                           f"INT4 decode speed-up is {intensity_ratio:.1f}x."]
    ridge = ridge_intensity(machine)
    speedup = decode_seconds(base, machine) / decode_seconds(quant, machine)
    bound = "memory-bound" if quant["intensity"] < ridge else "compute-bound"
    return [sentence + f". This machine's ridge point is {ridge:.1f} FLOP/byte, so INT4 decode is {bound} here and "
                       f"its theoretical speed-up over {baseline} is {speedup:.1f}x "
                       f"({1 / decode_seconds(base, machine):,.0f} -> {1 / decode_seconds(quant, machine):,.0f} "
                       "tokens/s at the roofline)."]


def _budget_sentence(results, budget) -> str:
    rs = _scheme_results(results)
    usable = [s for s in scheme_order(results) if _usable(results, s)]
    fitting = [s for s in usable if rs[s]["bytes_total"] <= budget]
    if not fitting:
        if not usable:
            return f"No scheme has a finite perplexity and size to ship under the {_fmt_bytes(budget)} budget."
        smallest = min(usable, key=lambda s: (rs[s]["bytes_total"], s))
        return (f"No scheme fits the memory budget of {_fmt_bytes(budget)}: the smallest, {smallest}, "
                f"needs {_fmt_bytes(rs[smallest]['bytes_total'])}.")
    ship = min(fitting, key=lambda s: (rs[s]["ppl"], rs[s]["bytes_total"], s))
    return (f"Under a memory budget of {_fmt_bytes(budget)} (weights only), ship {ship}: the lowest perplexity "
            f"({_fmt_num(rs[ship]['ppl'])}, gap {_fmt_pct(_ppl_gap(results, ship), signed=True)}) of the "
            f"{len(fitting)} scheme(s) that fit, at {_fmt_bytes(rs[ship]['bytes_total'])}.")


def _health_sentences(results) -> list:
    sentences = []
    nan_schemes = [s for s in scheme_order(results) if _is_number(_scheme_results(results)[s].get("nan_count"))
                   and _scheme_results(results)[s]["nan_count"] > 0]
    if nan_schemes:
        sentences.append("NaN outputs in: " + ", ".join(
            f"{s} ({_scheme_results(results)[s]['nan_count']})" for s in nan_schemes) + ".")
    events = results.get("health") or []
    if events:
        counts = {}
        for event in events:
            counts[event.get("event")] = counts.get(event.get("event"), 0) + 1
        listed = ", ".join(f"{name}: {n}" for name, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
        sentences.append(f"{len(events)} health event(s) during quantization ({listed}).")
    return sentences


# ----------------------------------------------------------------------------------------------
# HTML and the files of a run


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_section(results, images: dict, memory_budget_bytes=None, machine=None) -> str:
    """A self-contained HTML fragment for one spec: metrics table, interpretation, the plots in
    ``images`` ({name: PNG path}) embedded as data URIs, and the evaluation protocol."""
    e = html.escape
    spec = results.get("spec") or "results"
    meta = f"seed {results.get('seed')}, baseline {results.get('baseline')}"
    if results.get("spec_sha256"):
        meta += f", spec sha256 {str(results['spec_sha256'])[:12]}"
    parts = [f'<section class="quantlab-report" style="font-family:sans-serif">',
             f"<h2>{e(str(spec))}</h2>", f"<p>{e(meta)}</p>", metrics_table_html(results),
             "<h3>Interpretation</h3>", "<ul>"]
    parts += [f"<li>{e(s)}</li>" for s in interpretation(results, memory_budget_bytes, machine=machine)]
    parts.append("</ul>")
    for name, path in images.items():
        caption = PLOT_CAPTIONS.get(name, name)
        parts.append(f'<figure><img src="{_data_uri(path)}" alt="{e(str(name))}" style="max-width:100%">'
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    fingerprint = results.get("fingerprint") or {}
    if fingerprint:
        rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(json.dumps(to_jsonable(v), sort_keys=True))}</td></tr>"
                       for k, v in sorted(fingerprint.items()))
        parts.append(f"<details><summary>Evaluation protocol (fingerprint)</summary><table>{rows}</table></details>")
    parts.append("</section>")
    return "\n".join(parts)


def write_report_files(results, out_dir, which=None, machine=None, memory_budget_bytes=None) -> dict:
    """Write out_dir/results.json, manifest.json, the plots and report.html (a standalone page).

    The manifest is ``results["manifest"]`` when the run recorded one, else built now from the
    spec name, hash and seed, keeping the run's recorded versions and machine if present.
    Returns {"results", "manifest", "html", and each plot's name: Path}.
    """
    out_dir = Path(out_dir)
    names = PLOTS if which is None else tuple(which)
    machine = machine_ceilings(results, machine)
    if machine is None and "roofline" in names and _decode_points(results):
        machine = measure_machine()  # measured once, so the plot and the sentences agree
    paths = {"results": write_json(out_dir / "results.json", results)}
    run_manifest = results.get("manifest")
    if not run_manifest:
        run_manifest = manifest(results.get("spec"), results.get("spec_sha256"), results.get("seed"))
        for recorded in ("versions", "machine"):
            if results.get(recorded):
                run_manifest[recorded] = {**run_manifest[recorded], **results[recorded]}
    paths["manifest"] = write_json(out_dir / "manifest.json", run_manifest)
    plots = make_plots(results, out_dir, which=which, machine=machine)
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>quantlab: {html.escape(str(results.get('spec') or 'results'))}</title></head><body>\n"
            + html_section(results, plots, memory_budget_bytes=memory_budget_bytes, machine=machine)
            + "\n</body></html>\n")
    paths["html"] = _atomic_write_bytes(out_dir / "report.html", page.encode("utf-8"))
    return {**paths, **plots}
