"""Spec validation: every user mistake is a one-line error naming the file, the line and the fix."""
from pathlib import Path

import pytest

from quantlab.spec import Outcome, SpecError, check, load_spec, parse_spec

EXAMPLES = Path(__file__).parent / "examples"

# example file -> (line of the mistake, words the fix must contain)
BROKEN = {
    "unknown_key.yaml": (2, "did you mean 'schemes'"),
    "bad_group_size.yaml": (4, "positive integer"),
    "undefined_scheme.yaml": (6, "did you mean 'int4-g64'"),
    "wrong_type.yaml": (3, "calibration.samples must be an integer"),
    "bad_yaml.yaml": (4, "invalid YAML"),
    "unknown_metric.yaml": (5, "unknown metric 'perplexity'"),
    "two_operators.yaml": (5, "exactly one comparison"),
    "monotone_without_sweep.yaml": (6, "needs a sweep"),
    "unknown_preset.yaml": (4, "did you mean 'int4-g64'"),
    "act_order_on_rtn.yaml": (4, "only apply to method: gptq"),
    "bad_baseline.yaml": (4, "baseline 'fp16' is not one of the schemes"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_example_gives_a_located_one_line_error(name):
    line, fix = BROKEN[name]
    path = EXAMPLES / name
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert fix in message
    assert "\n" not in message


def test_every_example_in_the_folder_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(BROKEN)


def test_catalogue_specs_validate():
    specs_dir = Path(__file__).parent.parent / "specs"
    specs = sorted(specs_dir.rglob("*.yaml"))
    assert specs, "the spec catalogue is empty"
    for path in specs:
        assert load_spec(path).name == path.relative_to(specs_dir).with_suffix("").as_posix()


def test_star_expands_to_one_assertion_per_scheme_and_presets_fill_fields():
    spec = parse_spec({"schemes": {"fp32": "fp32", "int4-g64": "int4-g64", "g": {"preset": "int4-g128", "method": "gptq"}},
                       "expect": [{"metric": "nan_count", "scheme": "*", "==": 0}]})
    assert [e.scheme for e in spec.expect] == ["fp32", "int4-g64", "g"]
    assert spec.schemes["g"].group_size == 128 and spec.schemes["g"].method == "gptq"
    assert spec.schemes["fp32"].method == "float"


def test_memory_budget_accepts_units():
    spec = parse_spec({"schemes": {"fp32": "fp32"}, "report": {"memory_budget": "2 MiB"}})
    assert spec.report.memory_budget_bytes == 2 * 2 ** 20


def _results(**per_scheme):
    return {"results": per_scheme, "health": [], "sweeps": []}


def test_comparison_against_another_scheme_reports_value_threshold_and_margin():
    spec = parse_spec({"schemes": {"a": "fp32", "b": "int4-g64"},
                       "expect": [{"metric": "ppl", "scheme": "b", "<": {"metric": "ppl", "scheme": "a", "times": 1.1}}]},
                      source="s.yaml")
    outcome = check(spec.expect[0], _results(a={"ppl": 10.0}, b={"ppl": 12.0}), spec)
    assert isinstance(outcome, Outcome) and not outcome.passed
    assert "ppl of b = 12 is not < ppl of a (11)" in outcome.message and "margin -1" in outcome.message
    assert check(spec.expect[0], _results(a={"ppl": 10.0}, b={"ppl": 10.5}), spec).passed


def test_a_metric_that_was_not_computed_fails_instead_of_passing():
    spec = parse_spec({"schemes": {"a": "fp32"}, "expect": [{"metric": "kld_mean", "scheme": "a", "<": 1}]})
    outcome = check(spec.expect[0], _results(a={"kld_mean": None}), spec)
    assert not outcome.passed and "not computed" in outcome.message


def test_grid_check_requires_the_exact_code_range():
    spec = parse_spec({"schemes": {"q": "int4-g64"}, "expect": [{"check": "grid", "scheme": "q", "range": [-7, 7]}]})
    assert check(spec.expect[0], _results(q={"codes": {"min": -7, "max": 7}}), spec).passed
    assert not check(spec.expect[0], _results(q={"codes": {"min": -8, "max": 7}}), spec).passed


def test_monotone_check_allows_the_slack_and_names_the_offending_step():
    spec = parse_spec({"schemes": {"g": {"preset": "int4-g64", "method": "gptq"}},
                       "sweep": {"calibration.samples": [4, 8, 16]},
                       "expect": [{"check": "monotone", "metric": "mean_rel_loss", "scheme": "g", "slack": 0.05}]})
    sweep = lambda ys: {"results": {}, "health": [], "sweeps": [
        {"key": "calibration.samples", "values": [4, 8, 16], "results": [{"g": {"mean_rel_loss": y}} for y in ys]}]}
    assert check(spec.expect[0], sweep([1.0, 0.8, 0.82]), spec).passed      # +2.5% is inside the slack
    outcome = check(spec.expect[0], sweep([1.0, 0.8, 0.9]), spec)
    assert not outcome.passed and "0.8 at 8 -> 0.9 at 16" in outcome.message


def test_health_check_fails_on_rtn_fallback_and_raised_damping():
    spec = parse_spec({"schemes": {"g": {"preset": "int4-g64", "method": "gptq"}},
                       "expect": [{"check": "health", "scheme": "g", "max_damp": 0.05}]})
    healthy = {"results": {"g": {"layers": {"l0": {"damp": 0.01}}}}, "health": []}
    assert check(spec.expect[0], healthy, spec).passed
    fallback = {"results": {"g": {"layers": {"l0": {"damp": 0.01}}}},
                "health": [{"scheme": "g", "layer": "l0", "event": "rtn_fallback", "detail": "singular"}]}
    assert "fell back to RTN" in check(spec.expect[0], fallback, spec).message
    damped = {"results": {"g": {"layers": {"l0": {"damp": 0.1}}}}, "health": []}
    assert "needed damp 0.1 > 0.05" in check(spec.expect[0], damped, spec).message


def test_pareto_check_counts_perplexities_within_its_tolerance_as_equal():
    results = {"results": {"fp32": {"bytes_total": 8e6, "ppl": 5.751, "nan_count": 0},
                           "int8": {"bytes_total": 2e6, "ppl": 5.750, "nan_count": 0},
                           "int4": {"bytes_total": 1e6, "ppl": 5.9, "nan_count": 0}},
               "health": [], "sweeps": []}
    schemes = {"fp32": "fp32", "int8": "int8-per-channel", "int4": "int4-g64"}
    tolerant = parse_spec({"schemes": schemes, "expect": [{"check": "pareto_frontier", "schemes": ["fp32"]}]})
    strict = parse_spec({"schemes": schemes, "expect": [{"check": "pareto_frontier", "schemes": ["fp32"], "ppl_rtol": 0}]})
    assert check(tolerant.expect[0], results, tolerant).passed
    outcome = check(strict.expect[0], results, strict)
    assert not outcome.passed and "frontier: int4, int8" in outcome.message
