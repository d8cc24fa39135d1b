"""The report's plots: Pareto curve, task accuracy, error against calibration size, the decode
roofline, (from ``quantlab.report.heatmap``) per-layer error, (from
``quantlab.report.calibration_data``) quality per calibration corpus, and from their own modules the
mixed-precision assignment, AWQ's alphas and errors, and the scale search's effect and shrink factors. Each takes a results dict (the results.json shape) and a path, and returns the
PNG's path, or None when the results hold nothing to draw.

Plots are drawn on ``matplotlib.figure.Figure`` objects rather than through pyplot: no global figure
registry (nothing to close or leak) and no backend switching inside a host process such as pytest or
a notebook. PNG bytes are rendered by Agg and written without a Software/date stamp, so the same
results give the same file.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import math
from pathlib import Path

from quantlab.analysis import is_number, pareto_frontier, scheme_method, scheme_order, scheme_results, usable
from quantlab.files import write_bytes
from quantlab.report import awq as _awq
from quantlab.report import calibration_data as _calibration_data
from quantlab.report import mixed_precision as _mixed_precision
from quantlab.report import scale_search as _scale_search
from quantlab.report.heatmap import MAX_LAYER_ROWS, layer_values, natural_key, plot_per_layer  # noqa: F401
from quantlab.report.units import _fmt_bytes
from quantlab.roofline import (KERNEL_LABELS, attainable_gflops, decode_intensity, decode_seconds, measure_machine,
                               ridge_intensity)

log = logging.getLogger("quantlab")

# The one table of plot names: the spec schema (report.plots) and the report both read it.
PLOTS = ("pareto", "accuracy", "calibration_size", "per_layer", "roofline", "calibration_data", "mixed_precision",
         "awq", "scale_search")

PLOT_CAPTIONS = {
    "pareto": "Size against perplexity, with ± 1 standard error of each perplexity over evaluation windows "
              "(schemes are scored on the same windows, so their differences are tighter than the bars: see "
              "the ppl gap column). The black staircase is the frontier: for any byte budget, the best "
              "perplexity any scheme reaches within it.",
    "accuracy": "Task accuracy per scheme with binomial standard errors; the axis is zoomed to the "
                "measured range, and the dotted line is the baseline's accuracy.",
    "calibration_size": "Relative output error of each quantized layer on held-out windows (not seen in "
                        "calibration) against the number of calibration samples: thin lines are layers, the "
                        "thick line their mean. The dashed line is the in-sample error on the calibration "
                        "windows themselves, which need not fall: fitting more data exactly is harder.",
    "per_layer": "Relative output error (rel_loss) of every quantized layer, log colour scale, with "
                 "round-to-nearest on the same Hessian (\"<scheme>: RTN\") beside each GPTQ scheme; on the right, "
                 "how many times smaller GPTQ's error is than RTN's. Grey: not quantized or not recorded.",
    "roofline": "Roofline of one batch-1 decode step on this machine: each scheme's arithmetic "
                "intensity (every weight byte, scale and activation read) against the measured "
                "compute and bandwidth ceilings. Hollow markers are measured: batch-1 matmuls through the "
                "block Linears with torch's float32 F.linear and its int8 and INT4 weight-only CPU kernels, "
                "at the intensity of the bytes each reads and the GFLOP/s it reached.",
    "calibration_data": _calibration_data.CAPTION,
    "mixed_precision": _mixed_precision.CAPTION,
    "awq": _awq.CAPTION,
    "scale_search": _scale_search.CAPTION,
}

METHOD_COLOURS = {"float": "tab:gray", "rtn": "tab:blue", "gptq": "tab:red"}
UNKNOWN_METHOD_COLOUR = "tab:purple"
METHOD_MARKERS = {"float": "o", "rtn": "s", "gptq": "^"}
MEASURED_COLOURS = {"fp32": "dimgray", "int8": "tab:green", "int4": "tab:red"}
MEASURED_MARKERS = {"fp32": "o", "int8": "D", "int4": "P"}


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_png(fig, path) -> Path:
    buffer = io.BytesIO()
    # No Software/date metadata: identical results give byte-identical files.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return write_bytes(path, buffer.getvalue())


def _title(results, what):
    spec = results.get("spec")
    return f"{spec}: {what}" if spec else what


def _bytes_axis(axis):
    """Byte sizes in human units on a (log) axis: '300 kB', '1.2 MB', never '1e+06'."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_bytes(v)))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def spread_labels(wanted, sep, low=0.03, high=0.97):
    """Vertical label positions (axes fraction) for labels wanted at ``wanted``: at least ``sep`` apart,
    each crowded group stacked and centred on the points it labels, all kept inside [low, high]."""
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i], i))
    clusters = [[i] for i in order]   # each: label indices in order, laid out ``sep`` apart

    def start(cluster):   # first position of a cluster centred on its points
        return sum(wanted[i] for i in cluster) / len(cluster) - sep * (len(cluster) - 1) / 2

    merged = True
    while merged:   # merge neighbouring stacks that overlap until none does
        merged = False
        for k in range(len(clusters) - 1):
            a, b = clusters[k], clusters[k + 1]
            if start(a) + sep * len(a) > start(b):
                clusters[k:k + 2] = [a + b]
                merged = True
                break
    ranked = [i for cluster in clusters for i in cluster]
    pos = [start(cluster) + sep * n for cluster in clusters for n in range(len(cluster))]
    # Keep inside [low, high]: push up from the bottom, then down from the top (both when crowded).
    for k in range(len(pos)):
        pos[k] = max(pos[k], low if k == 0 else pos[k - 1] + sep)
    for k in reversed(range(len(pos))):
        pos[k] = min(pos[k], high if k == len(pos) - 1 else pos[k + 1] - sep)
    placed = dict(zip(ranked, pos))
    return [placed[i] for i in range(len(wanted))]


