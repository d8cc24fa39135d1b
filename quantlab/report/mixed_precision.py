"""The mixed-precision plot: each layer's assigned bits, with the sensitivity that chose them.

For every mixed scheme in the results (layers carrying ``bits`` and ``sensitivity``): the top panel is
the assigned width per layer (bars, coloured by candidate), the bottom panel each candidate's estimated
loss per layer (log scale, one line per candidate, the chosen candidate's point filled). Layers are in
model order, so sensitive blocks and kinds show as columns. Split from ``quantlab.report.plots``, which
wires it in as the ``mixed_precision`` plot.
"""
from __future__ import annotations

from quantlab.analysis import is_number, scheme_order, scheme_results
from quantlab.report.heatmap import natural_key

CAPTION = ("Mixed precision: the width each layer was assigned (top) and each candidate's estimated loss for that "
           "layer (bottom, log scale; filled: the chosen candidate). The assignment minimises the summed estimate "
           "within the byte budget, so a layer keeps more bits where its estimated loss at fewer bits is large.")
COLOURS = ("tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown")


def mixed_layers(results) -> dict:
    """{scheme: {layer: stats}} for the schemes whose layers record a mixed assignment, in scheme order."""
    out = {}
    rs = scheme_results(results)
    for name in scheme_order(results):
        layers = (rs.get(name) or {}).get("layers") or {}
        chosen = {layer: v for layer, v in layers.items()
                  if isinstance(v, dict) and is_number(v.get("bits")) and isinstance(v.get("sensitivity"), dict)}
        if chosen:
            out[name] = dict(sorted(chosen.items(), key=lambda item: natural_key(item[0])))
    return out


def short_layer(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> '3.q_proj'; 'blocks.0.attn.c_attn' -> '0.attn.c_attn'."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if not digits:
        return name
    i = digits[-1]
    rest = parts[i + 1:]
    return ".".join([parts[i]] + (rest[-1:] if len(rest) > 1 and len(name) > 24 else rest))


def plot_mixed_precision(results, path, figure, save):
    """Draw into ``path`` with the report's ``figure(width, height)`` and ``save(fig, path)``; None when
    no scheme in the results is mixed."""
    schemes = mixed_layers(results)
    if not schemes:
        return None
    n_layers = max(len(layers) for layers in schemes.values())
    width = min(16.0, max(7.0, 0.16 * n_layers + 2))
    fig = figure(width, 4.6 * len(schemes))
    axes = fig.subplots(2 * len(schemes), 1, squeeze=False, height_ratios=[1, 1.4] * len(schemes))[:, 0]
    for k, (scheme, layers) in enumerate(schemes.items()):
        top, bottom = axes[2 * k], axes[2 * k + 1]
        names = list(layers)
        x = list(range(len(names)))
        candidates = list(next(iter(layers.values()))["sensitivity"])
        colour = {c: COLOURS[i % len(COLOURS)] for i, c in enumerate(candidates)}
        chosen = [layers[n].get("scheme") for n in names]
        top.bar(x, [layers[n]["bits"] for n in names], color=[colour.get(c, "gray") for c in chosen], width=0.85)
        top.set_ylabel("bits")
        top.set_xlim(-0.6, len(names) - 0.4)
        top.set_xticks([])
        counts = {c: chosen.count(c) for c in candidates}
        top.set_title(f"{results.get('spec') or ''}: {scheme} — " + ", ".join(f"{c} x{n}" for c, n in counts.items()),
                      fontsize=10)
        for c in candidates:
            values = [layers[n]["sensitivity"].get(c) for n in names]
            points = [(i, v) for i, v in zip(x, values) if is_number(v) and v > 0]
            if not points:
                continue
            bottom.plot([p[0] for p in points], [p[1] for p in points], "-", color=colour[c], lw=1, alpha=0.7, label=c)
            picked = [(i, v) for i, v in points if chosen[i] == c]
            if picked:
                bottom.plot([p[0] for p in picked], [p[1] for p in picked], "o", color=colour[c], ms=4)
            others = [(i, v) for i, v in points if chosen[i] != c]
            if others:
                bottom.plot([p[0] for p in others], [p[1] for p in others], "o", mfc="none", color=colour[c], ms=3,
                            alpha=0.6)
        bottom.set_yscale("log")
        proxy = (((results.get("schemes") or {}).get(scheme) or {}).get("mixed") or {}).get("proxy")
        bottom.set_ylabel({"kl_estimate": "estimated KL increase\n(nats per token)",
                           "output_error": "output error tr(D H D^T)"}.get(proxy, "estimated loss"))
        bottom.set_xlim(-0.6, len(names) - 0.4)
        bottom.grid(True, which="major", axis="y", alpha=0.3)
        bottom.legend(fontsize=7, loc="best", ncol=len(candidates))
        step = max(1, len(names) // 60)   # at most ~60 tick labels: beyond that, every step-th layer
        bottom.set_xticks(x[::step])
        bottom.set_xticklabels([short_layer(n) for n in names[::step]], rotation=90, fontsize=7)
    return save(fig, path)
