"""Tests of the report: frontier, roofline numbers, interpretation, files, plots and HTML.

Results are synthetic but built through the results type (quantlab.results), so they have the
results.json shape; sizes come from the real byte accountant on a tiny MiniGPT quantized with each
preset, so the roofline tests exercise the numbers the pipeline would record.
"""
import json
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantlab import report
from quantlab.accounting import deployable_bytes
from quantlab.quant import PRESETS, FloatScheme, quantize_rtn
from quantlab.report import page, plots
from quantlab.results import LayerStats, RunResult, SchemeResult, Sweep, TaskResult
from quantlab.roofline import decode_intensity, decode_workload

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ceilings of a made-up machine, so plots and sentences do not depend on this one's speed.
MACHINE = {"peak_gflops": 100.0, "bandwidth_gbs": 20.0}
# The spec's ppl_gap assertions, as the pipeline records them for the interpretation.
DOD_AND_HOPE = [{"scheme": "int4-g64-gptq", "op": "<", "threshold": 0.15, "line": 3},
                {"scheme": "int4-g64-gptq", "op": "<", "threshold": 0.05, "line": 4}]


def scheme_meta(name):
    scheme = PRESETS[name]
    if isinstance(scheme, FloatScheme):
        return {"method": "float", "bits": scheme.bits}
    return {"method": "rtn", "bits": scheme.bits, "granularity": scheme.granularity,
            "group_size": scheme.group_size, "symmetric": scheme.symmetric, "grid": scheme.grid}


def make_results(model, ppl_by_scheme, gptq_of=None, tasks=True, layers=True, sweep=True, thresholds=()):
    """A RunResult for ``model`` (a tiny MiniGPT): bytes from the byte accountant, ppl as given.
    ``gptq_of`` maps a GPTQ scheme name to the preset whose grid it uses."""
    linear_names = model.all_linear_names()
    gptq_of = gptq_of or {}
    baseline_ppl = ppl_by_scheme["fp32"]
    results, schemes = {}, {}
    for i, (name, ppl) in enumerate(ppl_by_scheme.items()):
        preset = PRESETS[gptq_of.get(name, name)]
        quantized = not isinstance(preset, FloatScheme)
        qtensors = ({n: quantize_rtn(model.module.get_submodule(n).weight.detach(), preset) for n in linear_names}
                    if quantized else {})
        sizes = deployable_bytes(model, qtensors, preset, keep=["embeddings", "lm_head", "norms"])
        schemes[name] = {**scheme_meta(gptq_of.get(name, name)), **({"method": "gptq"} if name in gptq_of else {})}
        results[name] = SchemeResult(
            ppl=ppl, ppl_stderr=0.01 * ppl, ppl_gap=ppl / baseline_ppl - 1,
            kld_mean=0.0 if name == "fp32" else 0.01 * (i + 1), top1_agreement=1.0 - 0.01 * i,
            tasks={"verb_tense": TaskResult(acc=0.9 - 0.05 * i, acc_stderr=0.02, n=300)} if tasks else {},
            nan_count=0, **sizes,
            layers={n: LayerStats(rel_loss=2.0 ** -preset.bits * (j + 1), rtn_rel_loss=2.0 ** -preset.bits * (j + 2),
                                  damp=0.01, **(mixed_layer(j) if name in gptq_of else {}),
                                  **(awq_and_search_layer(j, linear_names) if name in gptq_of else {}))
                    for j, n in enumerate(linear_names)} if quantized and layers else {},
        )
    sweeps = ()
    if sweep and layers:
        gptq = [name for name in ppl_by_scheme if name in gptq_of]
        sweeps = (Sweep(key="calibration.samples", values=(4, 8, 16),
                        results=tuple({s: SchemeResult(layers={n: LayerStats(rel_loss=0.1 / samples * (j + 1))
                                                               for j, n in enumerate(linear_names)}) for s in gptq}
                                      for samples in (4, 8, 16))),
                  Sweep(key="calibration.dataset", values=("shakespeare", "verbs"),
                        results=tuple({s: SchemeResult(ppl=11.0 * factor, ppl_gap_stderr=0.002, kld_mean=0.01 * factor,
                                                       kld_stderr=0.001) for s in gptq} for factor in (1.0, 1.1))))
    first = results["fp32"]
    return RunResult(spec="test/report", spec_sha256="ab" * 32, source="specs/test/report.yaml", seed=0,
                     baseline="fp32", fingerprint={"dataset": "shakespeare", "seq_len": 16}, schemes=schemes,
                     results=results, sweeps=sweeps, report={"ppl_gap_thresholds": list(thresholds)},
                     model={"params_linear": first.params_linear, "params_total": first.params_total,
                            **decode_workload(model.module)})


