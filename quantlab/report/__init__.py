"""The quantization report: ``provenance`` (manifest: versions, git, machine), ``plots``, ``page``
(metrics table, interpretation), ``dashboard`` (verdicts, assertion outcomes, summary cards, the CSS),
``standalone`` (a spec's HTML section, the files of a run and its report.html) and ``units``. Reading
results (the Pareto frontier, dominance) lives in ``quantlab.analysis``; writing files atomically in
``quantlab.files``."""
from quantlab.analysis import pareto_frontier
from quantlab.report.dashboard import assertion_entry, assertions_html, dashboard, spec_card, tally
from quantlab.report.page import interpretation, metrics_rows, metrics_table_html, metrics_table_text
from quantlab.report.plots import PLOT_CAPTIONS, PLOTS, make_plots
from quantlab.report.provenance import library_versions, manifest
from quantlab.report.standalone import html_section, rewrite_report_page, write_report_files

__all__ = ["pareto_frontier", "assertion_entry", "assertions_html", "dashboard", "spec_card", "tally", "html_section",
           "interpretation", "metrics_rows", "metrics_table_html", "metrics_table_text", "rewrite_report_page",
           "write_report_files", "PLOT_CAPTIONS", "PLOTS", "make_plots", "library_versions", "manifest"]
