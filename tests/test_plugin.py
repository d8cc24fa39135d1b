"""The pytest plugin end to end, with pytester: collection, item ids, failure messages, located spec
errors, xfail, golden regeneration and drift, and the report extras."""
import json

import pytest

import quantlab

pytest_plugins = ["pytester"]

# A spec small enough to run in seconds: the committed MiniGPT, 4 calibration windows, 2k eval tokens.
SPEC = """\
seed: 0
model: minigpt-shakespeare
calibration: {{dataset: shakespeare, samples: 4, seq_len: 64}}
evaluation: {{dataset: shakespeare, split: test, seq_len: 64, max_tokens: 2048, kl_divergence: true}}
schemes:
  fp32: fp32
  int4-g64: int4-g64
  int4-g64-gptq: {{preset: int4-g64, method: gptq}}
expect:
  - {{metric: nan_count, scheme: "*", "==": 0}}
  - {{check: grid, scheme: int4-g64, range: [-7, 7]}}
  - {{metric: ppl_gap, scheme: int4-g64-gptq, "<": {gap_threshold}}}
golden:
  metrics: {{ppl: {{rtol: 0.0001}}, kld_mean: {{rtol: 0.01}}}}
  layers: {{metric: rtn_rel_loss, rtol: 0.001}}
report: {{plots: [pareto, per_layer]}}
"""


@pytest.fixture
def project(pytester, tmp_path_factory, monkeypatch):
    """A pytester project with a specs/ folder; results are cached across these tests."""
    monkeypatch.setenv("QUANTLAB_RESULTS_CACHE", str(tmp_path_factory.getbasetemp() / "quantlab-results-cache"))
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n    ignore::DeprecationWarning:pytest_html\n")
    pytester.mkdir("specs")
    return pytester


def write_spec(pytester, name="tiny", gap_threshold=10.0, text=None):
    path = pytester.path / "specs" / f"{name}.yaml"
    path.write_text(text if text is not None else SPEC.format(gap_threshold=gap_threshold))
    return path


def test_collection_yields_one_readable_item_per_assertion_per_scheme(project):
    write_spec(project)
    result = project.runpytest_subprocess("--collect-only", "-q", "specs")
    ids = [line for line in result.outlines if "::" in line]
    assert ids == [
        "specs/tiny.yaml::nan_count[fp32]==0",
        "specs/tiny.yaml::nan_count[int4-g64]==0",
        "specs/tiny.yaml::nan_count[int4-g64-gptq]==0",
        "specs/tiny.yaml::grid[int4-g64]",
        "specs/tiny.yaml::ppl_gap[int4-g64-gptq]<10",
        "specs/tiny.yaml::golden-metrics",
        "specs/tiny.yaml::golden-layers",
        "specs/tiny.yaml::report",
    ]


def test_a_malformed_spec_fails_collection_with_its_file_line_and_fix_and_others_still_run(project):
    write_spec(project)
    (project.path / "specs" / "broken.yaml").write_text("model: minigpt-shakespeare\nschemes:\n  fp32: fp32\nexpect:\n"
                                                        "  - {metric: ppl_gapp, scheme: fp32, '<': 1}\n")
    result = project.runpytest_subprocess("--collect-only", "-q", "specs")
    text = result.stdout.str()
    assert "\nspecs/broken.yaml:5: unknown metric 'ppl_gapp'; did you mean 'ppl_gap'?" in text
    assert "Traceback" not in text
    assert "specs/tiny.yaml::report" in text