def mixed_layer(j):
    """A mixed-precision assignment for layer j (the mixed_precision plot's data): alternately 3 and 8 bits."""
    chosen = "int3-g64" if j % 2 else "int8-per-channel"
    return {"bits": 3 if j % 2 else 8, "scheme": chosen,
            "sensitivity": {"int3-g64": 1e-2 * (j + 1), "int4-g64": 2e-3 * (j + 1), "int8-per-channel": 1e-5 * (j + 1)}}


def awq_and_search_layer(j, names):
    """What an AWQ scheme with scale_search mse records for layer j of ``names`` (the awq and scale_search
    plots' data): its group's alpha, the group (pairs of layers), the weight error and the shrink factors."""
    return {"awq_alpha": 0.1 * (j // 2 % 4), "awq_group": names[j - j % 2], "weight_rel_error": 1e-3 * (j + 1),
            "shrink_mean": 0.9 - 0.01 * j, "shrink_counts": {"1.000": 4, "0.925": 10 + j, "0.850": 3}}


SEVEN = {"fp32": 10.0, "fp16": 10.01, "int8-per-tensor": 10.3, "int8-per-channel": 10.1,
         "int4-g64": 15.0, "int4-g128": 16.0, "int4-g64-gptq": 11.0}


@pytest.fixture(scope="module")
def seven(minigpt):
    return make_results(minigpt, SEVEN, gptq_of={"int4-g64-gptq": "int4-g64"})


@pytest.fixture(scope="module")
def written(seven, tmp_path_factory):
    """The full report of ``seven`` (with one NaN metric), rendered once: plots are the slow part."""
    fp16 = {**seven["results"]["fp16"], "kld_p99": math.nan}
    results = {**seven, "results": {**seven["results"], "fp16": fp16}}
    return report.write_report_files(results, tmp_path_factory.mktemp("report"), machine=MACHINE)


def points_results(points):
    """Results holding only (bytes_total, ppl) per scheme."""
    return {"baseline": "a", "results": {name: {"bytes_total": b, "ppl": p, "nan_count": 0}
                                         for name, (b, p) in points.items()}}


# ---------------------------------------------------------------------------------------------
# The frontier


def test_frontier_keeps_the_non_dominated_schemes_ordered_by_size():
    results = points_results({"big": (100, 10.0), "mid": (50, 12.0), "worse_mid": (50, 13.0),
                              "bigger_same": (200, 10.0), "small": (25, 20.0)})
    assert report.pareto_frontier(results) == ["small", "mid", "big"]


def test_frontier_leaves_out_schemes_with_nans_or_no_perplexity():
    results = points_results({"ok": (100, 10.0), "nan": (10, 1.0), "null": (5, 1.0)})
    results["results"]["nan"]["nan_count"] = 3
    results["results"]["null"]["ppl"] = None
    assert report.pareto_frontier(results) == ["ok"]


@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=3),
                       st.tuples(st.integers(1, 50), st.integers(1, 50)), min_size=1, max_size=12))
def test_every_scheme_off_the_frontier_is_dominated_by_one_on_it(points):
    results = points_results(points)
    frontier = report.pareto_frontier(results)
    for name, (b, p) in points.items():
        dominated_by = [f for f in frontier if points[f][0] <= b and points[f][1] <= p and points[f] != (b, p)]
        assert (name in frontier) == (not dominated_by)


# ---------------------------------------------------------------------------------------------
# Roofline numbers


def test_decode_intensity_grows_as_bytes_per_weight_shrink(seven):
    intensity = {s: decode_intensity(seven["results"][s], seven["model"])["intensity"]
                 for s in ("fp32", "fp16", "int8-per-channel", "int4-g64")}
    assert intensity["int4-g64"] > intensity["int8-per-channel"] > intensity["fp16"] > intensity["fp32"]


# ---------------------------------------------------------------------------------------------
# Interpretation


