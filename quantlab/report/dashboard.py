"""The report's dashboard: each spec's verdict and assertion outcomes as HTML (failing first, passing
folded away), one summary card per spec, and the inline CSS every report page shares.

The assertions are handed in as entries (plain dicts, see ``assertion_entry``) by whoever evaluated
them (``quantlab run`` or the pytest plugin), so this module never imports the spec schema: an entry
reads its expectation and outcome by attribute. Outcome labels are cli.verdict's: PASS, FAIL, XFAIL
(an expected failure that holds) and XPASS(strict) (an expected failure that passed: a failure), plus
ERROR for a check that could not run, and INCONCLUSIVE for a FAIL whose outcome is ``inconclusive``
(the confidence bound straddles the threshold: more tokens would settle it), still a failure.
"""
from __future__ import annotations

import html
import re

from quantlab.analysis import is_number
from quantlab.report.units import MISSING, _fmt_num

FAILING = ("FAIL", "INCONCLUSIVE", "XPASS(strict)", "ERROR")
OUTCOME_CLASS = {"PASS": "pass", "FAIL": "fail", "INCONCLUSIVE": "inconclusive", "XFAIL": "xfail",
                 "XPASS(strict)": "fail", "ERROR": "fail"}
_MARGIN = re.compile(r"\(margin ([-+]?(?:[0-9.]+(?:e[-+]?\d+)?|inf|nan))\)")


def assertion_entry(exp, outcome, label: str, source=None, href=None) -> dict:
    """The dashboard's record of one evaluated assertion: ``exp`` has ``id``, ``line``, ``op``,
    ``threshold`` and ``xfail``; ``outcome`` has ``message`` and ``measured``; ``label`` is the
    verdict (PASS, FAIL, XFAIL, XPASS(strict)); a FAIL whose outcome is ``inconclusive`` is recorded as
    INCONCLUSIVE (a failure all the same). The margin is the distance to the threshold, positive
    when the assertion holds, taken from the numbers when both are numbers, else from the message."""
    measured = getattr(outcome, "measured", None)
    threshold, op = getattr(exp, "threshold", None), getattr(exp, "op", None)
    margin = None
    if is_number(measured) and is_number(threshold) and op in ("<", "<=", ">", ">="):
        margin = threshold - measured if op in ("<", "<=") else measured - threshold
    message = str(getattr(outcome, "message", "") or "")
    if margin is None and _MARGIN.search(message):
        margin = float(_MARGIN.search(message)[1])
    if is_number(threshold):
        shown = f"{op} {_fmt_num(threshold, 6)}"
    elif isinstance(threshold, dict) and op:
        shown = f"{op} {threshold.get('metric')} of {threshold.get('scheme')}"
    else:
        shown = None
    return {"id": str(getattr(exp, "id", "")), "line": getattr(exp, "line", None), "source": source,
            "outcome": "INCONCLUSIVE" if label.strip() == "FAIL" and getattr(outcome, "inconclusive", False)
            else label.strip(), "message": message, "measured": measured if is_number(measured) else None,
            "threshold": shown, "margin": margin, "xfail": getattr(exp, "xfail", None), "href": href}


def tally(entries) -> dict:
    """{"passed", "failed", "xfailed"} counts (and "inconclusive", the failures among them that more
    tokens could settle) and the spec's ``verdict``: "failed" when any assertion fails (an
    XPASS(strict) or INCONCLUSIVE included), else "passed"."""
    counts = {"passed": 0, "failed": 0, "xfailed": 0, "inconclusive": 0}
    for entry in entries:
        outcome = entry.get("outcome")
        counts["failed" if outcome in FAILING else "xfailed" if outcome == "XFAIL" else "passed"] += 1
        counts["inconclusive"] += outcome == "INCONCLUSIVE"
    counts["verdict"] = "failed" if counts["failed"] else "passed"
    return counts


def counts_text(counts) -> str:
    inconclusive = f" ({counts['inconclusive']} inconclusive)" if counts.get("inconclusive") else ""
    parts = [f"{counts['failed']} failed{inconclusive}" if counts["failed"] else "", f"{counts['passed']} passed",
             f"{counts['xfailed']} expected failure{'s' if counts['xfailed'] != 1 else ''}" if counts["xfailed"] else ""]
    return ", ".join(p for p in parts if p)