def test_a_failing_assertion_prints_the_spec_line_measured_value_threshold_and_margin(project):
    write_spec(project, gap_threshold=-1.0)
    result = project.runpytest_subprocess("specs", "-k", "ppl_gap", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.re_match_lines([r".*specs/tiny.yaml:12: ppl_gap of int4-g64-gptq = [-\d.e]+ is not < -1 \(margin -[\d.e]+\)"])


def test_an_xfail_assertion_is_strict(project):
    text = SPEC.format(gap_threshold=10.0).replace(
        '"<": 10.0}', '"<": 10.0, xfail: "not expected to hold yet"}')
    write_spec(project, text=text)
    result = project.runpytest_subprocess("specs", "-k", "ppl_gap")
    result.assert_outcomes(failed=1)  # it passed, so the strict xfail turns it into a failure
    assert "XPASS(strict)" in result.stdout.str()


def test_golden_files_are_recorded_then_compared_and_drift_fails_with_old_and_new(project):
    write_spec(project)
    golden = project.path / "golden" / "tiny"
    first = project.runpytest_subprocess("specs", "-k", "golden", "--force-regen")
    first.assert_outcomes(failed=2)  # pytest-regressions fails the run that (re)writes golden files
    assert (golden / "ppl.csv").is_file() and (golden / "layers_rtn_rel_loss.csv").is_file()
    assert json.loads((golden / "fingerprint.json").read_text())["fingerprint"]["seq_len"] == 64

    project.runpytest_subprocess("specs", "-k", "golden").assert_outcomes(passed=2)

    lines = (golden / "ppl.csv").read_text().splitlines()
    header, values = lines[0].split(","), lines[1].split(",")
    values[header.index("int4-g64")] = str(float(values[header.index("int4-g64")]) * 1.01)
    (golden / "ppl.csv").write_text("\n".join([lines[0], ",".join(values)]) + "\n")
    drift = project.runpytest_subprocess("specs", "-k", "golden-metrics")
    drift.assert_outcomes(failed=1)
    assert "golden drift beyond tolerance" in drift.stdout.str() and "int4-g64" in drift.stdout.str()


def test_golden_files_from_another_evaluation_protocol_are_refused_not_reported_as_drift(project):
    write_spec(project)
    project.runpytest_subprocess("specs", "-k", "golden", "--force-regen")
    write_spec(project, text=SPEC.format(gap_threshold=10.0).replace("seq_len: 64, max_tokens", "seq_len: 128, max_tokens"))
    result = project.runpytest_subprocess("specs", "-k", "golden-metrics")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "different evaluation protocol" in out and "seq_len: 64 -> 128" in out


def test_the_html_report_embeds_the_metrics_table_and_plots(project):
    write_spec(project)
    result = project.runpytest_subprocess("specs", "-k", "report", "--html=report.html", "--quantlab-out=out")
    result.assert_outcomes(passed=1)
    html = (project.path / "report.html").read_text()
    assert "quantlab quantization report" in html
    assert "data:image/png;base64" in html
    assert (project.path / "out" / "tiny" / "results.json").is_file()
    assert (project.path / "out" / "tiny" / "manifest.json").is_file()


def test_the_html_report_is_one_file_with_its_stylesheet_inlined_whatever_the_plugin_order(project, monkeypatch):
    # A report copied out of CI alone must keep its styling: no assets/ folder beside it to lose.
    # Entry-point plugins register in the order their distributions are found on sys.path, which the
    # working directory changes (a checkout's quantlab.egg-info comes first): register quantlab before
    # pytest-html here, the order in which pytest-html configured itself before quantlab asked for one file.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    write_spec(project)
    result = project.runpytest_subprocess("-p", "quantlab", "-p", "metadata", "-p", "html", "-p", "html_fixtures",
                                          "specs", "-k", "report", "--html=report.html")
    result.assert_outcomes(passed=1)
    html = (project.path / "report.html").read_text()
    assert "assets/style.css" not in html
    assert not (project.path / "assets").exists()
    # The environment table names quantlab's version (pytest-metadata's hook, escaped JSON in the page).
    assert f"&#34;quantlab&#34;: &#34;{quantlab.__version__}&#34;" in html


def without_rtn_scheme(text):
    """The spec with its int4-g64 scheme (and the grid assertion on it) removed."""
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith("  int4-g64: ") and "check: grid" not in line) + "\n"