def test_interpretation_ships_the_most_accurate_scheme_that_fits_the_budget(seven):
    sizes = {s: r["bytes_total"] for s, r in seven["results"].items()}
    # Room for every INT4 scheme and int8-per-channel but not fp16: int8-per-channel has the best ppl.
    budget = (sizes["int8-per-channel"] + sizes["fp16"]) / 2
    text = " ".join(report.interpretation(seven, memory_budget_bytes=budget))
    assert "ship int8-per-channel:" in text


def test_interpretation_says_when_no_scheme_fits_the_budget(seven):
    smallest = min(r["bytes_total"] for r in seven["results"].values())
    text = " ".join(report.interpretation(seven, memory_budget_bytes=smallest - 1))
    assert "No scheme fits the memory budget" in text


@pytest.mark.parametrize("gap, verdict", [
    (0.20, "it misses the spec's 5.0% and 15.0% bound"),
    (0.10, "it meets the spec's 15.0% bound; it misses the spec's 5.0% bound"),
    (0.03, "it meets the spec's 5.0% and 15.0% bound"),
])
def test_interpretation_judges_the_best_gptq_gap_against_the_specs_own_thresholds(minigpt, gap, verdict):
    ppl = {**SEVEN, "int4-g64-gptq": SEVEN["fp32"] * (1 + gap)}
    results = make_results(minigpt, ppl, gptq_of={"int4-g64-gptq": "int4-g64"}, layers=False, thresholds=DOD_AND_HOPE)
    gptq_sentence = next(s for s in report.interpretation(results) if s.startswith("The best GPTQ scheme"))
    assert "int4-g64-gptq" in gptq_sentence and f"{gap:+.1%}" in gptq_sentence
    assert verdict in gptq_sentence


def test_interpretation_gives_no_verdict_on_the_gap_when_the_spec_asserts_no_bound(minigpt):
    results = make_results(minigpt, SEVEN, gptq_of={"int4-g64-gptq": "int4-g64"}, layers=False)
    gptq_sentence = next(s for s in report.interpretation(results) if s.startswith("The best GPTQ scheme"))
    assert "asserts no bound on ppl_gap" in gptq_sentence and "15%" not in gptq_sentence


def test_interpretation_compares_gptq_with_rtn_on_the_same_grid(seven):
    text = " ".join(report.interpretation(seven))
    removed = 1 - seven["results"]["int4-g64-gptq"]["ppl_gap"] / seven["results"]["int4-g64"]["ppl_gap"]
    assert "same grid (int4-g64)" in text and f"GPTQ removes {removed:.0%}" in text


def test_interpretation_names_the_frontier_and_the_int4_speedup_from_bytes(seven):
    sentences = report.interpretation(seven)
    frontier_sentence = sentences[0]
    for scheme in report.pareto_frontier(seven):
        assert scheme in frontier_sentence.split("Dominated")[0]
    assert "Dominated: int4-g64 (by int4-g64-gptq)." in frontier_sentence
    base = decode_intensity(seven["results"]["fp32"], seven["model"])
    int4 = decode_intensity(seven["results"]["int4-g64-gptq"], seven["model"])
    speedup_sentence = next(s for s in sentences if "decode speed-up" in s)
    assert f"{base['bytes'] / int4['bytes']:.1f}x" in speedup_sentence


def test_interpretation_uses_the_machine_ridge_point_when_ceilings_are_known(seven):
    text = " ".join(report.interpretation(seven, machine=MACHINE))
    assert "ridge point is 5.0 FLOP/byte" in text and "memory-bound here" in text


def test_interpretation_reports_health_events_and_nans(seven):
    results = {**seven, "health": [{"scheme": "int4-g64-gptq", "layer": "x", "event": "damp_raised", "detail": ""}],
               "results": {**seven["results"], "int4-g128": {**seven["results"]["int4-g128"], "nan_count": 7}}}
    text = " ".join(report.interpretation(results))
    assert "damp_raised: 1" in text and "int4-g128 (7)" in text


# ---------------------------------------------------------------------------------------------
# Files


def test_manifest_records_versions_machine_and_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git checkout
    m = report.manifest("minigpt/pareto", "cd" * 32, 3)
    assert (m["spec"], m["spec_sha256"], m["seed"]) == ("minigpt/pareto", "cd" * 32, 3)
    assert m["versions"]["torch"] == torch.__version__
    assert m["machine"]["cpu_count"] >= 1
    assert m["git"] == {"revision": None, "dirty": None}


