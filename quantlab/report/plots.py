"""The report's plots: Pareto curve, task accuracy, error against calibration size, per-layer error,
and the decode roofline. Each takes a results dict (the results.json shape) and a path, and returns the
PNG's path, or None when the results hold nothing to draw.

Plots are drawn on ``matplotlib.figure.Figure`` objects rather than through pyplot: no global figure
registry (nothing to close or leak) and no backend switching inside a host process such as pytest or
a notebook. PNG bytes are rendered by Agg and written without a Software/date stamp, so the same
results give the same file.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

from quantlab.analysis import is_number, pareto_frontier, scheme_method, scheme_order, scheme_results, usable
from quantlab.files import write_bytes
from quantlab.roofline import attainable_gflops, decode_intensity, decode_seconds, measure_machine, ridge_intensity

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


def natural_key(text: str):
    """'blocks.10.attn' sorts after 'blocks.2.attn'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _figure(width, height):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the report's plots need matplotlib: pip install 'quantlab[report]'") from None

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_png(fig, path) -> Path:
    buffer = io.BytesIO()
    # No Software/date metadata: identical results give byte-identical files.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return write_bytes(path, buffer.getvalue())


def _title(results, what):
    spec = results.get("spec")
    return f"{spec}: {what}" if spec else what


def plot_pareto(results, path):
    """bytes_total (log x) against perplexity, a labelled dot per scheme, the frontier as a staircase."""
    from matplotlib.lines import Line2D

    candidates = [s for s in scheme_order(results) if usable(results, s)]
    if not candidates:
        return None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    rs = scheme_results(results)
    for s in candidates:
        colour = METHOD_COLOURS.get(scheme_method(results, s), UNKNOWN_METHOD_COLOUR)
        ax.scatter(rs[s]["bytes_total"], rs[s]["ppl"], color=colour, zorder=3)
        ax.annotate(s, (rs[s]["bytes_total"], rs[s]["ppl"]), xytext=(4, 4), textcoords="offset points", fontsize=8)
    frontier = pareto_frontier(results)
    # where="post": between two frontier sizes the best reachable ppl is the smaller scheme's.
    ax.step([rs[s]["bytes_total"] for s in frontier], [rs[s]["ppl"] for s in frontier],
            where="post", color="black", linewidth=1, zorder=2)
    handles = [Line2D([], [], color="black", linewidth=1, label="frontier")]
    baseline = results.get("baseline")
    if baseline in candidates:
        ax.axhline(rs[baseline]["ppl"], color="gray", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="gray", linestyle=":", label=f"baseline ({baseline})"))
    methods = sorted({scheme_method(results, s) for s in candidates} - {None})
    handles += [Line2D([], [], marker="o", linestyle="", color=METHOD_COLOURS.get(m, UNKNOWN_METHOD_COLOUR), label=m)
                for m in methods]
    ax.set_xscale("log")
    ppls = [rs[s]["ppl"] for s in candidates]
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
    rs = scheme_results(results)
    schemes = [s for s in scheme_order(results) if rs[s].get("tasks")]
    tasks = sorted({t for s in schemes for t, v in rs[s]["tasks"].items() if is_number((v or {}).get("acc"))})
    if not tasks:
        return None
    fig = _figure(min(max(6, 1.5 + 0.5 * len(schemes) * len(tasks)), 16), 4)
    ax = fig.subplots()
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        xs, accs, errs = [], [], []
        for x, s in enumerate(schemes):
            entry = rs[s]["tasks"].get(task) or {}
            if is_number(entry.get("acc")):
                xs.append(x - 0.4 + width * (i + 0.5))
                accs.append(entry["acc"])
                errs.append(entry["acc_stderr"] if is_number(entry.get("acc_stderr")) else 0.0)
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
    return {name: v[metric] for name, v in layers.items() if is_number((v or {}).get(metric))}


def plot_calibration_size(results, path):
    """Mean and per-layer rel_loss against calibration samples (log x), one panel per GPTQ scheme
    (every scheme with per-layer losses when none is marked GPTQ)."""
    sweep = calibration_sweep(results)
    if sweep is None:
        return None
    samples = sweep.get("values") or []
    runs = sweep.get("results") or []
    with_data = sorted({s for run in runs for s, r in (run or {}).items() if _layer_values(r, "rel_loss")})
    gptq = [s for s in with_data if scheme_method(results, s) == "gptq"]
    schemes = gptq or with_data
    if not schemes:
        return None
    ncols = min(len(schemes), 3)
    nrows = math.ceil(len(schemes) / ncols)
    fig = _figure(4 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, scheme in zip(axes, schemes):
        per_run = [_layer_values((run or {}).get(scheme), "rel_loss") for run in runs]
        layers = sorted({layer for values in per_run for layer in values}, key=natural_key)
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

    rs = scheme_results(results)
    values = {s: _layer_values(rs[s], metric) for s in scheme_order(results)}
    schemes = [s for s, v in values.items() if v]
    positive = [v for s in schemes for v in values[s].values() if v > 0]
    if not positive:
        return None
    low, high = min(positive), max(positive)
    norm = LogNorm(vmin=low, vmax=high if high > low else low * 10)  # one value still needs a range
    layers = sorted({layer for s in schemes for layer in values[s]}, key=natural_key)
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

    kinds = sorted({kind for _, kind in positions.values()}, key=natural_key)
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
        if candidate and is_number(candidate.get("peak_gflops")) and is_number(candidate.get("bandwidth_gbs")):
            return candidate
    return None


def decode_points(results) -> dict:
    model = results.get("model") or {}
    if not (model.get("params_matmul") or model.get("params_linear")):
        return {}
    rs = scheme_results(results)
    return {s: decode_intensity(rs[s], model) for s in scheme_order(results) if is_number(rs[s].get("bytes_total"))}


def plot_roofline(results, machine, path):
    """The machine's roofline with each scheme's decode step placed on it."""
    import numpy as np
    from matplotlib import colormaps

    points = decode_points(results)
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
                   color=colours(i % 10), marker=METHOD_MARKERS.get(scheme_method(results, scheme), "D"),
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
    if not decode_points(results):
        return None  # nothing to place on it: skip the seconds a measurement would cost
    return plot_roofline(results, machine_ceilings(results, machine) or measure_machine(), path)
