"""The results type: one JSON form, nulls for what was not computed, and a strict reader."""
import json
import math

import pytest

from quantlab.metrics import METRICS, lookup, ppl_gap, resolve
from quantlab.results import HealthEvent, HealthEventName, LayerStats, RunResult, SchemeResult, Sweep, TaskResult


def a_run(**scheme_fields) -> RunResult:
    scheme = SchemeResult(ppl=12.0, ppl_stderr=0.1, bytes_total=100, tasks={"verbs": TaskResult(0.5, 0.1, 20)},
                          layers={"blocks.0.attn": LayerStats(rel_loss=0.01, damp=0.01, n_tokens=64, code_min=-7,
                                                              code_max=7)},
                          health=[HealthEvent(HealthEventName.DAMP_RAISED, "blocks.0.attn", "raised to 0.1")],
                          **scheme_fields)
    base = SchemeResult(ppl=10.0, bytes_total=400)
    return RunResult(spec="s", spec_sha256="0" * 64, source="specs/s.yaml", seed=0, baseline="fp32",
                     fingerprint={"dataset": "shakespeare"}, schemes={"fp32": {"method": "float"}, "q": {"method": "gptq"}},
                     results={"fp32": base, "q": scheme.with_gap_to(base)},
                     sweeps=[Sweep("seed", (0, 1), ({"q": scheme}, {"q": scheme}))],
                     health=[HealthEvent("damp_raised", "blocks.0.attn", "raised", scheme="q")])


def test_non_finite_floats_become_null_when_a_result_is_built():
    result = SchemeResult(ppl=math.nan, kld_mean=math.inf, layers={"x": LayerStats(rel_loss=-math.inf)})
    assert result.ppl is None and result.kld_mean is None and result.layers["x"].rel_loss is None
    json.dumps(result.to_json(), allow_nan=False)


def test_a_run_round_trips_through_strict_json():
    run = a_run()
    text = json.dumps(run.to_json(), allow_nan=False, sort_keys=True)
    assert RunResult.from_json(json.loads(text)) == run


def test_a_run_reads_as_its_results_json_mapping():
    run = a_run()
    assert run["results"]["q"]["tasks"]["verbs"]["acc"] == 0.5
    assert run["health"] == [{"scheme": "q", "layer": "blocks.0.attn", "event": "damp_raised", "detail": "raised"}]
    assert run["results"]["q"]["ppl_gap"] == pytest.approx(0.2)


def test_every_registered_metric_is_a_scheme_result_key_and_null_when_not_computed():
    entry = SchemeResult().to_json()
    for name in METRICS:
        assert name in entry and entry[name] is None


def test_layer_statistics_keep_todays_keys_and_add_optional_ones_only_when_measured():
    plain = LayerStats(rel_loss=0.1).to_json()
    assert "heldout_rel_loss" not in plain and "code_min" not in plain and plain["damp"] is None
    assert LayerStats(heldout_rel_loss=0.2, code_min=-7).to_json()["code_min"] == -7


def test_unknown_keys_and_health_events_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="re-run the spec"):
        SchemeResult.from_json({"ppl": 1.0, "perplexity": 2.0})
    with pytest.raises(ValueError, match="unknown health event 'exploded'; known: damp_raised"):
        HealthEvent("exploded")


def test_a_recorded_gap_is_kept_and_a_missing_one_measured_against_the_baseline():
    base = SchemeResult(ppl=10.0)
    assert SchemeResult(ppl=11.0).with_gap_to(base).ppl_gap == pytest.approx(0.1)
    assert SchemeResult(ppl=11.0, ppl_gap=0.5).with_gap_to(base).ppl_gap == 0.5
    assert SchemeResult(ppl=None).with_gap_to(base).ppl_gap is None


def test_metric_paths_resolve_in_one_place():
    entry = a_run()["results"]["q"]
    assert resolve(entry, "tasks.verbs.acc") == 0.5 and resolve(entry, "tasks.missing.acc") is None
    assert a_run().results["q"].metric("ppl") == 12.0
    assert lookup("tasks.verbs.acc").higher_is_better and lookup("ppl").higher_is_better is False
    assert lookup("tasks.verbs.loss") is None
    assert ppl_gap(11.0, 0.0) is None and ppl_gap(None, 1.0) is None