def test_manifest_does_not_fail_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert report.manifest("s", "0", 0)["git"]["revision"] is None


def test_write_report_files_writes_results_manifest_and_a_page_embedding_every_plot(written):
    assert json.loads(written["results"].read_text())["results"]["fp16"]["kld_p99"] is None
    assert json.loads(written["manifest"].read_text())["spec"] == "test/report"
    assert written["html"].read_text().count('src="data:image/png;base64,') == len(report.PLOTS)


# ---------------------------------------------------------------------------------------------
# Plots


@pytest.mark.parametrize("name", report.PLOTS)
def test_every_plot_is_written_as_a_valid_png_of_real_content(written, name):
    data = written[name].read_bytes()
    assert written[name].name == f"{name}.png"
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_plots_are_byte_identical_for_the_same_results(seven, tmp_path):
    first = plots.plot_pareto(seven, tmp_path / "a.png").read_bytes()
    assert plots.plot_pareto(seven, tmp_path / "b.png").read_bytes() == first


def test_make_plots_skips_plots_whose_data_is_absent(minigpt, tmp_path):
    results = dict(make_results(minigpt, SEVEN, gptq_of={"int4-g64-gptq": "int4-g64"}, tasks=False, layers=False))
    del results["model"]
    assert list(report.make_plots(results, tmp_path)) == ["pareto"]
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]


def test_make_plots_rejects_unknown_plot_names_and_lists_the_known_ones(seven, tmp_path):
    with pytest.raises(ValueError, match="choose from pareto, accuracy"):
        report.make_plots(seven, tmp_path, which=["pareto", "histogram"])


def png_size(data):
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_per_layer_plot_of_a_deep_model_stays_a_compact_block_by_kind_chart(tmp_path):
    layers = {f"model.layers.{block}.{kind}": {"rel_loss": 0.01 * (block + 1)}
              for block in range(20) for kind in ("q_proj", "k_proj", "v_proj")}
    results = {"baseline": "fp32", "results": {"int4": {"layers": layers}, "int8": {"layers": layers}}}
    width, height = png_size(plots.plot_per_layer(results, tmp_path / "deep.png").read_bytes())
    # One row per layer would make a 60-row, ~1500 px tall image.
    assert len(layers) > plots.MAX_LAYER_ROWS and height < width


def test_per_layer_plot_also_draws_the_rtn_loss(seven, tmp_path):
    path = plots.plot_per_layer(seven, tmp_path / "rtn.png", metric="rtn_rel_loss")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------------------------------------
# Tables and HTML


def test_text_table_has_one_aligned_row_per_scheme_and_dashes_for_nulls(seven):
    results = {**seven, "results": {**seven["results"], "fp16": {**seven["results"]["fp16"], "kld_mean": None}}}
    lines = report.metrics_table_text(results).splitlines()
    assert len(lines) == 2 + len(SEVEN)
    fp16 = next(line for line in lines if line.startswith("fp16 "))
    assert page.MISSING in fp16
    assert re.search(r"int4-g64-gptq\s+gptq\s+11 ± 0\.11\s+\+10\.0%", report.metrics_table_text(seven))


def test_html_section_embeds_images_as_data_uris_and_escapes_names(seven, tmp_path):
    evil = "<script>alert(1)</script>"
    results = {**seven, "spec": evil, "results": {**seven["results"], evil: seven["results"]["int4-g128"]}}
    images = report.make_plots(results, tmp_path, which=["pareto"])
    section = report.html_section(results, images)
    assert 'src="data:image/png;base64,' in section
    assert "<script>" not in section and "&lt;script&gt;" in section


# ---------------------------------------------------------------------------------------------
# The "servable" column (export.servability_table, recorded per scheme by the pipeline)


