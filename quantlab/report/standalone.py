"""A spec's HTML section (verdict and assertions when handed them, metrics table, interpretation, plots,
exports, protocol) and the files of a run: results.json, the lm-eval document, manifest.json, the
plots and a standalone, styled, offline report.html.

It reads the results (the results.json shape) and the assertion entries it is handed
(``dashboard.assertion_entry``); it never imports the spec schema.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from quantlab.files import write_json, write_text
from quantlab.lm_eval_format import lm_eval_results
from quantlab.report.dashboard import STYLE, anchor, assertions_html, counts_text, tally, verdict_badge
from quantlab.report.page import interpretation, metrics_table_html
from quantlab.report.plots import PLOT_CAPTIONS, PLOTS, decode_points, machine_ceilings, make_plots
from quantlab.report.provenance import manifest
from quantlab.report.units import _fmt_bytes
from quantlab.results import jsonable
from quantlab.roofline import measure_machine


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _png_width(path) -> int:
    """Pixel width from the PNG's IHDR chunk."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(24)[16:20], "big")


def html_section(results, images: dict, memory_budget_bytes=None, machine=None, assertions=None,
                 omit=()) -> str:
    """A self-contained HTML fragment for one spec: its verdict and assertions (when ``assertions``,
    a list of dashboard.assertion_entry dicts, is given), metrics table, interpretation, the plots in
    ``images`` ({name: PNG path}) embedded as data URIs, exports and the evaluation protocol.
    ``omit`` leaves out "table" or plots by name (shown elsewhere on the page, e.g. a summary card).
    The section's id is dashboard.anchor(spec name)."""
    e = html.escape
    spec = results.get("spec") or "results"
    meta = f"seed {results.get('seed')}, baseline {results.get('baseline')}"
    if results.get("spec_sha256"):
        meta += f", spec sha256 {str(results['spec_sha256'])[:12]}"
    head = f"<h2>{e(str(spec))}</h2>"
    if assertions is not None:
        counts = tally(assertions)
        head = f"<h2>{verdict_badge(counts)} {e(str(spec))}</h2>"
        meta = f"{counts_text(counts)}; {meta}"
    parts = [f'<section class="quantlab-report" id="{e(anchor(spec))}">', head, f'<p class="ql-meta">{e(meta)}</p>']
    if assertions is not None:
        parts += ["<h3>Assertions</h3>", assertions_html(assertions)]
    if "table" not in omit:
        parts += ["<h3>Metrics</h3>", f'<div class="ql-table-wrap">{metrics_table_html(results)}</div>']
    parts += ["<h3>Interpretation</h3>", '<ul class="ql-interpretation">']
    parts += [f"<li>{e(s)}</li>" for s in interpretation(results, memory_budget_bytes, machine=machine)]
    parts.append("</ul>")
    shown = {name: path for name, path in images.items() if name not in omit}
    if shown:
        parts.append('<h3>Plots</h3><div class="ql-plots">')
        for name, path in shown.items():
            caption = PLOT_CAPTIONS.get(name, name)
            wide = ' class="ql-wide"' if _png_width(path) > 900 else ""   # a wide heatmap takes the whole row
            parts.append(f'<figure{wide}><img src="{data_uri(path)}" alt="{e(str(name))}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")
        parts.append("</div>")
    exports = results.get("exports") or {}
    if exports:
        rows = "".join(f"<tr><td>{e(name)}</td><td>{e(info.get('format', ''))}</td><td>{e(str(info.get('path', '')))}</td>"
                       f"<td>{e(_fmt_bytes(info.get('bytes_on_disk')))}</td><td>{e(_fmt_bytes(info.get('bytes_total')))}</td></tr>"
                       for name, info in exports.items())
        parts.append('<h3>Exported checkpoints</h3><table class="ql-assertions"><tr><th>scheme</th><th>format</th>'
                     f"<th>path</th><th>weight files on disk</th><th>bytes_total</th></tr>{rows}</table>")
    fingerprint = results.get("fingerprint") or {}
    if fingerprint:
        rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(json.dumps(jsonable(v), sort_keys=True))}</td></tr>"
                       for k, v in sorted(fingerprint.items()))
        parts.append(f'<details><summary>Evaluation protocol (fingerprint)</summary><table class="ql-assertions">'
                     f"{rows}</table></details>")
    parts.append("</section>")
    return "\n".join(parts)


def page(results, images: dict, memory_budget_bytes=None, machine=None, assertions=None) -> str:
    """The standalone report.html: one file, inline CSS, plots as data URIs, readable offline."""
    title = html.escape(str(results.get("spec") or "results"))
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>quantlab: {title}</title>{STYLE}"
            "<style>body{margin:0 auto;max-width:1400px;padding:12px 20px;background:#fff}</style></head><body>\n"
            + html_section(results, images, memory_budget_bytes=memory_budget_bytes, machine=machine,
                           assertions=assertions)
            + "\n</body></html>\n")


def write_report_files(results, out_dir, which=None, machine=None, memory_budget_bytes=None, assertions=None) -> dict:
    """Write out_dir/results.json, results_lm_eval.json (the same run as lm-evaluation-harness's results
    document, see quantlab.lm_eval_format), manifest.json, the plots and report.html (a standalone page,
    with the verdict and assertions when ``assertions`` is given).

    The manifest is ``results["manifest"]`` when the run recorded one, else built now from the
    spec name, hash and seed, keeping the run's recorded versions and machine if present.
    Returns {"results", "lm_eval", "manifest", "html", and each plot's name: Path}.
    """
    out_dir = Path(out_dir)
    names = PLOTS if which is None else tuple(which)
    machine = machine_ceilings(results, machine)
    if machine is None and "roofline" in names and decode_points(results):
        machine = measure_machine()  # measured once, so the plot and the sentences agree
    paths = {"results": write_json(out_dir / "results.json", results),
             "lm_eval": write_json(out_dir / "results_lm_eval.json", lm_eval_results(results))}
    run_manifest = results.get("manifest")
    if not run_manifest:
        run_manifest = manifest(results.get("spec"), results.get("spec_sha256"), results.get("seed"))
        for recorded in ("versions", "machine"):
            if results.get(recorded):
                run_manifest[recorded] = {**run_manifest[recorded], **results[recorded]}
    paths["manifest"] = write_json(out_dir / "manifest.json", run_manifest)
    plots = make_plots(results, out_dir, which=which, machine=machine)
    paths["html"] = write_text(out_dir / "report.html", page(results, plots, memory_budget_bytes, machine, assertions))
    return {**paths, **plots}


def rewrite_report_page(out_dir, assertions, memory_budget_bytes=None) -> Path:
    """Write out_dir/report.html again from the results.json and plots already there, now with the
    assertions' outcomes (``quantlab run`` evaluates them after the run has written its files)."""
    out_dir = Path(out_dir)
    results = json.loads((out_dir / "results.json").read_text())
    images = {name: out_dir / f"{name}.png" for name in PLOTS if (out_dir / f"{name}.png").is_file()
              and name in ((results.get("report") or {}).get("plots") or PLOTS)}
    return write_text(out_dir / "report.html", page(results, images, memory_budget_bytes, None, assertions))
