"""The report's words and numbers: the metrics table (text and HTML) and the interpretation written
from the numbers. The HTML pages that hold them are in ``quantlab.report.standalone`` (a run's files
and its standalone report.html) and ``quantlab.report.dashboard`` (verdicts, assertions, summary cards).

Everything here reads a results dict shaped as in docs/results.md ("results.json") and nothing else,
so a report can be rebuilt from a results.json on disk. Besides the per-scheme metrics it uses, when
present:
- ``results["schemes"][name]``: {"method": "gptq"|"rtn"|"float", "bits", "granularity",
  "group_size", "symmetric", "grid"} to tell GPTQ schemes apart and pair each with the RTN scheme on
  the same grid;
- ``results["model"]``: {"params_linear", "params_total", and from ``roofline.decode_workload``
  "params_matmul", "activation_elements", "n_matmuls"} for the roofline;
- ``results["machine"]["peak_gflops"]`` and ``["bandwidth_gbs"]`` (``measure_machine()``), else the
  ceilings are measured when the roofline is drawn;
- ``results["report"]["ppl_gap_thresholds"]``: the spec's own ppl_gap assertions, which the
  interpretation judges the best GPTQ scheme against (no assertion, no verdict).
A missing piece makes the matching plot or sentence disappear; it never raises.
"""
from __future__ import annotations

import html

from quantlab.analysis import (dominator, gap_of, is_number, pareto_frontier, same_grid_rtn, scheme_meta, scheme_method,
                               scheme_order, scheme_results, usable)
from quantlab.report.awq import awq_sentences
from quantlab.report.calibration_data import calibration_data_sentences
from quantlab.report.plots import decode_points, machine_ceilings, measured_kernels
from quantlab.report.scale_search import scale_search_sentences
from quantlab.report.units import MISSING, _fmt_bytes, _fmt_num, _fmt_pct, _fmt_si, _fmt_with_error  # noqa: F401
from quantlab.roofline import KERNEL_LABELS, attainable_gflops, decode_seconds, ridge_intensity


def _task_names(results) -> list:
    return sorted({t for r in scheme_results(results).values() for t in (r.get("tasks") or {})})


def metrics_rows(results) -> tuple:
    """(header, rows) of the metrics table, every cell a string: one row per scheme."""
    tasks = _task_names(results)
    frontier = set(pareto_frontier(results))
    header = ["scheme", "method", "ppl", "ppl gap", "KLD", "top-1", *[f"{t} acc" for t in tasks],
              "NaNs", "bytes", "bits/weight", "frontier", "servable"]
    rows = []
    for s in scheme_order(results):
        r = scheme_results(results)[s]
        task_cells = []
        for t in tasks:
            entry = (r.get("tasks") or {}).get(t) or {}
            task_cells.append(_fmt_with_error(entry.get("acc"), entry.get("acc_stderr"), _fmt_pct))
        rows.append([
            s, scheme_method(results, s) or MISSING,
            _fmt_with_error(r.get("ppl"), r.get("ppl_stderr"), _fmt_num, lambda e: _fmt_num(e, 2)),
            "baseline" if s == results.get("baseline") else
            _fmt_with_error(gap_of(results, s), r.get("ppl_gap_stderr"), lambda g: _fmt_pct(g, signed=True), _fmt_pct),
            _fmt_num(r.get("kld_mean"), 3), _fmt_pct(r.get("top1_agreement")), *task_cells,
            str(r["nan_count"]) if is_number(r.get("nan_count")) else MISSING,
            _fmt_bytes(r.get("bytes_total")), _fmt_num(r.get("bits_per_weight"), 3),
            "yes" if s in frontier else "",
            servable_cell(r.get("servable")),
        ])
    return header, rows


SERVABLE_FORMATS = {"compressed_tensors": "compressed-tensors", "gguf": "GGUF"}
SHORT_REASON = 48   # characters of a refusal kept in the table cell