def test_servable_column_says_yes_no_with_the_reason_or_a_dash_when_not_recorded(minigpt):
    both = {"compressed_tensors": (True, ""), "gguf": (True, "")}
    ct_only = {"compressed_tensors": (True, ""),
               "gguf": (False, "GGUF export covers llama, not 'qwen2'; export compressed-tensors instead")}
    neither = {"compressed_tensors": (False, "float32 is a float scheme: there are no integer codes to pack; save it"),
               "gguf": (False, "float32 is a float scheme: there are no integer codes to pack; save it")}
    base = make_results(minigpt, {"fp32": 10.0, "int4-g64": 15.0, "int4-g128": 16.0}, layers=False, sweep=False)
    results = RunResult.from_json({**base.to_json(), "results": {
        "fp32": SchemeResult(**{**base.results["fp32"].to_json(), "servable": neither}),
        "int4-g64": SchemeResult(**{**base.results["int4-g64"].to_json(), "servable": both}),
        "int4-g128": SchemeResult(**{**base.results["int4-g128"].to_json(), "servable": ct_only})}})
    header, rows = page.metrics_rows(results)
    cells = {row[0]: row[header.index("servable")] for row in rows}
    assert cells == {"fp32": "no: float32 is a float scheme", "int4-g64": "yes",
                     "int4-g128": "yes (compressed-tensors)"}
    assert results["results"]["int4-g64"]["servable"] == {"compressed_tensors": [True, ""], "gguf": [True, ""]}
    header, rows = page.metrics_rows(base)   # recorded nowhere: a dash, never a guess
    assert {row[header.index("servable")] for row in rows} == {page.MISSING}


def test_servable_reasons_are_cut_to_their_first_clause_and_a_bounded_length():
    long = "x" * 100 + "; use bits: 4"
    cell = page.servable_cell({"compressed_tensors": [False, long], "gguf": [False, "other"]})
    assert cell.startswith("no: x") and len(cell) == len("no: ") + page.SHORT_REASON and cell.endswith("…")
    assert page.servable_cell({"gguf": [False, "INT3 has no kernel (it takes 4 or 8 bits); use 4"]}) == \
        "no: INT3 has no kernel"
    assert page.servable_cell(None) == page.servable_cell({}) == page.MISSING


def test_write_report_files_also_writes_the_lm_eval_document(written):
    doc = json.loads(written["lm_eval"].read_text())
    assert written["lm_eval"].name == "results_lm_eval.json"
    assert written["lm_eval"].parent == written["results"].parent
    assert doc["results"]["verb_tense@int4-g64-gptq"]["acc,none"] == pytest.approx(0.6)
    assert "quantlab_token_perplexity,none" in doc["results"]["quantlab_perplexity@fp32"]


@pytest.mark.parametrize("n, text", [(999_552, "1 MB"), (1_234_567, "1.23 MB"), (999, "999 B"), (999_499, "999 kB")])
def test_byte_sizes_read_with_three_digits_and_the_right_prefix(n, text):
    assert page._fmt_bytes(n) == text


# ---------------------------------------------------------------------------------------------
# The dashboard: verdicts and assertion outcomes, the standalone page


def entries_of(*rows):
    """Dashboard entries as quantlab run builds them, from (id, line, op, threshold, measured, label, message)."""
    from types import SimpleNamespace

    return [report.assertion_entry(SimpleNamespace(id=i, line=line, op=op, threshold=t, xfail="why" if "X" in label
                                                   else None),
                                   SimpleNamespace(message=message, measured=measured), label, source="specs/s.yaml")
            for i, line, op, t, measured, label, message in rows]


ENTRIES = [("nan_count[fp32] == 0", 3, "==", 0, 0, "PASS ", "nan_count of fp32 = 0 == 0"),
           ("ppl_gap[int4-g64-gptq] < 0.05", 4, "<", 0.05, 0.1, "FAIL ", "ppl_gap of int4-g64-gptq = 0.1 is not < 0.05"),
           ("monotone[q]", 5, None, None, None, "XFAIL", "not monotone (margin -0.25)")]


def test_an_assertion_entry_gives_the_margin_from_the_numbers_or_the_message():
    passed, failed, xfailed = entries_of(*ENTRIES)
    assert failed["margin"] == pytest.approx(-0.05) and failed["threshold"] == "< 0.05"
    assert xfailed["margin"] == -0.25 and xfailed["threshold"] is None
    assert passed["outcome"] == "PASS" and report.tally([passed, failed, xfailed]) == {
        "passed": 1, "failed": 1, "xfailed": 1, "inconclusive": 0, "verdict": "failed"}


def test_assertions_list_failures_first_with_line_and_margin_and_fold_the_passing_ones():
    text = report.assertions_html(entries_of(*ENTRIES))
    failing, _, folded = text.partition('<details class="ql-passing">')
    assert "specs/s.yaml:4" in failing and "-0.05" in failing and "XFAIL" in failing
    assert "nan_count[fp32]" not in failing and "nan_count[fp32]" in folded and "1 passing assertion" in folded


