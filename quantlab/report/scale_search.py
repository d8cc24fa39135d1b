"""The scale-search plot: what ``scale_search: mse`` changed per layer, and the shrink factors it chose.

For every scheme with ``scale_search: mse`` (layers carrying ``shrink_counts``): the left column shows, per
layer in model order, its error with the search divided by the same scheme's without it (the spec's scheme
that differs only in ``scale_search``), 1 being no change; the error is the relative output
error ``rel_loss`` when both schemes measured it (calibrated schemes: GPTQ, AWQ) and else the relative weight
error ``weight_rel_error`` (plain round-to-nearest, which sees no calibration inputs). Below it, each layer's
mean shrink factor (stored scale over the absmax scale). The right column is the distribution of the chosen
factors over every group of every layer. Split from ``quantlab.report.plots``, which wires it in as the
``scale_search`` plot.
"""
from __future__ import annotations

from quantlab.analysis import is_number, scheme_order, scheme_results
from quantlab.report.awq import model_order_key
from quantlab.report.mixed_precision import short_layer

CAPTION = ("Scale search (scale_search: mse): per layer, the error with the search over the error of the same scheme "
           "without it (left; below the dotted line at 1 the search helped): the relative output error on calibration inputs "
           "where both schemes measured one (GPTQ, AWQ), else the relative weight error ||W − Ŵ||² / ||W||² "
           "(round-to-nearest sees no calibration data). Below it, each layer's mean shrink factor of the absmax "
           "scale; right, the share of groups at each factor (1.0 = the absmax scale kept). With GPTQ's dynamic groups "
           "the search ran on the solver's updated weights, so the factor is read against the original weights' range "
           "('other': off the grid).")
COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
# Keys of a scheme's description that must agree for another scheme to be "the same without the search".
TWIN_KEYS = ("method", "awq", "bits", "granularity", "group_size", "symmetric", "grid", "act_order", "static_groups",
             "damp", "block_size")


def searched_layers(results) -> dict:
    """{scheme: {layer: stats}} for the schemes whose layers record the shrink factors their scale search chose,
    in scheme order, each scheme's layers in model order."""
    out = {}
    rs = scheme_results(results)
    for name in scheme_order(results):
        layers = (rs.get(name) or {}).get("layers") or {}
        chosen = {layer: v for layer, v in layers.items()
                  if isinstance(v, dict) and isinstance(v.get("shrink_counts"), dict)}
        if chosen:
            out[name] = dict(sorted(chosen.items(), key=lambda item: model_order_key(item[0])))
    return out


def absmax_twin(results, scheme):
    """The spec's scheme identical to ``scheme`` but for its scale search (absmax), or None."""
    metas = results.get("schemes") or {}
    meta = metas.get(scheme) or {}
    for other in scheme_order(results):
        other_meta = metas.get(other) or {}
        if other != scheme and other_meta.get("scale_search", "absmax") == "absmax" \
                and all(other_meta.get(k) == meta.get(k) for k in TWIN_KEYS):
            return other
    return None


def error_ratios(results, scheme, twin, names):
    """(metric, [with / without per layer, None where either is missing]): ``rel_loss`` when both schemes
    recorded it for every layer that has it in ``scheme``, else ``weight_rel_error``."""
    rs = scheme_results(results)
    mine = (rs.get(scheme) or {}).get("layers") or {}
    theirs = (rs.get(twin) or {}).get("layers") or {}
    for metric in ("rel_loss", "weight_rel_error"):
        pairs = [((mine.get(n) or {}).get(metric), (theirs.get(n) or {}).get(metric)) for n in names]
        if any(is_number(a) and is_number(b) for a, b in pairs):
            return metric, [a / b if is_number(a) and is_number(b) and b > 0 and a > 0 else None for a, b in pairs]
    return None, [None] * len(names)


def factor_keys(schemes) -> list:
    """The shrink factors that occur in any scheme, largest first, 'other' last."""
    keys = {k for layers in schemes.values() for v in layers.values() for k in v["shrink_counts"]}
    return sorted((k for k in keys if k != "other"), key=float, reverse=True) + (["other"] if "other" in keys else [])


