"""The per-layer error heatmap: each quantized layer's relative output error per scheme, with round-to-
nearest on the same Hessian beside every GPTQ scheme, and how many times smaller GPTQ's error is
(rtn_rel_loss / rel_loss). Reads the results.json shape; returns the PNG's path or None."""
from __future__ import annotations

import re

from quantlab.analysis import is_number, scheme_method, scheme_order, scheme_results

# Beyond this many layers one row per layer is unreadable; the heatmap switches to block x kind panels.
MAX_LAYER_ROWS = 48


def natural_key(text: str):
    """'blocks.10.attn' sorts after 'blocks.2.attn'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def layer_values(scheme_result, metric) -> dict:
    layers = (scheme_result or {}).get("layers") or {}
    return {name: v[metric] for name, v in layers.items() if is_number((v or {}).get(metric))}


def error_columns(results, metric="rel_loss"):
    """(columns, ratios): columns {label: {layer: value}} in scheme order, each GPTQ scheme followed by
    its RTN counterpart ("<scheme>: RTN", rtn_rel_loss on the same Hessian) unless an identical RTN
    column is already shown; ratios {scheme: {layer: rtn_rel_loss / rel_loss}} per GPTQ scheme."""
    rs = scheme_results(results)
    columns, ratios, shown_rtn = {}, {}, []
    for s in scheme_order(results):
        values = layer_values(rs[s], metric)
        if not values:
            continue
        columns[s] = values
        rtn = layer_values(rs[s], "rtn_rel_loss") if metric == "rel_loss" else {}
        if not rtn or scheme_method(results, s) not in ("gptq", None):
            continue
        rounded = {n: float(f"{v:.3g}") for n, v in rtn.items()}   # RTN on near-identical Hessians: one column
        if rounded not in shown_rtn:
            shown_rtn.append(rounded)
            columns[f"{s}: RTN"] = rtn
        ratio = {n: rtn[n] / v for n, v in values.items() if n in rtn and v > 0}
        if ratio:
            ratios[s] = ratio
    return columns, ratios


def plot_per_layer(results, path, metric="rel_loss"):
    """Heatmap of ``metric`` per layer and scheme (log colour scale), RTN beside GPTQ, and beside it the
    RTN/GPTQ error ratio per layer.

    Up to MAX_LAYER_ROWS layers: one row per layer, one column per scheme, values in the cells.
    More (a 30-block model has 210): one panel per column, layer kinds (q_proj, mlp.c_fc, ...)
    against block index, which is also where sensitive kinds and blocks stand out.
    """
    from matplotlib.colors import LogNorm

    from quantlab.report.plots import _figure, _save_png, _title

    columns, ratios = error_columns(results, metric)
    positive = [v for values in columns.values() for v in values.values() if v > 0]
    if not positive:
        return None
    low, high = min(positive), max(positive)
    norm = LogNorm(vmin=low, vmax=high if high > low else low * 10)  # one value still needs a range
    layers = sorted({layer for values in columns.values() for layer in values}, key=natural_key)
    positions = {layer: _block_and_kind(layer) for layer in layers}
    ratio_values = [v for r in ratios.values() for v in r.values() if v > 0]
    ratio_norm = None
    if ratio_values:
        lo, hi = min(ratio_values + [1.0]), max(ratio_values + [1.0])
        ratio_norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    if len(layers) > MAX_LAYER_ROWS and all(positions.values()):
        fig = _panels(_figure, columns, ratios, positions, norm, ratio_norm, metric)
    else:
        fig = _rows(_figure, columns, ratios, layers, norm, ratio_norm, metric)
    what = f"per-layer {metric}" + (", RTN beside GPTQ" if ratios else "")
    fig.suptitle(_title(results, what), fontsize=10)
    return _save_png(fig, path)


def _block_and_kind(layer):
    """'model.layers.12.self_attn.q_proj' -> (12, 'self_attn.q_proj'); None without a block index."""
    match = re.match(r"^(?:.*?\.)?(\d+)\.(.+)$", layer)
    return (int(match[1]), match[2]) if match else None


def _masked_log_cells(grid):
    """Mask what a log colour scale cannot show (missing, zero): drawn grey."""
    import numpy as np

    return np.ma.masked_where(~(np.isfinite(grid) & (grid > 0)), grid)


def _colours(name="viridis"):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="lightgray")


def _cell_texts(ax, grid, norm, fmt, dark_high=False):
    """Values in the cells, white on the colour map's dark end (viridis: low values; YlGn: high ones)."""
    import numpy as np

    if grid.size > 260:  # numbers in the cells stay legible only on small grids
        return
    for (row, col), v in np.ndenumerate(grid):
        if np.isfinite(v):
            dark = v > 0 and (norm(v) > 0.6 if dark_high else norm(v) < 0.5)
            ax.text(col, row, fmt(v), ha="center", va="center", fontsize=6, color="white" if dark else "black")


