"""The AWQ plot: per Linear, the exponent AWQ chose for its input group and the output error it bought.

For every AWQ scheme in the results (``method: awq``, or ``method: gptq`` with ``awq: true``: the layers carry
``awq_alpha``): a short top panel with the chosen alpha of s = mean|x|^alpha per layer, and below it each
layer's relative output error with AWQ (``rel_loss``) against round-to-nearest of the same layer on the same
calibration inputs (``rtn_rel_loss``: AWQ's error before the search), log scale. For AWQ then GPTQ the GPTQ
scheme on the same grid without AWQ, when the spec has one, is drawn too (its own calibration pass, so its
inputs differ slightly from the layer's). Layers are in model order; the Linears of one input group (which
share one scale and one alpha) sit on one shaded band. Split from ``quantlab.report.plots``, which wires it in
as the ``awq`` plot.
"""
from __future__ import annotations

from quantlab.analysis import is_number, scheme_method, scheme_order, scheme_results
from quantlab.report.heatmap import natural_key
from quantlab.report.mixed_precision import short_layer

CAPTION = ("AWQ per Linear, in model order: the exponent alpha of the input scale s = mean|x|^alpha chosen for the "
           "layer's input group (top; alpha = 0 is plain round-to-nearest), and the layer's relative output error "
           "tr(D H Dᵀ) / tr(W H Wᵀ) on the calibration inputs with AWQ against round-to-nearest of the same layer on "
           "the same inputs (log scale). Shaded bands group the Linears that read one input and share its scale. "
           "For AWQ then GPTQ, the spec's GPTQ scheme on the same grid without AWQ is drawn dashed where there is one.")
# Keys of a scheme's description that must agree for another scheme to be "the same without AWQ".
TWIN_KEYS = ("bits", "granularity", "group_size", "symmetric", "grid", "scale_search", "act_order", "static_groups",
             "damp", "block_size")


# Linear names in the order a decoder block calls them, attention then MLP, for ordering results.json's
# layers, whose keys are written sorted: alphabetically, down_proj would come before q_proj. (GPT-2 names
# both the attention output and the MLP's second Linear c_proj: hence one order per section.)
ATTENTION_ORDER = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "qkv_proj", "query_key_value",
                   "Wqkv", "o_proj", "out_proj", "dense", "c_proj")
MLP_ORDER = ("gate_proj", "w1", "up_proj", "w3", "c_fc", "fc1", "dense_h_to_4h", "down_proj", "w2", "fc2", "c_proj",
             "dense_4h_to_h")


def model_order_key(name: str):
    """Sort key placing a block's Linears in call order: by block number, attention before the MLP, then by
    ``ATTENTION_ORDER`` or ``MLP_ORDER`` (names they do not know last, alphabetically); 'blocks.10' after
    'blocks.2'."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if not digits:
        return (natural_key(name), 0, 0, name)
    block = ".".join(parts[:digits[-1] + 1])
    rest = [p.lower() for p in parts[digits[-1] + 1:]]
    section = 1 if any(k in p for p in rest for k in ("mlp", "ffn", "feed_forward", "experts")) else 0
    order = MLP_ORDER if section else ATTENTION_ORDER
    rank = order.index(parts[-1]) if parts[-1] in order else len(order)
    return (natural_key(block), section, rank, name)


def awq_layers(results) -> dict:
    """{scheme: {layer: stats}} for the schemes whose layers record ``awq_alpha`` (only AWQ schemes do), in
    scheme order, each scheme's layers in model order."""
    out = {}
    rs = scheme_results(results)
    for name in scheme_order(results):
        layers = (rs.get(name) or {}).get("layers") or {}
        chosen = {layer: v for layer, v in layers.items() if isinstance(v, dict) and is_number(v.get("awq_alpha"))}
        if chosen:
            out[name] = dict(sorted(chosen.items(), key=lambda item: model_order_key(item[0])))
    return out


def gptq_twin(results, scheme):
    """The spec's GPTQ scheme without AWQ on the same grid and solver settings as the AWQ+GPTQ ``scheme``, or
    None (and None for a scheme that is not AWQ then GPTQ)."""
    metas = results.get("schemes") or {}
    meta = metas.get(scheme) or {}
    if scheme_method(results, scheme) != "gptq":
        return None
    for other in scheme_order(results):
        other_meta = metas.get(other) or {}
        if other != scheme and scheme_method(results, other) == "gptq" and not other_meta.get("awq") \
                and all(other_meta.get(k) == meta.get(k) for k in TWIN_KEYS):
            return other
    return None


def input_groups(names, layers) -> list:
    """Runs of consecutive layers in one input group (``awq_group``; a layer without it is its own group), as
    (first index, last index) pairs."""
    runs = []
    for i, name in enumerate(names):
        group = layers[name].get("awq_group") or name
        if runs and runs[-1][0] == group:
            runs[-1][2] = i
        else:
            runs.append([group, i, i])
    return [(first, last) for _, first, last in runs]