def plot_scale_search(results, path, figure, save):
    """Draw into ``path`` with the report's ``figure(width, height)`` and ``save(fig, path)``; None when no
    scheme in the results recorded a scale search."""
    schemes = searched_layers(results)
    if not schemes:
        return None
    names = sorted({n for layers in schemes.values() for n in layers}, key=model_order_key)
    index = {n: i for i, n in enumerate(names)}
    width = min(18.0, max(10.0, 0.16 * len(names) + 6.5))
    fig = figure(width, 6.4)
    axes = fig.subplot_mosaic([["ratio", "hist"], ["shrink", "hist"]], width_ratios=[2.6, 1], height_ratios=[1.4, 1])
    ratio_ax, shrink_ax, hist_ax = axes["ratio"], axes["shrink"], axes["hist"]
    shrink_ax.sharex(ratio_ax)
    compared, twins = [], []
    metric_labels = {"rel_loss": "output error", "weight_rel_error": "weight error"}
    for k, (scheme, layers) in enumerate(schemes.items()):
        colour = COLOURS[k % len(COLOURS)]
        twin = absmax_twin(results, scheme)
        if twin is not None:
            twins.append(twin)
            metric, ratios = error_ratios(results, scheme, twin, list(layers))
            points = [(index[n], r) for n, r in zip(layers, ratios) if is_number(r)]
            if points:
                mean = sum(p[1] for p in points) / len(points)
                better = sum(p[1] < 1 for p in points)
                ratio_ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color=colour, lw=1, ms=4,
                              label=f"{scheme} / {twin} ({metric_labels[metric]}): mean {mean:.3g}, "
                                    f"lower on {better} of {len(points)}")
                compared.append(scheme)
        means = [(index[n], v.get("shrink_mean")) for n, v in layers.items() if is_number(v.get("shrink_mean"))]
        shrink_ax.plot([p[0] for p in means], [p[1] for p in means], "-o", color=colour, lw=1, ms=4, label=scheme)
    ratio_ax.axhline(1.0, color="0.3", linestyle=":", linewidth=1)
    ratio_ax.set_ylabel("error with search /\nerror without")
    ratio_ax.grid(True, axis="y", alpha=0.3)
    if compared:
        ratio_ax.legend(fontsize=7, loc="best")
    else:
        why = (f"{', '.join(twins)}: no per-layer error recorded to compare with" if twins else
               "no scheme here differs from a scale-searched one only in scale_search:\n"
               "add the same scheme without it to compare errors")
        ratio_ax.text(0.5, 0.5, why, transform=ratio_ax.transAxes, ha="center", va="center", fontsize=8, color="0.35")
    ratio_ax.tick_params(labelbottom=False)
    shrink_ax.set_ylabel("mean shrink factor\n(1 = absmax)")
    shrink_ax.set_xlim(-0.6, len(names) - 0.4)
    shrink_ax.grid(True, axis="y", alpha=0.3)
    shrink_ax.legend(fontsize=7, loc="best")
    step = max(1, len(names) // 60)   # at most ~60 tick labels: beyond that, every step-th layer
    shrink_ax.set_xticks(range(0, len(names), step))
    shrink_ax.set_xticklabels([short_layer(n) for n in names[::step]], rotation=90, fontsize=7)

    keys = factor_keys(schemes)
    bar = 0.8 / len(schemes)
    for k, (scheme, layers) in enumerate(schemes.items()):
        totals = {key: sum(v["shrink_counts"].get(key, 0) for v in layers.values()) for key in keys}
        groups = sum(totals.values()) or 1
        hist_ax.barh([i - 0.4 + bar * (k + 0.5) for i in range(len(keys))], [totals[key] / groups for key in keys],
                     height=bar, color=COLOURS[k % len(COLOURS)], label=scheme)
    hist_ax.set_yticks(range(len(keys)), keys, fontsize=7)
    hist_ax.invert_yaxis()   # 1.000 (absmax) on top, the strongest shrink at the bottom
    hist_ax.set_ylabel("shrink factor of the absmax scale")
    hist_ax.set_xlabel("share of groups")
    from matplotlib.ticker import PercentFormatter

    hist_ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    hist_ax.grid(True, axis="x", alpha=0.3)
    hist_ax.legend(fontsize=7, loc="lower right")
    spec = results.get("spec")
    fig.suptitle(f"{spec + ': ' if spec else ''}scale search (mse) against the absmax scale", fontsize=10)
    return save(fig, path)


def scale_search_sentences(results) -> list:
    """One sentence per scale-searched scheme: the most chosen shrink factor and, against its absmax twin
    where the spec has one, the mean per-layer error ratio and on how many layers the search lowered it."""
    sentences = []
    labels = {"rel_loss": "output error", "weight_rel_error": "weight error"}
    for scheme, layers in searched_layers(results).items():
        totals = {}
        for v in layers.values():
            for key, n in v["shrink_counts"].items():
                totals[key] = totals.get(key, 0) + n
        groups = sum(totals.values())
        if not groups:
            continue
        top = max(totals, key=lambda key: (totals[key], key))
        kept = totals.get(f"{1.0:.3f}", 0) / groups
        sentence = (f"Scale search, {scheme}: the most chosen shrink factor is {top} ({totals[top] / groups:.0%} of "
                    f"groups); {kept:.0%} keep the absmax scale")
        twin = absmax_twin(results, scheme)
        if twin is not None:
            metric, ratios = error_ratios(results, scheme, twin, list(layers))
            ratios = [r for r in ratios if is_number(r)]
            if ratios:
                sentence += (f"; its layers' {labels[metric]} is {sum(ratios) / len(ratios):.3g}x {twin}'s on average, "
                             f"lower on {sum(r < 1 for r in ratios)} of {len(ratios)} layers")
        sentences.append(sentence + ".")
    return sentences