def annotate_without_overlap(ax, points, labels, fontsize=7, axes_height_pt=220.0, axes_width_pt=380.0):
    """Label each (x, y) data point beside it; labels that would overprint are spread vertically and
    joined to their point by a thin leader line. Deterministic: placement depends only on the data."""
    to_axes = ax.transScale + ax.transLimits   # data -> axes fraction, whatever the axes' final size
    where = [tuple(to_axes.transform(p)) for p in points]
    sep = 1.35 * fontsize / axes_height_pt
    right = [fx < 0.62 for fx, _ in where]     # labels go right of a point, left of one near the right edge
    groups = {}
    for i, (fx, _) in enumerate(where):
        # points whose labels would share columns: same side, within a label's width
        width = (len(labels[i]) * 0.55 * fontsize) / axes_width_pt
        key = next((k for k in groups if k[0] == right[i] and abs(k[1] - fx) < width), (right[i], fx))
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        ys = spread_labels([where[i][1] for i in members], sep)
        for i, y in zip(members, ys):
            fx, fy = where[i]
            dx = 0.025 if right[i] else -0.025
            moved = abs(y - fy) > sep / 3
            ax.annotate(labels[i], points[i], xytext=(fx + dx * (2.2 if moved else 1), y), textcoords="axes fraction",
                        fontsize=fontsize, va="center", ha="left" if right[i] else "right",
                        arrowprops={"arrowstyle": "-", "color": "0.55", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 3}
                        if moved else None)