def verdict_badge(counts) -> str:
    verdict = counts["verdict"]
    return f'<span class="ql-badge ql-{verdict}">{verdict.upper()}</span>'


def _location(entry) -> str:
    line = entry.get("line")
    if line is None:
        return MISSING
    return f"{entry['source']}:{line}" if entry.get("source") else f"line {line}"


def _row(entry, quiet=False) -> str:
    e = html.escape
    outcome = entry.get("outcome") or MISSING
    name = e(entry.get("id") or "")
    if entry.get("href"):
        name = f'<a href="#{e(entry["href"], quote=True)}">{name}</a>'
    detail = entry.get("message") or ""
    if entry.get("xfail"):
        detail += f" (expected to fail: {entry['xfail']})"
    margin = entry.get("margin")
    margin_class = "" if not is_number(margin) else " ql-neg" if margin < 0 else " ql-pos"
    cells = [f'<td><span class="ql-outcome ql-{OUTCOME_CLASS.get(outcome, "fail")}">{e(outcome)}</span></td>',
             f'<td class="ql-loc">{e(_location(entry))}</td>',
             f'<td>{name}' + ("" if quiet else f'<div class="ql-msg">{e(detail)}</div>') + "</td>",
             f'<td class="ql-num">{e(_fmt_num(entry.get("measured"), 4))}</td>',
             f'<td class="ql-num">{e(entry.get("threshold") or MISSING)}</td>',
             f'<td class="ql-num{margin_class}">{e(_fmt_num(margin, 3))}</td>']
    return "<tr>" + "".join(cells) + "</tr>"