def test_a_golden_column_of_a_removed_scheme_fails_until_a_regen_drops_it(project):
    write_spec(project)
    golden = project.path / "golden" / "tiny"
    project.runpytest_subprocess("specs", "-k", "golden", "--force-regen")
    write_spec(project, text=without_rtn_scheme(SPEC.format(gap_threshold=10.0)))
    result = project.runpytest_subprocess("specs", "-k", "golden-metrics")
    result.assert_outcomes(failed=1)
    assert "scheme int4-g64 is in the golden file ppl.csv but not in the spec; re-record with --force-regen" in result.stdout.str()
    project.runpytest_subprocess("specs", "-k", "golden-metrics", "--force-regen")
    assert (golden / "ppl.csv").read_text().splitlines()[0] == ",fp32,int4-g64-gptq"
    project.runpytest_subprocess("specs", "-k", "golden-metrics").assert_outcomes(passed=1)


def test_golden_layer_files_record_only_the_schemes_that_measured_the_metric(project):
    write_spec(project)
    project.runpytest_subprocess("specs", "-k", "golden-layers", "--force-regen")
    header = (project.path / "golden" / "tiny" / "layers_rtn_rel_loss.csv").read_text().splitlines()[0]
    assert header == ",int4-g64-gptq"   # RTN without calibration has no Hessian, so no rtn_rel_loss


def test_regen_all_re_records_the_fingerprint_like_force_regen(project):
    write_spec(project)
    project.runpytest_subprocess("specs", "-k", "golden", "--force-regen")
    write_spec(project, text=SPEC.format(gap_threshold=10.0).replace("max_tokens: 2048", "max_tokens: 1024"))
    project.runpytest_subprocess("specs", "-k", "golden", "--regen-all")
    fingerprint = json.loads((project.path / "golden" / "tiny" / "fingerprint.json").read_text())["fingerprint"]
    assert fingerprint["max_tokens"] == 1024
    project.runpytest_subprocess("specs", "-k", "golden").assert_outcomes(passed=2)


def test_a_deleted_fingerprint_beside_golden_files_is_refused_not_re_recorded(project):
    write_spec(project)
    golden = project.path / "golden" / "tiny"
    project.runpytest_subprocess("specs", "-k", "golden", "--force-regen")
    (golden / "fingerprint.json").unlink()
    result = project.runpytest_subprocess("specs", "-k", "golden-metrics")
    result.assert_outcomes(failed=1)
    assert "fingerprint.json is missing beside the golden files" in result.stdout.str()
    assert not (golden / "fingerprint.json").exists()


def test_the_html_report_opens_with_a_summary_card_per_spec_failures_first_and_every_plot(project):
    write_spec(project, gap_threshold=-1.0)
    result = project.runpytest_subprocess("specs", "--html=report.html", "--quantlab-out=out", "-k", "not golden",
                                          "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, failed=1)
    html = (project.path / "report.html").read_text()
    summary = html[html.index('<div class="quantlab-summary">'):html.index('id="results-table"')]
    card = summary[summary.index('class="ql-card ql-card-failed"'):]
    assert "FAILED" in card and "1 failed, 4 passed" in card
    failing, _, passing = card.partition('<details class="ql-passing">')
    assert "specs/tiny.yaml:12" in failing and "ppl_gap[int4-g64-gptq] &lt; -1" in failing and "&lt; -1" in failing
    assert "nan_count[fp32]" not in failing and "nan_count[fp32]" in passing   # passing rows: folded away
    assert 'class="quantlab-metrics"' in card and 'alt="Pareto plot of tiny"' in card
    assert 'href="#quantlab-tiny"' in card and 'id="quantlab-tiny"' in summary   # the card links to the section
    assert 'alt="per_layer"' in summary   # every plot of the spec is on the page
    assert "<th>spec line</th>" in html