def plot_awq(results, path, figure, save):
    """Draw into ``path`` with the report's ``figure(width, height)`` and ``save(fig, path)``; None when no
    scheme in the results is AWQ with a recorded alpha."""
    from matplotlib.lines import Line2D

    schemes = awq_layers(results)
    if not schemes:
        return None
    n_layers = max(len(layers) for layers in schemes.values())
    # Few layers: the schemes side by side on one error scale (a full-width figure on the page); many
    # layers (SmolLM2's 210): one scheme per row, each as wide as the page allows.
    ncols = len(schemes) if n_layers * len(schemes) <= 64 else 1
    nrows = len(schemes) // ncols
    width = min(16.0, max(7.5, 0.16 * n_layers + 2.5) * ncols)
    fig = figure(max(width, 9.5), 4.8 * nrows)
    grid = fig.subplots(2 * nrows, ncols, squeeze=False, height_ratios=[1, 2] * nrows)
    bottoms = [grid[2 * (k // ncols) + 1, k % ncols] for k in range(len(schemes))]
    for ax in bottoms[1:]:
        ax.sharey(bottoms[0])
    rs = scheme_results(results)
    spec = results.get("spec")
    for k, (scheme, layers) in enumerate(schemes.items()):
        top, bottom = grid[2 * (k // ncols), k % ncols], bottoms[k]
        names = list(layers)
        x = list(range(len(names)))
        for n, (first, last) in enumerate(input_groups(names, layers)):
            if n % 2 == 0:
                for ax in (top, bottom):
                    ax.axvspan(first - 0.5, last + 0.5, color="0.92", zorder=0, linewidth=0)
        alphas = [layers[n]["awq_alpha"] for n in names]
        top.bar(x, alphas, color="tab:green", width=0.7, zorder=2)
        top.set_ylim(0, max(1.0, max(alphas) * 1.1))
        top.set_ylabel("alpha")
        top.set_xlim(-0.6, len(names) - 0.4)
        top.set_xticks([])
        top.grid(True, axis="y", alpha=0.3)
        with_gptq = scheme_method(results, scheme) == "gptq"
        label = "AWQ then GPTQ" if with_gptq else "AWQ (then round-to-nearest)"
        after = [layers[n].get("rel_loss") for n in names]
        before = [layers[n].get("rtn_rel_loss") for n in names]
        pairs = [(i, a, b) for i, a, b in zip(x, after, before) if is_number(a) and is_number(b) and a > 0 and b > 0]
        verdict = ""
        if pairs:
            helped = sum(a < b for _, a, b in pairs)
            ratio = sum(b / a for _, a, b in pairs) / len(pairs)
            verdict = (f"\nerror below round-to-nearest's on {helped} of {len(pairs)} layers; "
                       f"RTN's error / this one's: {ratio:.3g} on average")
        top.set_title(f"{scheme} ({label}){verdict}", fontsize=9)
        handles = []
        series = [(before, "tab:blue", "s", "-", "round-to-nearest, same layer and inputs"),
                  (after, "tab:red", "o", "-", label)]
        twin = gptq_twin(results, scheme) if with_gptq else None
        if twin is not None:
            twin_layers = (rs.get(twin) or {}).get("layers") or {}
            series.insert(1, ([(twin_layers.get(n) or {}).get("rel_loss") for n in names], "tab:orange", "^", "--",
                              f"{twin}: GPTQ without AWQ (its own run)"))
        # Beyond a few dozen layers, lines between neighbours only zigzag: markers alone read better.
        dense = len(names) > 48
        for values, colour, marker, style, name in series:
            points = [(i, v) for i, v in zip(x, values) if is_number(v) and v > 0]
            if not points:
                continue
            bottom.plot([p[0] for p in points], [p[1] for p in points], linestyle="" if dense else style, marker=marker,
                        color=colour, lw=1, ms=3 if dense else 4, zorder=3, alpha=0.85 if dense else 1.0)
            handles.append(Line2D([], [], linestyle=style, marker=marker, color=colour, lw=1, ms=4, label=name))
        bottom.set_yscale("log")
        bottom.set_ylabel("relative output error\ntr(D H Dᵀ) / tr(W H Wᵀ)")
        bottom.set_xlim(-0.6, len(names) - 0.4)
        bottom.grid(True, which="major", axis="y", alpha=0.3)
        if handles:   # above the panel, between it and the alphas: never over the points
            bottom.legend(handles=handles, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles),
                          frameon=False, borderaxespad=0.1)
        step = max(1, len(names) // 60)   # at most ~60 tick labels: beyond that, every step-th layer
        bottom.set_xticks(x[::step])
        bottom.set_xticklabels([short_layer(n) for n in names[::step]], rotation=90, fontsize=7)
    fig.suptitle(f"{spec + ': ' if spec else ''}AWQ's alpha and output error per Linear", fontsize=10)
    return save(fig, path)


def awq_sentences(results) -> list:
    """One sentence per AWQ scheme: the alphas chosen and on how many layers AWQ's error is below RTN's."""
    sentences = []
    for scheme, layers in awq_layers(results).items():
        alphas = [v["awq_alpha"] for v in layers.values()]
        pairs = [(v.get("rel_loss"), v.get("rtn_rel_loss")) for v in layers.values()]
        pairs = [(a, b) for a, b in pairs if is_number(a) and is_number(b)]
        sentence = (f"AWQ, {scheme}: alpha {min(alphas):.2g} to {max(alphas):.2g} (median "
                    f"{sorted(alphas)[len(alphas) // 2]:.2g}; {sum(a == 0 for a in alphas)} of {len(alphas)} layers "
                    f"at 0, i.e. plain rounding)")
        if pairs:
            sentence += (f"; its output error is below round-to-nearest's on {sum(a < b for a, b in pairs)} of "
                         f"{len(pairs)} layers")
        sentences.append(sentence + ".")
    return sentences