def servable_cell(servable) -> str:
    """The "servable" cell from a scheme's ``servable`` entry ({format: [ok, reason]}, see
    export.servability_table): "yes" when every format takes it, "yes (compressed-tensors)" when only
    some do, "no: <first clause of the reason>" when none does, and a dash when it was not recorded."""
    if not isinstance(servable, dict) or not servable:
        return MISSING
    verdicts = {name: (bool(v[0]), str(v[1] or "")) for name, v in servable.items()
                if isinstance(v, (list, tuple)) and len(v) == 2}
    if not verdicts:
        return MISSING
    ok = [name for name, (yes, _) in verdicts.items() if yes]
    if len(ok) == len(verdicts):
        return "yes"
    if ok:
        return "yes (" + ", ".join(SERVABLE_FORMATS.get(name, name) for name in ok) + ")"
    # Every format refuses: give compressed-tensors' reason, as it covers more models than GGUF.
    _, reason = verdicts.get("compressed_tensors") or next(iter(verdicts.values()))
    return "no: " + _short_reason(reason)


def _short_reason(reason: str) -> str:
    """The reason's first clause (up to ':', ';' or ' (') and at most SHORT_REASON characters: the table
    names the cause; the fix is in export.servability's full sentence."""
    for mark in (": ", "; ", " ("):
        reason = reason.split(mark, 1)[0]
    reason = reason.strip() or "not servable"
    return reason if len(reason) <= SHORT_REASON else reason[: SHORT_REASON - 1].rstrip() + "…"


def metrics_table_text(results) -> str:
    """The metrics table as aligned plain text, for terminals and notes."""
    header, rows = metrics_rows(results)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)]) + "\n"