def _rows(figure, columns, ratios, layers, norm, ratio_norm, metric):
    import numpy as np

    labels = list(columns)
    grid = np.array([[columns[c].get(layer, np.nan) for c in labels] for layer in layers], dtype=float)  # (L, C)
    ratio_labels = list(ratios)
    width = 3 + 0.75 * len(labels) + (1.5 + 0.75 * len(ratio_labels) if ratios else 0)
    fig = figure(min(width, 18), 2.2 + 0.22 * len(layers))
    if ratios:
        ax, rax = fig.subplots(1, 2, sharey=True, width_ratios=[max(len(labels), 1), max(len(ratio_labels), 1)])
    else:
        ax, rax = fig.subplots(), None
    image = ax.imshow(_masked_log_cells(grid), aspect="auto", norm=norm, cmap=_colours(), interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    _cell_texts(ax, grid, norm, lambda v: f"{v:.2g}")
    ax.set_title(f"{metric} (lower is better)", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"{metric} (log scale)", shrink=0.8)
    if rax is not None:
        rgrid = np.array([[ratios[s].get(layer, np.nan) for s in ratio_labels] for layer in layers], dtype=float)
        rimage = rax.imshow(_masked_log_cells(rgrid), aspect="auto", norm=ratio_norm, cmap=_colours("YlGn"),
                            interpolation="nearest")
        rax.set_xticks(range(len(ratio_labels)), ratio_labels, rotation=35, ha="right", fontsize=7)
        _cell_texts(rax, rgrid, ratio_norm, lambda v: f"{v:.2g}×", dark_high=True)
        rax.set_title("RTN ÷ GPTQ error (×, higher: GPTQ helps more)", fontsize=9)
        fig.colorbar(rimage, ax=rax, label="rtn_rel_loss / rel_loss (log scale)", shrink=0.8)
    return fig


def _panels(figure, columns, ratios, positions, norm, ratio_norm, metric):
    import numpy as np

    kinds = sorted({kind for _, kind in positions.values()}, key=natural_key)
    blocks = sorted({block for block, _ in positions.values()})
    panels = [(label, values, norm, f"{label}: {metric}") for label, values in columns.items()]
    panels += [(s, r, ratio_norm, f"{s}: RTN ÷ GPTQ error (×)") for s, r in ratios.items()]
    fig = figure(12, 1 + len(panels) * (0.8 + 0.25 * len(kinds)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    images = {}
    for ax, (label, values, panel_norm, title) in zip(axes, panels):
        grid = np.full((len(kinds), len(blocks)), np.nan)  # (kinds, blocks)
        for layer, v in values.items():
            block, kind = positions[layer]
            grid[kinds.index(kind), blocks.index(block)] = v
        cmap = _colours() if panel_norm is norm else _colours("YlGn")
        image = ax.imshow(_masked_log_cells(grid), aspect="auto", norm=panel_norm, cmap=cmap, interpolation="nearest")
        images.setdefault(id(panel_norm), ([], image))[0].append(ax)   # one colour bar per scale
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[-1].set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    axes[-1].set_xlabel("block")
    for axes_of, image in images.values():
        label = f"{metric} (log scale)" if image.norm is norm else "rtn_rel_loss / rel_loss (log scale)"
        fig.colorbar(image, ax=axes_of, label=label)
    return fig