def plot_pareto(results, path):
    """bytes_total (log x, human units) against perplexity with standard-error bars, every scheme
    labelled (labels that would overlap are spread out), the frontier as a staircase."""
    from matplotlib.lines import Line2D

    candidates = [s for s in scheme_order(results) if usable(results, s)]
    if not candidates:
        return None
    fig = _figure(7.5, 5)
    ax = fig.subplots()
    rs = scheme_results(results)
    for s in candidates:
        colour = METHOD_COLOURS.get(scheme_method(results, s), UNKNOWN_METHOD_COLOUR)
        err = rs[s].get("ppl_stderr")
        ax.errorbar(rs[s]["bytes_total"], rs[s]["ppl"], yerr=err if is_number(err) else None, color=colour,
                    marker=METHOD_MARKERS.get(scheme_method(results, s), "D"), markersize=5, capsize=3,
                    elinewidth=1, linestyle="", zorder=3)
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
    handles += [Line2D([], [], marker=METHOD_MARKERS.get(m, "D"), linestyle="",
                       color=METHOD_COLOURS.get(m, UNKNOWN_METHOD_COLOUR), label=m) for m in methods]
    if any(is_number(rs[s].get("ppl_stderr")) for s in candidates):
        handles.append(Line2D([], [], color="0.3", marker="|", linestyle="", markersize=10, label="± 1 standard error"))
    ax.set_xscale("log")
    ppls = [rs[s]["ppl"] for s in candidates]
    # A broken scheme (ppl in the thousands) would flatten every other dot onto one line.
    if min(ppls) > 0 and max(ppls) / min(ppls) > 10:
        ax.set_yscale("log")
    sizes = [rs[s]["bytes_total"] for s in candidates]
    ax.set_xlim(min(sizes) / 1.25, max(sizes) * 1.25)
    _bytes_axis(ax.xaxis)
    ax.set_xlabel("model size: bytes_total (log scale)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(_title(results, "size against perplexity"), fontsize=10)
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    ax.autoscale_view()
    annotate_without_overlap(ax, [(rs[s]["bytes_total"], rs[s]["ppl"]) for s in candidates], candidates,
                             axes_height_pt=5 * 72 * 0.72, axes_width_pt=7.5 * 72 * 0.8)
    return _save_png(fig, path)


def plot_task_accuracy(results, path):
    """Accuracy per scheme and task as points with binomial standard-error bars, the axis zoomed to
    where the points and their bars lie (not 0 to 1), the baseline's accuracy as a dotted line."""
    rs = scheme_results(results)
    schemes = [s for s in scheme_order(results) if rs[s].get("tasks")]
    tasks = sorted({t for s in schemes for t, v in rs[s]["tasks"].items() if is_number((v or {}).get("acc"))})
    if not tasks:
        return None
    fig = _figure(min(max(6, 2 + 0.55 * len(schemes) * max(1, len(tasks) ** 0.5)), 16), 4.2)
    ax = fig.subplots()
    width = 0.6 / len(tasks)
    lows, highs = [], []
    for i, task in enumerate(tasks):
        xs, accs, errs = [], [], []
        for x, s in enumerate(schemes):
            entry = rs[s]["tasks"].get(task) or {}
            if is_number(entry.get("acc")):
                err = entry.get("acc_stderr")
                xs.append(x - 0.3 + width * (i + 0.5))
                accs.append(entry["acc"])
                errs.append(err if is_number(err) else 0.0)
        lows += [a - e for a, e in zip(accs, errs)]
        highs += [a + e for a, e in zip(accs, errs)]
        line = ax.errorbar(xs, accs, yerr=errs, marker="o", markersize=5, linestyle="", capsize=3, label=task)
        base = (rs.get(results.get("baseline"), {}).get("tasks") or {}).get(task) or {}
        if is_number(base.get("acc")):
            ax.axhline(base["acc"], color=line[0].get_color(), linestyle=":", linewidth=1)
    low, high = min(lows), max(highs)
    pad = max(0.15 * (high - low), 0.01)
    ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    ax.set_xticks(range(len(schemes)), schemes, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(schemes) - 0.4)
    ax.set_ylabel("accuracy (axis zoomed; ± 1 standard error)")
    ax.set_title(_title(results, "task accuracy (dotted: baseline)"), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save_png(fig, path)


def calibration_sweep(results):
    """The first sweep over calibration.samples, or None."""
    for sweep in results.get("sweeps") or []:
        if sweep.get("key") == "calibration.samples":
            return sweep
    return None


def plot_calibration_size(results, path):
    """Held-out relative error against calibration samples (log x), one panel per GPTQ scheme (every
    scheme with per-layer losses when none is marked GPTQ): thin lines per layer, the thick line their
    mean (``mean_heldout_rel_loss`` where recorded). Held-out error is what more data lowers; the
    in-sample error on the calibration windows themselves, which need not fall, is drawn dashed and
    labelled as such. Without held-out measurements the in-sample error is drawn, and titled so."""
    sweep = calibration_sweep(results)
    if sweep is None:
        return None
    samples = sweep.get("values") or []
    runs = sweep.get("results") or []
    with_data = sorted({s for run in runs for s, r in (run or {}).items() if layer_values(r, "rel_loss")
                        or layer_values(r, "heldout_rel_loss")})
    gptq = [s for s in with_data if scheme_method(results, s) == "gptq"]
    schemes = gptq or with_data
    if not schemes:
        return None
    heldout = any(layer_values((run or {}).get(s), "heldout_rel_loss") for run in runs for s in schemes)
    metric = "heldout_rel_loss" if heldout else "rel_loss"
    ncols = min(len(schemes), 3)
    nrows = math.ceil(len(schemes) / ncols)
    fig = _figure(4.3 * ncols, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, scheme in zip(axes, schemes):
        entries = [(run or {}).get(scheme) or {} for run in runs]
        per_run = [layer_values(entry, metric) for entry in entries]
        layers = sorted({layer for values in per_run for layer in values}, key=natural_key)
        for layer in layers:
            xs = [n for n, values in zip(samples, per_run) if layer in values]
            ax.plot(xs, [values[layer] for values in per_run if layer in values], color="tab:blue",
                    linewidth=0.6, alpha=0.3)
        means = [(n, _mean_of(entry, values, "mean_" + metric)) for n, entry, values in zip(samples, entries, per_run)
                 if values]
        ax.plot([n for n, _ in means], [m for _, m in means], color="black", linewidth=2, marker="o",
                label="held-out error, mean over layers" if heldout else "in-sample error, mean over layers")
        if heldout:
            fitted = [(n, _mean_of(entry, layer_values(entry, "rel_loss"), "mean_rel_loss"))
                      for n, entry in zip(samples, entries) if layer_values(entry, "rel_loss")]
            if fitted:
                ax.plot([n for n, _ in fitted], [m for _, m in fitted], color="0.45", linewidth=1.2, linestyle="--",
                        marker=".", label="in-sample error (on the calibration windows)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(samples, [str(n) for n in samples], minor=False)
        ax.minorticks_off()
        if all(v > 0 for values in per_run for v in values.values()):
            ax.set_yscale("log")
        ax.set_title(scheme, fontsize=9)
        ax.set_xlabel("calibration samples (windows)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("held-out relative output error" if heldout else "in-sample relative output error (rel_loss)")
    axes[0].legend(fontsize=7)
    for ax in axes[len(schemes):]:
        ax.set_visible(False)
    what = "held-out error against calibration size" if heldout else \
        "in-sample error against calibration size (no held-out windows measured)"
    fig.suptitle(_title(results, what), fontsize=10)
    return _save_png(fig, path)


def _mean_of(entry, values, recorded):
    """The scheme's recorded mean (e.g. mean_heldout_rel_loss), else the mean of its layers' values."""
    return entry[recorded] if is_number(entry.get(recorded)) else sum(values.values()) / len(values)


def machine_ceilings(results, machine=None):
    """The roofline ceilings to use: ``machine`` if given, else those recorded in the results,
    else None (the caller decides whether to measure)."""
    for candidate in (machine, results.get("machine")):
        if candidate and is_number(candidate.get("peak_gflops")) and is_number(candidate.get("bandwidth_gbs")):
            return candidate
    return None


def measured_kernels(results, machine=None) -> dict:
    """The measured low-bit kernels ({name: entry} of ``roofline.measure_lowbit_kernels``'s "kernels")
    from ``machine`` if it holds them, else from the results' recorded machine; {} when neither does."""
    for candidate in (machine, results.get("machine")):
        kernels = ((candidate or {}).get("lowbit_kernels") or {}).get("kernels") or {}
        kernels = {name: k for name, k in kernels.items()
                   if is_number(k.get("intensity")) and is_number(k.get("gflops")) and k["gflops"] > 0}
        if kernels:
            return kernels
    return {}


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
    measured = measured_kernels(results, machine)
    intensities = [p["intensity"] for p in points.values()] + [k["intensity"] for k in measured.values()]
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
    # Measured points: hollow, so they read as measurements beside the filled theoretical ones.
    for name, kernel in measured.items():
        threads = kernel.get("threads")
        ax.scatter(kernel["intensity"], kernel["gflops"], zorder=4, facecolors="none", linewidths=1.5, s=60,
                   edgecolors=MEASURED_COLOURS.get(name, "black"), marker=MEASURED_MARKERS.get(name, "o"),
                   label=f"measured: {KERNEL_LABELS.get(name, name)}, {kernel['tokens_per_second']:,.0f} tok/s "
                         f"(block Linears{f', {threads} thread' + ('s' if threads != 1 else '') if threads else ''})")
    ax.legend(fontsize=7, loc="lower right")
    lowest = min([attainable_gflops(min(intensities + [ridge]) / 10, machine)]
                 + [k["gflops"] for k in measured.values()])
    ax.set_ylim(bottom=lowest / 2, top=max([machine["peak_gflops"]] + [k["gflops"] for k in measured.values()]) * 2)
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
    if names and importlib.util.find_spec("matplotlib") is None:
        # `pip install quantlab` is the engine: without the [report] extra the run still writes its
        # results and a page without plots, and says once how to get them.
        log.warning("plots skipped: they need matplotlib (pip install 'quantlab[report]')")
        return {}
    out_dir = Path(out_dir)
    drawers = {
        "pareto": lambda path: plot_pareto(results, path),
        "accuracy": lambda path: plot_task_accuracy(results, path),
        "calibration_size": lambda path: plot_calibration_size(results, path),
        "per_layer": lambda path: plot_per_layer(results, path),
        "roofline": lambda path: _draw_roofline(results, machine, path),
        "calibration_data": lambda path: _calibration_data.plot_calibration_data(results, path, _figure, _save_png),
        "mixed_precision": lambda path: _mixed_precision.plot_mixed_precision(results, path, _figure, _save_png),
        "awq": lambda path: _awq.plot_awq(results, path, _figure, _save_png),
        "scale_search": lambda path: _scale_search.plot_scale_search(results, path, _figure, _save_png),
    }
    written = {name: drawers[name](out_dir / f"{name}.png") for name in names}
    return {name: path for name, path in written.items() if path is not None}


def _draw_roofline(results, machine, path):
    if not decode_points(results):
        return None  # nothing to place on it: skip the seconds a measurement would cost
    return plot_roofline(results, machine_ceilings(results, machine) or measure_machine(), path)