def metrics_table_html(results) -> str:
    """The metrics table as an HTML <table>, every cell escaped; the baseline row is bold (class
    ql-baseline, styled by dashboard.STYLE)."""
    header, rows = metrics_rows(results)
    baseline = results.get("baseline")
    parts = ['<table class="quantlab-metrics">',
             "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>",
             "<tbody>"]
    for row in rows:
        row_attrs = ' class="ql-baseline"' if row[0] == baseline else ""
        parts.append(f"<tr{row_attrs}>"
                     + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Interpretation: sentences written from the numbers


def interpretation(results, memory_budget_bytes=None, machine=None) -> list:
    """What the numbers say, as sentences: the frontier, the best GPTQ scheme's gap against the spec's
    own ppl_gap thresholds, the theoretical INT4 decode speed-up, the calibration corpora, AWQ's alphas and
    the scale search against absmax, the scheme to ship under a memory budget, and the health events."""
    sentences = [_frontier_sentence(results)]
    sentences += _gptq_sentences(results, gap_thresholds(results))
    sentences += _speedup_sentences(results, machine_ceilings(results, machine))
    sentences += calibration_data_sentences(results)
    sentences += awq_sentences(results) + scale_search_sentences(results)
    if memory_budget_bytes is not None:
        sentences.append(_budget_sentence(results, memory_budget_bytes))
    sentences += _health_sentences(results)
    return sentences


def gap_thresholds(results) -> list:
    """The distinct upper bounds the spec's assertions put on ppl_gap (``ppl_gap < 0.15``), ascending."""
    entries = (results.get("report") or {}).get("ppl_gap_thresholds") or []
    return sorted({e["threshold"] for e in entries if e.get("op") in ("<", "<=") and is_number(e.get("threshold"))})


def _frontier_sentence(results) -> str:
    frontier = pareto_frontier(results)
    if not frontier:
        return "No scheme has a finite perplexity and size, so there is no size/perplexity frontier."
    rs = scheme_results(results)
    listed = ", ".join(f"{s} ({_fmt_bytes(rs[s]['bytes_total'])}, ppl {_fmt_num(rs[s]['ppl'])})" for s in frontier)
    sentence = f"On the size/perplexity frontier (no other scheme is both smaller and better): {listed}."
    dominated = [s for s in scheme_order(results) if usable(results, s) and s not in frontier]
    if dominated:
        by = {s: dominator(results, s, frontier) for s in dominated}
        sentence += " Dominated: " + ", ".join(f"{s} (by {by[s]})" for s in dominated) + "."
    unusable = [s for s in scheme_order(results) if not usable(results, s)]
    if unusable:
        sentence += " Left out for a NaN or a missing perplexity or size: " + ", ".join(unusable) + "."
    return sentence


def _gptq_sentences(results, thresholds) -> list:
    baseline = results.get("baseline")
    gaps = {s: gap_of(results, s) for s in scheme_order(results)
            if scheme_method(results, s) == "gptq" and usable(results, s)}
    gaps = {s: g for s, g in gaps.items() if g is not None}
    if not gaps:
        return ["No GPTQ scheme with a perplexity in this run, so no GPTQ gap is assessed."]
    best = min(gaps, key=lambda s: (gaps[s], s))
    gap = gaps[best]
    if thresholds:
        met = [t for t in thresholds if gap < t]
        missed = [t for t in thresholds if gap >= t]
        verdict = "; ".join(part for part in (
            f"it meets the spec's {' and '.join(_fmt_pct(t) for t in met)} bound" if met else "",
            f"it misses the spec's {' and '.join(_fmt_pct(t) for t in missed)} bound" if missed else "") if part)
    else:
        verdict = "the spec asserts no bound on ppl_gap, so there is no verdict"
    sentences = [f"The best GPTQ scheme, {best}, has a perplexity gap of {_fmt_pct(gap, signed=True)} "
                 f"against {baseline}: {verdict}."]
    rtn = same_grid_rtn(results, best)
    rtn_gap = gap_of(results, rtn) if rtn and usable(results, rtn) else None
    if rtn_gap is not None:
        if rtn_gap > 0 and gap < rtn_gap:
            sentences.append(f"Round-to-nearest on the same grid ({rtn}) has a gap of "
                             f"{_fmt_pct(rtn_gap, signed=True)}: GPTQ removes {1 - gap / rtn_gap:.0%} of it.")
        elif gap >= rtn_gap:
            sentences.append(f"GPTQ does not beat round-to-nearest on the same grid ({rtn}, gap "
                             f"{_fmt_pct(rtn_gap, signed=True)}): check the health events and the calibration data.")
    return sentences


def _speedup_sentences(results, machine) -> list:
    return _theory_sentences(results, machine) + _measured_sentences(results, machine) + _throughput_sentences(results)


def _measured_sentences(results, machine) -> list:
    """What the real low-bit kernels did on this CPU (``machine["lowbit_kernels"]``), against theory."""
    kernels = measured_kernels(results, machine)
    if "fp32" not in kernels:
        return []
    fp32 = kernels["fp32"]
    threads = {k.get("threads") for k in kernels.values()} - {None}
    where = "batch-1 matmuls through the block Linears, best of repeats"
    if len(threads) == 1:
        count = next(iter(threads))
        where += f", {count} thread{'s' if count != 1 else ''}"

    def theory(kernel):
        if machine is not None:
            return decode_seconds(fp32, machine) / decode_seconds(kernel, machine)
        return fp32["bytes"] / kernel["bytes"]
    parts = [f"the {KERNEL_LABELS[name]} ({kernels[name]['op']}) {kernels[name]['tokens_per_second']:,.0f} tokens/s "
             f"({kernels[name]['ratio_to_fp32']:.2f}x, theory {theory(kernels[name]):.1f}x)"
             for name in ("int4", "int8") if name in kernels]
    if not parts:
        sentence = f"Measured on this CPU ({where}): fp32 F.linear {fp32['tokens_per_second']:,.0f} tokens/s"
    else:
        first = next(name for name in ("int4", "int8") if name in kernels)
        k = kernels[first]
        sentence = (f"Measured on this CPU ({where}): the {KERNEL_LABELS[first]} ({k['op']}) "
                    f"{k['tokens_per_second']:,.0f} tokens/s vs fp32 F.linear {fp32['tokens_per_second']:,.0f} "
                    f"({k['ratio_to_fp32']:.2f}x), theory {theory(k):.1f}x" + "".join(f"; {p}" for p in parts[1:]))
    unavailable = ((results.get("machine") or {}).get("lowbit_kernels") or {}).get("unavailable") or {}
    if unavailable:
        sentence += "; not measured: " + "; ".join(f"{name} ({why})" for name, why in sorted(unavailable.items()))
    sentences = [sentence + "."]
    if machine is not None and fp32["gflops"] > attainable_gflops(fp32["intensity"], machine):
        roof = attainable_gflops(fp32["intensity"], machine)
        sentences.append(f"fp32 reached {fp32['gflops']:.0f} GFLOP/s, above the {roof:.1f} GFLOP/s the memory roof "
                         f"allows at its intensity: its {_fmt_bytes(fp32['bytes'])} of block weights are served from "
                         "the CPU's caches, not DRAM, so fewer bytes buy less than the roofline predicts.")
    return sentences


def _throughput_sentences(results) -> list:
    """The evaluation's tokens_per_second, named for what it is."""
    rs = scheme_results(results)
    speeds = {s: rs[s]["tokens_per_second"] for s in scheme_order(results) if is_number(rs[s].get("tokens_per_second"))}
    if not speeds:
        return []
    slowest, fastest = min(speeds, key=speeds.get), max(speeds, key=speeds.get)
    spread = (f"{speeds[slowest]:,.0f} ({slowest}) to {speeds[fastest]:,.0f} ({fastest}) tokens/s" if len(speeds) > 1
              else f"{speeds[slowest]:,.0f} tokens/s ({slowest})")
    return [f"As evaluated, the window passes ran at {spread}: batched, prefill-style throughput over whole windows "
            "with the quantized weights dequantized to float, so every scheme runs the same float matmuls; it is "
            "neither batch-1 decode speed nor the speed of a low-bit format."]


def _theory_sentences(results, machine) -> list:
    points = decode_points(results)
    baseline = results.get("baseline")
    int4 = [s for s in points if scheme_meta(results, s).get("bits") == 4 and scheme_method(results, s) in ("gptq", "rtn")
            and usable(results, s)]
    if baseline not in points or not int4:
        return []
    rs = scheme_results(results)
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
    rs = scheme_results(results)
    candidates = [s for s in scheme_order(results) if usable(results, s)]
    fitting = [s for s in candidates if rs[s]["bytes_total"] <= budget]
    if not fitting:
        if not candidates:
            return f"No scheme has a finite perplexity and size to ship under the {_fmt_bytes(budget)} budget."
        smallest = min(candidates, key=lambda s: (rs[s]["bytes_total"], s))
        return (f"No scheme fits the memory budget of {_fmt_bytes(budget)}: the smallest, {smallest}, "
                f"needs {_fmt_bytes(rs[smallest]['bytes_total'])}.")
    ship = min(fitting, key=lambda s: (rs[s]["ppl"], rs[s]["bytes_total"], s))
    return (f"Under a memory budget of {_fmt_bytes(budget)} (weights only), ship {ship}: the lowest perplexity "
            f"({_fmt_num(rs[ship]['ppl'])}, gap {_fmt_pct(gap_of(results, ship), signed=True)}) of the "
            f"{len(fitting)} scheme(s) that fit, at {_fmt_bytes(rs[ship]['bytes_total'])}.")


def _health_sentences(results) -> list:
    sentences = []
    nan_schemes = [s for s in scheme_order(results) if is_number(scheme_results(results)[s].get("nan_count"))
                   and scheme_results(results)[s]["nan_count"] > 0]
    if nan_schemes:
        sentences.append("NaN outputs in: " + ", ".join(
            f"{s} ({scheme_results(results)[s]['nan_count']})" for s in nan_schemes) + ".")
    events = results.get("health") or []
    if events:
        counts = {}
        for event in events:
            counts[event.get("event")] = counts.get(event.get("event"), 0) + 1
        listed = ", ".join(f"{name}: {n}" for name, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
        sentences.append(f"{len(events)} health event(s) during quantization ({listed}).")
    return sentences