def test_the_standalone_page_shows_verdict_assertions_table_interpretation_and_every_plot(written, tmp_path):
    from quantlab.report.standalone import rewrite_report_page

    out = tmp_path / "out"
    out.mkdir()
    for name in ("results", "html", *report.PLOTS):
        (out / written[name].name).write_bytes(written[name].read_bytes())
    page_text = rewrite_report_page(out, entries_of(*ENTRIES)).read_text()
    assert page_text.startswith("<!doctype html>") and "<style>" in page_text
    assert 'class="ql-badge ql-failed">FAILED' in page_text and "1 failed, 1 passed, 1 expected failure" in page_text
    assert page_text.index("<h3>Assertions") < page_text.index('<table class="quantlab-metrics"') < page_text.index("<h3>Interpretation")
    assert page_text.count('src="data:image/png;base64,') == len(report.PLOTS)
    assert "http://" not in page_text and "https://" not in page_text   # readable offline: one file


def test_the_same_results_give_the_same_standalone_page(written, tmp_path):
    from quantlab.report.standalone import page as standalone_page

    images = {name: written[name] for name in report.PLOTS}
    results = json.loads(written["results"].read_text())
    entries = entries_of(*ENTRIES)
    assert standalone_page(results, images, assertions=entries) == standalone_page(results, images, assertions=entries)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.floats(0.01, 0.08))
def test_spread_labels_keep_labels_apart_and_inside_the_axes(wanted, sep):
    placed = sorted(plots.spread_labels(wanted, sep))
    assert all(0.03 - 1e-9 <= y for y in placed) and placed[-1] <= 0.97 + 1e-9 or len(wanted) * sep > 0.94
    if len(wanted) * sep <= 0.94:
        assert all(b - a >= sep - 1e-9 for a, b in zip(placed, placed[1:]))


def test_per_layer_heatmap_puts_rtn_beside_each_gptq_scheme_with_the_ratio(seven):
    from quantlab.report.heatmap import error_columns

    columns, ratios = error_columns(seven)
    labels = list(columns)
    assert labels[labels.index("int4-g64-gptq") + 1] == "int4-g64-gptq: RTN"
    layer = next(iter(ratios["int4-g64-gptq"]))
    r = seven["results"]["int4-g64-gptq"]["layers"][layer]
    assert ratios["int4-g64-gptq"][layer] == pytest.approx(r["rtn_rel_loss"] / r["rel_loss"])


def test_calibration_plot_draws_held_out_error_when_it_was_measured(minigpt, tmp_path):
    results = make_results(minigpt, SEVEN, gptq_of={"int4-g64-gptq": "int4-g64"}).to_json()
    in_sample = plots.plot_calibration_size(results, tmp_path / "in_sample.png").read_bytes()
    for run in results["sweeps"][0]["results"]:
        for entry in run.values():
            for stats in entry["layers"].values():
                stats["heldout_rel_loss"] = stats["rel_loss"] * 2
    heldout = plots.plot_calibration_size(results, tmp_path / "heldout.png").read_bytes()
    assert heldout.startswith(PNG_SIGNATURE) and heldout != in_sample


