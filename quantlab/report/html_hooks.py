"""quantlab's pytest-html hooks: the report's summary as a dashboard (one card per spec), each spec's
section below it, a "spec line" column, and the report row's pointer to them. Registered by
quantlab.pytest_plugin only when pytest-html is installed and active; it reads the plugin's items
duck-typed (``spec_line``, ``parent.spec``), and imports the report only when a hook runs."""
from __future__ import annotations

import pytest

SECTIONS = pytest.StashKey[dict]()   # spec source -> {"section": HTML, "pareto": data URI}


class HtmlHooks:
    """pytest-html's report as a dashboard, through its documented hooks: the title; a summary (one card
    per spec: verdict, failing assertions first with spec line, measured value, threshold and margin,
    the metrics table, the Pareto plot, a link to the spec's section); each spec's section (the other
    plots and the interpretation) below it; a "spec line" column in the results table."""

    def __init__(self, config, runs_key):
        self.config = config
        self.runs_key = runs_key   # the plugin's stash of each spec's results (or the exception its run raised)
        self.items = {}     # nodeid -> (spec, kind: "assertion" | "golden" | "report")
        self.reports = {}   # nodeid -> the report that decides the item (call, or a failed setup)

    @staticmethod
    def pytest_html_report_title(report):
        report.title = "quantlab quantization report"

    def pytest_collection_finish(self, session):
        for item in session.items:
            if hasattr(item, "spec_line") and hasattr(item.parent, "spec"):   # the plugin's SpecFunction
                kind = "assertion" if item.spec_line else "report" if item.name == "report" else "golden"
                self.items[item.nodeid] = (item.parent.spec, kind)

    def pytest_runtest_logreport(self, report):
        if report.nodeid in self.items and (report.when == "call" or (report.when == "setup" and not report.passed)):
            self.reports[report.nodeid] = report

    def pytest_html_results_table_header(self, cells):
        cells.insert(2, "<th>spec line</th>")

    def pytest_html_results_table_row(self, report, cells):
        import html

        spec, kind = self.items.get(report.nodeid, (None, None))
        where = f"{report.location[0]}:{report.location[1] + 1}" if kind == "assertion" else ""
        cells.insert(2, f'<td class="col-specline">{html.escape(where)}</td>')

    def pytest_html_results_summary(self, prefix, summary, postfix, session):
        from quantlab.report import dashboard, metrics_table_html, spec_card
        from quantlab.report.dashboard import anchor

        by_spec = {}
        for nodeid, (spec, kind) in self.items.items():
            if nodeid in self.reports:
                by_spec.setdefault(spec.source, (spec, []))[1].append((nodeid, kind, self.reports[nodeid]))
        if not by_spec:
            return
        sections = self.config.stash.get(SECTIONS, {})
        cards = {}
        for source, (spec, reported) in by_spec.items():
            entries = [_entry(nodeid, kind, report) for nodeid, kind, report in reported if kind != "report"]
            results = self.config.stash[self.runs_key].get(source)
            table = metrics_table_html(results) if results is not None and not isinstance(results, Exception) else ""
            shown = sections.get(source) or {}
            cards[spec.name] = (entries, spec_card(spec.name, entries, table, shown.get("pareto"),
                                                   anchor(spec.name) if shown.get("section") else None))
        prefix.append(dashboard(cards))
        details = [sections[source]["section"] for source in by_spec if (sections.get(source) or {}).get("section")]
        if details:
            postfix.append('<div class="quantlab-summary"><h2>Specs in detail</h2></div>' + "\n".join(details))


def _entry(nodeid, kind, report) -> dict:
    """The dashboard entry of a spec item: the one its test recorded, else (a golden check, or a run
    that could not happen) its pytest outcome and the first line of its failure."""
    for name, value in report.user_properties:
        if name == "quantlab_assertion":
            return {**value, "href": nodeid}
    if report.passed:
        outcome = "PASS"
    elif hasattr(report, "wasxfail"):
        outcome = "XFAIL" if report.skipped else "XPASS(strict)"
    else:
        outcome = "FAIL" if kind == "golden" else "ERROR"
    message = (report.longreprtext or "").strip().splitlines()
    return {"id": nodeid.rsplit("::", 1)[-1], "line": None, "source": None, "outcome": outcome,
            "message": message[0] if message else "", "measured": None, "threshold": None, "margin": None,
            "xfail": None, "href": nodeid}


def add_html_section(request, spec, results, paths) -> None:
    """Keep the spec's section (all but the table and Pareto plot, which its summary card shows) for the
    report's summary, and point the report row there."""
    import html

    import pytest_html

    from quantlab.report import html_section
    from quantlab.report.dashboard import anchor
    from quantlab.report.standalone import data_uri

    images = {name: p for name, p in paths.items() if str(p).endswith(".png")}
    section = html_section(results, images, memory_budget_bytes=spec.report.memory_budget_bytes,
                           omit=("table", "pareto"))
    sections = request.config.stash.setdefault(SECTIONS, {})
    sections[spec.source] = {"section": section, "pareto": data_uri(images["pareto"]) if "pareto" in images else None}
    request.getfixturevalue("extras").append(pytest_html.extras.html(
        f'<p>{html.escape(spec.name)}: metrics, plots and interpretation are in the summary at the top of this '
        f'report: <a href="#{anchor(spec.name)}-card">card</a>, <a href="#{anchor(spec.name)}">section</a>.</p>'))
