"""Golden metrics files of a sweep spec gate every sweep point, not only the spec's own run (pytester, end to end)."""
import json

import pytest

from quantlab.pytest_plugin import golden_rows

pytest_plugins = ["pytester"]

# The committed MiniGPT, 4 calibration windows, 2k evaluation tokens, swept over two calibration sizes.
SPEC = """\
seed: 0
model: minigpt-shakespeare
calibration: {dataset: shakespeare, samples: 4, seq_len: 64}
evaluation: {dataset: shakespeare, split: test, seq_len: 64, max_tokens: 2048}
schemes:
  fp32: fp32
  int4-g64: int4-g64
  int4-g64-gptq: {preset: int4-g64, method: gptq}
sweep:
  calibration.samples: [2, 8]
expect:
  - {metric: nan_count, scheme: "*", "==": 0}
golden:
  metrics: {ppl: {rtol: 0.0001}, kld_mean: {rtol: 0.01}}
"""


def test_golden_rows_are_the_spec_run_then_each_sweep_point_in_order():
    results = {"results": {"a": {"ppl": 1.0}},
               "sweeps": [{"key": "calibration.samples", "values": [2, 8],
                           "results": [{"a": {"ppl": 2.0}}, {"a": {"ppl": 3.0}}]}]}
    assert [(label, point["a"]["ppl"]) for label, point in golden_rows(results)] == \
        [("spec", 1.0), ("calibration.samples=2", 2.0), ("calibration.samples=8", 3.0)]
    assert [label for label, _ in golden_rows({"results": {}})] == ["spec"]


@pytest.fixture
def project(pytester, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RESULTS_CACHE", str(tmp_path_factory.getbasetemp() / "quantlab-results-cache"))
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n    ignore::DeprecationWarning:pytest_html\n")
    pytester.mkdir("specs")
    (pytester.path / "specs" / "swept.yaml").write_text(SPEC)
    return pytester


def test_a_sweep_specs_golden_file_holds_every_point_and_drift_at_a_non_main_point_fails(project):
    golden = project.path / "golden" / "swept"
    project.runpytest_subprocess("specs", "-k", "golden", "--force-regen").assert_outcomes(failed=1)
    assert json.loads((golden / "fingerprint.json").read_text())["rows"] == \
        ["spec", "calibration.samples=2", "calibration.samples=8"]
    lines = (golden / "ppl.csv").read_text().splitlines()
    assert lines[0] == ",fp32,int4-g64,int4-g64-gptq" and len(lines) == 4   # header, the spec run, two points
    rows = [[float(v) for v in line.split(",")[1:]] for line in lines[1:]]
    gptq = [row[2] for row in rows]
    assert len(set(gptq)) == 3   # GPTQ moves with the calibration size; RTN and fp32 do not
    assert len({row[1] for row in rows}) == 1 and len({row[0] for row in rows}) == 1
    project.runpytest_subprocess("specs", "-k", "golden").assert_outcomes(passed=1)

    # Drift at the last sweep point only (not the spec's own run) now fails, naming the row.
    header = lines[0].split(",")
    values = lines[3].split(",")
    values[header.index("int4-g64-gptq")] = str(gptq[2] * 1.01)
    (golden / "ppl.csv").write_text("\n".join(lines[:3] + [",".join(values)]) + "\n")
    drift = project.runpytest_subprocess("specs", "-k", "golden-metrics")
    drift.assert_outcomes(failed=1)
    assert "golden drift beyond tolerance" in drift.stdout.str() and "int4-g64-gptq" in drift.stdout.str()


def test_golden_files_recorded_with_the_main_point_only_are_refused_as_another_protocol(project):
    golden = project.path / "golden" / "swept"
    project.runpytest_subprocess("specs", "-k", "golden", "--force-regen")
    recorded = json.loads((golden / "fingerprint.json").read_text())
    del recorded["rows"]   # as written before sweep points were gated
    (golden / "fingerprint.json").write_text(json.dumps(recorded))
    result = project.runpytest_subprocess("specs", "-k", "golden-metrics")
    result.assert_outcomes(failed=1)
    assert "different evaluation protocol" in result.stdout.str() and "rows: None ->" in result.stdout.str()