def test_without_matplotlib_the_report_is_written_without_plots_and_says_how_to_get_them(seven, tmp_path, monkeypatch,
                                                                                        caplog):
    real_find_spec = plots.importlib.util.find_spec
    monkeypatch.setattr(plots.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    written = report.write_report_files(seven, tmp_path, machine=MACHINE)
    assert not any(str(p).endswith(".png") for p in written.values())
    assert written["html"].is_file() and "quantlab[report]" in caplog.text


INCONCLUSIVE_MESSAGE = ("ppl_gap of int4-g64-gptq = 0.14, 95% upper bound 0.16 is not < 0.15 (se 0.01 over 8 windows): "
                        "inconclusive at 95%: evaluate more tokens (31 windows needed at this spread, 8 evaluated)")


def inconclusive_entries():
    """ENTRIES with the failing gap replaced by one whose bound straddles the threshold."""
    from types import SimpleNamespace

    entries = entries_of(ENTRIES[0], ENTRIES[2])
    exp = SimpleNamespace(id="ppl_gap[int4-g64-gptq] < 0.15", line=4, op="<", threshold=0.15, xfail=None)
    outcome = SimpleNamespace(passed=False, message=INCONCLUSIVE_MESSAGE, measured=0.14, inconclusive=True)
    return [*entries, report.assertion_entry(exp, outcome, "FAIL ", source="specs/s.yaml")]


def test_an_inconclusive_failure_is_labelled_as_such_and_still_fails_the_spec():
    entries = inconclusive_entries()
    assert entries[-1]["outcome"] == "INCONCLUSIVE"
    assert report.tally(entries)["verdict"] == "failed" and report.tally(entries)["inconclusive"] == 1
    card = report.spec_card("test/report", entries)
    failing = card.partition('<details class="ql-passing">')[0]
    assert 'ql-inconclusive">INCONCLUSIVE<' in failing and "evaluate more tokens (31 windows needed" in failing
    assert ">FAIL<" not in failing and "1 failed (1 inconclusive)" in card and "ql-badge ql-failed" in card


def test_the_standalone_page_labels_an_inconclusive_assertion(written, tmp_path):
    from quantlab.report.standalone import rewrite_report_page

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_bytes(written["results"].read_bytes())
    page_text = rewrite_report_page(out, inconclusive_entries()).read_text()
    assert 'ql-inconclusive">INCONCLUSIVE<' in page_text and "inconclusive at 95%: evaluate more tokens" in page_text
    assert 'class="ql-badge ql-failed">FAILED' in page_text


LOWBIT = {"kernels": {
    "fp32": {"op": "torch.nn.functional.linear", "seconds_per_token": 1e-3, "tokens_per_second": 1000.0,
             "ratio_to_fp32": 1.0, "flops": 6.4e6, "bytes": 12.8e6, "intensity": 0.5, "gflops": 6.4, "threads": 1},
    "int8": {"op": "aten._weight_int8pack_mm", "seconds_per_token": 5e-4, "tokens_per_second": 2000.0,
             "ratio_to_fp32": 2.0, "flops": 6.4e6, "bytes": 3.2e6, "intensity": 2.0, "gflops": 12.8, "threads": 1},
    "int4": {"op": "aten._weight_int4pack_mm_for_cpu", "seconds_per_token": 4e-4, "tokens_per_second": 2500.0,
             "ratio_to_fp32": 2.5, "flops": 6.4e6, "bytes": 1.7e6, "intensity": 3.76, "gflops": 16.0, "threads": 1}},
    "unavailable": {}}


@pytest.mark.parametrize("lowbit", [None, LOWBIT], ids=["theory only", "with measured kernels"])
def test_the_roofline_plot_draws_with_and_without_measured_kernels(seven, tmp_path, lowbit):
    machine = {**MACHINE, **({"lowbit_kernels": lowbit} if lowbit else {})}
    path = plots.plot_roofline(seven, machine, tmp_path / "roofline.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert plots.measured_kernels(seven, machine) == ({} if lowbit is None else {
        name: k for name, k in LOWBIT["kernels"].items()})


def test_interpretation_sets_the_measured_kernels_beside_the_theory(seven):
    results = {**seven, "machine": {**MACHINE, "lowbit_kernels": LOWBIT}}
    text = " ".join(report.interpretation(results))
    measured = next(s for s in report.interpretation(results) if s.startswith("Measured on this CPU"))
    assert ("INT4 packed kernel (aten._weight_int4pack_mm_for_cpu) 2,500 tokens/s vs fp32 F.linear 1,000 (2.50x), "
            "theory 7.5x; the int8 weight-only kernel") in measured
    assert "decode speed-up" not in measured and "above the" not in text   # 6.4 GFLOP/s is under this roof
    assert "Measured on this CPU" not in " ".join(report.interpretation(seven))


def test_interpretation_names_the_evaluation_throughput_for_what_it_is(seven):
    results = {**seven, "results": {name: {**r, "tokens_per_second": 1000.0 + i}
                                    for i, (name, r) in enumerate(seven["results"].items())}}
    sentence = next(s for s in report.interpretation(results) if s.startswith("As evaluated"))
    assert "1,000 (fp32) to 1,006 (int4-g64-gptq) tokens/s" in sentence and "prefill-style" in sentence
    assert "neither batch-1 decode speed" in sentence
