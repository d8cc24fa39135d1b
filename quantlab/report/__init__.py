"""The quantization report: ``provenance`` (manifest: versions, git, machine), ``plots``, and ``page``
(metrics table, interpretation, HTML and the files of a run). Reading results (the Pareto frontier,
dominance) lives in ``quantlab.analysis``; writing files atomically in ``quantlab.files``."""
from quantlab.analysis import pareto_frontier
from quantlab.report.page import (html_section, interpretation, metrics_rows, metrics_table_html, metrics_table_text,
                                  write_report_files)
from quantlab.report.plots import PLOT_CAPTIONS, PLOTS, make_plots
from quantlab.report.provenance import library_versions, manifest

__all__ = ["pareto_frontier", "html_section", "interpretation", "metrics_rows", "metrics_table_html",
           "metrics_table_text", "write_report_files", "PLOT_CAPTIONS", "PLOTS", "make_plots", "library_versions",
           "manifest"]