def _table(rows, quiet=False) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("outcome", "spec line", "assertion", "measured", "threshold", "margin"))
    return (f'<table class="ql-assertions{" ql-quiet" if quiet else ""}"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(_row(r, quiet) for r in rows) + "</tbody></table>")


def assertions_html(entries) -> str:
    """Failing assertions first (spec line, measured, threshold, margin, message), then the expected
    failures, with the passing ones in a folded, quiet table underneath."""
    entries = list(entries)
    if not entries:
        return '<p class="ql-none">No assertion was evaluated.</p>'
    failing = [x for x in entries if x.get("outcome") in FAILING]
    expected = [x for x in entries if x.get("outcome") == "XFAIL"]
    passing = [x for x in entries if x not in failing and x not in expected]
    parts = []
    if failing or expected:
        parts.append(_table(failing + expected))
    if passing:
        parts.append(f'<details class="ql-passing"><summary>{len(passing)} passing assertion'
                     f'{"s" if len(passing) != 1 else ""}</summary>{_table(passing, quiet=True)}</details>')
    return "\n".join(parts)


def anchor(spec_name) -> str:
    """The HTML id of a spec's section."""
    return "quantlab-" + re.sub(r"[^A-Za-z0-9_-]+", "-", str(spec_name)).strip("-")


def spec_card(name, entries, table_html="", pareto_uri=None, section_href=None) -> str:
    """One spec's summary card: verdict and counts, assertions (failing first), the metrics table and
    the Pareto plot, and a link to the spec's full section."""
    e = html.escape
    counts = tally(entries)
    link = f' <a class="ql-link" href="#{e(section_href, quote=True)}">plots and interpretation ↓</a>' \
        if section_href else ""
    parts = [f'<div class="ql-card ql-card-{counts["verdict"]}" id="{e(anchor(name))}-card">',
             f'<div class="ql-card-head">{verdict_badge(counts)} <span class="ql-spec">{e(str(name))}</span> '
             f'<span class="ql-counts">{e(counts_text(counts))}</span>{link}</div>',
             assertions_html(entries)]
    if table_html or pareto_uri:
        parts.append('<div class="ql-overview">')
        if table_html:
            parts.append(f'<div class="ql-table-wrap">{table_html}</div>')
        if pareto_uri:
            parts.append(f'<img class="ql-pareto" src="{pareto_uri}" alt="Pareto plot of {e(str(name))}">')
        parts.append("</div>")
    parts.append("</div>")
    return "\n".join(parts)


def dashboard(cards: dict) -> str:
    """The summary: a line of tiles (spec, verdict; each links to its card), then the cards.
    ``cards`` maps a spec name to (entries, card HTML)."""
    e = html.escape
    tiles = []
    for name, (entries, _) in cards.items():
        counts = tally(entries)
        tiles.append(f'<a class="ql-tile ql-card-{counts["verdict"]}" href="#{e(anchor(name))}-card">'
                     f'{verdict_badge(counts)} {e(str(name))}<br><small>{e(counts_text(counts))}</small></a>')
    failed = sum(tally(entries)["verdict"] == "failed" for entries, _ in cards.values())
    head = f"{len(cards)} spec{'s' if len(cards) != 1 else ''}: {failed} failed, {len(cards) - failed} passed"
    return "\n".join([f'{STYLE}<div class="quantlab-summary"><p class="ql-overall">{e(head)}</p>',
                      f'<div class="ql-tiles">{"".join(tiles)}</div>', *(card for _, card in cards.values()),
                      "</div>"])


STYLE = """<style>
.quantlab-summary, .quantlab-report { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
  color: #222; font-size: 14px; line-height: 1.4; }
.quantlab-report h2 { margin: 1.2em 0 0.2em; font-size: 20px; }
.quantlab-report h3 { margin: 1em 0 0.3em; font-size: 16px; }
.ql-meta { color: #666; margin: 0 0 0.6em; }
.ql-overall { font-size: 16px; font-weight: 600; margin: 0.4em 0; }
.ql-tiles { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 12px; }
.ql-tile { display: block; padding: 6px 10px; border: 1px solid #ccc; border-left-width: 5px; border-radius: 4px;
  color: #222; text-decoration: none; background: #fafafa; }
.ql-tile small { color: #666; }
.ql-card { border: 1px solid #ccc; border-left-width: 6px; border-radius: 6px; padding: 10px 14px; margin: 12px 0;
  background: #fff; }
.ql-card-passed { border-left-color: #2e7d32; }
.ql-card-failed { border-left-color: #c62828; }
.ql-card-head { display: flex; align-items: baseline; flex-wrap: wrap; gap: 10px; margin-bottom: 8px; }
.ql-spec { font-size: 17px; font-weight: 600; }
.ql-counts { color: #555; }
.ql-link { margin-left: auto; }
.ql-badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 700;
  color: #fff; letter-spacing: 0.04em; }
.ql-badge.ql-passed { background: #2e7d32; }
.ql-badge.ql-failed { background: #c62828; }
.ql-outcome { font-weight: 700; font-size: 12px; white-space: nowrap; }
.ql-outcome.ql-pass { color: #2e7d32; }
.ql-outcome.ql-fail { color: #c62828; }
.ql-outcome.ql-xfail { color: #b26a00; }
.ql-outcome.ql-inconclusive { color: #c62828; border: 1px dashed #c62828; border-radius: 3px; padding: 0 3px; }
table.ql-assertions, table.quantlab-metrics { border-collapse: collapse; font-size: 13px; margin: 4px 0 8px; }
table.ql-assertions th, table.quantlab-metrics th { text-align: left; background: #f3f3f3; padding: 3px 8px;
  border-bottom: 1px solid #ccc; font-weight: 600; white-space: nowrap; }
table.ql-assertions td, table.quantlab-metrics td { padding: 3px 8px; border-bottom: 1px solid #eee;
  vertical-align: top; }
table.quantlab-metrics td { text-align: right; white-space: nowrap; }
table.quantlab-metrics td:first-child, table.quantlab-metrics td:nth-child(2) { text-align: left; }
table.quantlab-metrics tr.ql-baseline td { font-weight: 600; }
.ql-num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.ql-neg { color: #c62828; font-weight: 600; }
.ql-loc { color: #555; white-space: nowrap; }
.ql-msg { color: #555; font-size: 12px; }
.ql-quiet { color: #777; }
details.ql-passing > summary { cursor: pointer; color: #555; margin: 4px 0; }
.ql-overview { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.ql-table-wrap { overflow-x: auto; max-width: 100%; }
.ql-pareto { max-width: 620px; width: 100%; border: 1px solid #eee; }
.ql-plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
.ql-plots figure.ql-wide { grid-column: 1 / -1; }
.ql-plots figure { margin: 0; border: 1px solid #eee; padding: 6px; background: #fff; }
.ql-plots img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
.ql-plots figcaption { color: #555; font-size: 12px; margin-top: 4px; }
.ql-interpretation li { margin: 3px 0; }
</style>"""
