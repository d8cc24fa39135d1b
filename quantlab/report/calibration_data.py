"""The calibration-data plot: perplexity and KL divergence of each GPTQ scheme per calibration corpus.

Drawn from a ``sweep: {calibration.dataset: [...]}``: one panel for perplexity (± 1 standard error paired
with the baseline on the same windows) and one for the mean KL divergence to the baseline, a column of points per corpus
and a marker per GPTQ scheme; the baseline's perplexity and every RTN scheme (which draws no calibration
data, so one value serves every corpus) are drawn as horizontal reference lines. Split from
``quantlab.report.plots``, which wires it in as the ``calibration_data`` plot.
"""
from __future__ import annotations

import textwrap

from quantlab.analysis import is_number, scheme_method

SWEEP_KEY = "calibration.dataset"
CAPTION = ("Perplexity and mean KL divergence to the baseline of each GPTQ scheme calibrated on each corpus, at "
           "equal calibration token counts, all evaluated on the same windows (so perplexity's bars are the paired "
           "standard error against the baseline, not the windows' spread). Dashed, where the spec has one: RTN on "
           "the same grid, which draws no calibration data; dotted: the baseline's perplexity.")


def dataset_sweep(results):
    """The first sweep over calibration.dataset, or None."""
    for sweep in results.get("sweeps") or []:
        if sweep.get("key") == SWEEP_KEY:
            return sweep
    return None


def corpus_label(name: str, width: int = 18) -> str:
    """A corpus name for a tick label: long text:GLOB names wrapped, never cut."""
    return "\n".join(textwrap.wrap(str(name), width, break_on_hyphens=False, break_long_words=True)) or str(name)


def plot_calibration_data(results, path, figure, save):
    """Draw the plot into ``path`` with the report's ``figure(width, height)`` and ``save(fig, path)``;
    None when the results hold no calibration.dataset sweep with a GPTQ scheme."""
    sweep = dataset_sweep(results)
    if sweep is None:
        return None
    corpora, runs = list(sweep.get("values") or []), list(sweep.get("results") or [])
    order = list(results.get("results") or {})   # the spec's order, where known
    schemes = sorted({s for run in runs for s in (run or {}) if scheme_method(results, s) == "gptq"},
                     key=lambda s: order.index(s) if s in order else len(order))
    if not schemes or not corpora:
        return None
    rtn = [s for s, r in (results.get("results") or {}).items() if scheme_method(results, s) == "rtn"]
    baseline = (results.get("results") or {}).get(results.get("baseline")) or {}
    base_ppl = baseline.get("ppl")
    fig = figure(max(7.0, 1.6 * len(corpora) + 3), 4.4)
    ax_ppl, ax_kld = fig.subplots(1, 2)
    width = 0.5 / len(schemes)
    colours = {}
    for i, scheme in enumerate(schemes):
        offset = -0.25 + width * (i + 0.5)
        entries = [(run or {}).get(scheme) or {} for run in runs]
        # Perplexity's error bar is the paired one (the gap's standard error, in perplexity units): every
        # corpus is scored on the same windows, so the windows' own spread is shared and cancels.
        points = [(x + offset, e["ppl"], _paired_ppl_error(e, base_ppl)) for x, e in enumerate(entries)
                  if is_number(e.get("ppl"))]
        line = ax_ppl.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                               marker="o", linestyle="", capsize=3, label=scheme)
        colours[scheme] = line[0].get_color()
        kld = [(x + offset, e["kld_mean"], e["kld_stderr"] if is_number(e.get("kld_stderr")) else 0.0)
               for x, e in enumerate(entries) if is_number(e.get("kld_mean"))]
        ax_kld.errorbar([k[0] for k in kld], [k[1] for k in kld], yerr=[k[2] for k in kld], marker="o", linestyle="",
                        capsize=3, color=colours[scheme], label=scheme)
    for scheme in rtn:
        entry = results["results"][scheme]
        # RTN in the colour of the GPTQ scheme on the same grid, so each pair reads together.
        grid = _grid_of(results, scheme)
        twin = next((g for g in schemes if _grid_of(results, g) == grid), None)
        style = dict(color=colours.get(twin, "tab:gray"), linestyle="--", linewidth=1, alpha=0.8)
        if is_number(entry.get("ppl")):
            ax_ppl.axhline(entry["ppl"], label=f"{scheme} (RTN, no calibration)", **style)
        if is_number(entry.get("kld_mean")):
            ax_kld.axhline(entry["kld_mean"], label=f"{scheme} (RTN, no calibration)", **style)
    if is_number(base_ppl):
        ax_ppl.axhline(base_ppl, color="0.3", linestyle=":", linewidth=1,
                       label=f"{results.get('baseline')} (baseline)")
    for ax, ylabel in ((ax_ppl, "perplexity (± 1 paired s.e.)"),
                       (ax_kld, "mean KL divergence to the baseline (± 1 s.e.)")):
        ax.set_xticks(range(len(corpora)), [corpus_label(c) for c in corpora], fontsize=8)
        ax.set_xlim(-0.6, len(corpora) - 0.4)
        ax.set_xlabel("calibration corpus")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    spec = results.get("spec")
    fig.suptitle(f"{spec + ': ' if spec else ''}quantized quality by calibration corpus", fontsize=10)
    return save(fig, path)


def _paired_ppl_error(entry, base_ppl) -> float:
    """The standard error of the scheme's perplexity paired with the baseline's on the same windows:
    ppl = base * (1 + gap), so it is base * se(gap); 0 where not recorded."""
    se = entry.get("ppl_gap_stderr")
    return base_ppl * se if is_number(se) and is_number(base_ppl) else 0.0


def _grid_of(results, scheme):
    """The integer grid a scheme quantizes to (its description without the method)."""
    return ((results.get("schemes") or {}).get(scheme) or {}).get("scheme")


def calibration_data_sentences(results) -> list:
    """One sentence per GPTQ scheme of a calibration.dataset sweep: the corpora that gave the lowest and
    the highest KL divergence (perplexity where KLD is not measured), and the perplexity range."""
    sweep = dataset_sweep(results)
    if sweep is None:
        return []
    corpora, runs = list(sweep.get("values") or []), list(sweep.get("results") or [])
    sentences = []
    for scheme in [s for s in (results.get("results") or {}) if scheme_method(results, s) == "gptq"]:
        entries = [((run or {}).get(scheme) or {}) for run in runs]
        metric = "kld_mean" if all(is_number(e.get("kld_mean")) for e in entries) else "ppl"
        if not entries or not all(is_number(e.get(metric)) for e in entries):
            continue
        values = [e[metric] for e in entries]
        low, high = values.index(min(values)), values.index(max(values))
        what = "KL divergence" if metric == "kld_mean" else "perplexity"
        ratio = f", {values[high] / values[low]:.2g}x" if values[low] > 0 else ""
        sentence = (f"Calibration corpus, {scheme}: the lowest {what} comes from {corpora[low]} "
                    f"({values[low]:.4g}), the highest from {corpora[high]} ({values[high]:.4g}{ratio})")
        ppl = [e.get("ppl") for e in entries]
        if metric != "ppl" and all(is_number(p) for p in ppl):
            sentence += f"; perplexity spans {min(ppl):.4g} to {max(ppl):.4g}"
        sentences.append(sentence + ".")
    return sentences
