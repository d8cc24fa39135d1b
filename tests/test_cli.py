"""The `quantlab` command line: version, validate, run, models, datasets."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantlab.cli import main

EXAMPLES = Path(__file__).parent / "examples"
TINY = """\
model: minigpt-shakespeare
calibration: {samples: 4, seq_len: 64}
evaluation: {seq_len: 64, max_tokens: 1024}
schemes:
  fp32: fp32
  int4-g64: int4-g64
expect:
  - {metric: nan_count, scheme: "*", "==": 0}
  - {metric: ppl_gap, scheme: int4-g64, "<": -1}
report: {plots: [pareto]}
"""


def test_version_is_printed_by_the_console_script():
    out = subprocess.run([sys.executable, "-m", "quantlab.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("quantlab ")


def test_validate_reports_each_broken_spec_with_its_location_and_exits_nonzero(capsys):
    assert main(["validate", str(EXAMPLES / "unknown_key.yaml"), str(EXAMPLES / "bad_baseline.yaml")]) == 1
    out = capsys.readouterr().out
    assert f"{EXAMPLES / 'unknown_key.yaml'}:2: unknown key 'schemas'" in out
    assert f"{EXAMPLES / 'bad_baseline.yaml'}:4: baseline 'fp16'" in out


def test_run_writes_results_and_reports_failed_assertions(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RESULTS_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    status = main(["run", str(spec), "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert status == 1  # the impossible ppl_gap < -1 fails
    assert "FAIL " in out and "ppl_gap of int4-g64" in out and "PASS " in out
    results = json.loads((tmp_path / "out" / "tiny" / "results.json").read_text())
    assert set(results["results"]) == {"fp32", "int4-g64"}
    assert results["results"]["int4-g64"]["codes"] == {"min": -7, "max": 7}
    assert (tmp_path / "out" / "tiny" / "pareto.png").stat().st_size > 1000
    page = (tmp_path / "out" / "tiny" / "report.html").read_text()
    assert "FAILED" in page and "ppl_gap of int4-g64" in page   # the standalone page carries the verdicts


@pytest.mark.parametrize("command, expected", [("models", "smollm2-135m"), ("datasets", "shakespeare"),
                                               ("datasets", "verb_tense")])
def test_listing_commands_name_the_builtins(command, expected, capsys):
    assert main([command]) == 0
    assert expected in capsys.readouterr().out


def test_run_fails_an_xfail_assertion_that_holds_as_pytest_does(tmp_path, capsys, monkeypatch):
    # pytest turns a strict xfail that passes into a failure (XPASS(strict)); the CLI must agree.
    monkeypatch.setenv("QUANTLAB_RESULTS_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.replace('"<": -1}', '"<": 100, xfail: "not expected to hold yet"}')
                    .replace('"==": 0}', '"==": 0}'))
    status = main(["run", str(spec), "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert status == 1 and "XPASS(strict)" in out and "not expected to hold yet" in out


def test_run_interrupted_by_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    from quantlab.pipeline import SpecRun

    monkeypatch.setenv("QUANTLAB_RESULTS_CACHE", str(tmp_path / "cache"))

    def interrupted(self, spec, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(SpecRun, "_compute", interrupted)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a rerun resumes" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
