"""Spec validation: every user mistake is a one-line error naming the file, the line and the fix."""
import json
import time
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
    # what the spec names outside itself (issue 11: specs checked before they run)
    "unknown_model.yaml": (1, "unknown model 'gpt-5'; known models: minigpt-shakespeare"),
    "missing_hf_model.yaml": (1, "no/such/model is not a directory; hf:PATH needs"),
    "unknown_task.yaml": (5, "unknown task 'mmlu'; use one of verb_tense, jsonl:PATH"),
    "missing_jsonl_task.yaml": (5, "task file 'no/such/task.jsonl' does not exist"),
    "unknown_dataset.yaml": (5, "unknown dataset 'shakspeare'; did you mean 'shakespeare'?"),
    "missing_text_corpus.yaml": (5, "text corpus 'no/such/corpus.txt' is not a file or a folder of .txt files"),
    "missing_jsonl_corpus.yaml": (5, "jsonl corpus 'no/such/corpus.jsonl' does not exist"),
    "calibration_seq_len_beyond_context.yaml": (5, "context of 256 tokens; use a seq_len of at most 256"),
    "evaluation_seq_len_beyond_context.yaml": (5, "evaluation.seq_len = 1024 is longer than minigpt-shakespeare's context"),
    "sweep_seq_len_beyond_context.yaml": (7, "calibration.seq_len (in the sweep) = 512 is longer"),
    # values out of range
    "damp_zero.yaml": (4, "damp must be in (0, 1)"),
    "sweep_samples_zero.yaml": (7, "calibration.samples must be >= 1"),
    "sweep_seq_len_one.yaml": (7, "calibration.seq_len must be >= 2"),
    "sweep_heldout_negative.yaml": (7, "calibration.heldout_samples must be >= 0"),
    "duplicate_sweep_values.yaml": (7, "lists a value twice"),
    "negative_seed.yaml": (4, "seed -1 is outside what torch.Generator takes; use a seed in 0..18446744073709551615"),
    "seed_too_large.yaml": (4, "use a seed in 0..18446744073709551615"),
    "sweep_seed_too_large.yaml": (7, "sweep seed value 18446744073709551616 is outside"),
    "seed_overflows_heldout.yaml": (4, "held-out windows use seed + 1"),
    # numbers that are not finite, or not numbers
    "nan_threshold.yaml": (5, "the threshold after '<' must be a finite number, got nan"),
    "inf_times.yaml": (6, "times must be a finite number, got inf"),
    "times_not_a_number.yaml": (6, "times must be a finite number, got 'a lot'"),
    "plus_not_a_number.yaml": (6, "plus must be a finite number, got [1]"),
    "inf_tolerance.yaml": (6, "golden.metrics.ppl.rtol must be a finite non-negative number, got inf"),
    "nan_ppl_rtol.yaml": (6, "ppl_rtol must be a finite number, got nan"),
    "inf_slack.yaml": (9, "slack must be a finite number, got inf"),
    "nan_max_damp.yaml": (7, "max_damp must be a finite number, got nan"),
    "nan_spread_bound.yaml": (9, "the spread bound after '<=' must be a finite number, got inf"),
    "bad_memory_budget.yaml": (5, "memory budget 'two megabytes' is not a size; write a positive size"),
    "zero_memory_budget.yaml": (5, "memory budget '0MB' is not a positive size"),
    "negative_memory_budget.yaml": (5, "memory budget -5 is not a positive size"),
    "nan_memory_budget.yaml": (5, "memory budget nan is not a positive size"),
    # markers, names, YAML
    "marker_not_a_string.yaml": (4, "markers must be a list of marker names, got {'slow': True}"),
    "unregistered_marker.yaml": (4, "marker 'gpu' is not registered (registered: real_model, slow, quantlab_spec); "
                                    "to use it, add it to pytest.ini's markers and to MARKERS"),
    "name_leaves_project.yaml": (1, "name '../../outside' must be a relative path without '.', '..'"),
    "absolute_name.yaml": (1, "name '/tmp/specs/x' must be a relative path"),
    "billion_laughs.yaml": (4, "expands to more than 10000 values through YAML aliases"),
    "recursive_alias.yaml": (2, "refers to a value that contains it"),
    # checks true or false by construction (item 11)
    "spread_over_seed_on_rtn.yaml": (9, "check: spread of 'int4-g64' over seed is 0 by construction: an RTN scheme "
                                        "draws no calibration data"),
    "monotone_over_samples_on_rtn.yaml": (9, "check: monotone of 'int4-g64' over calibration.samples is true by construction"),
    "monotone_over_seed.yaml": (9, "use check: spread over a seed sweep"),
    "monotone_unsorted_sweep.yaml": (9, "in increasing order, e.g. [4, 16, 64]"),
    "pareto_of_one_scheme.yaml": (5, "needs at least two schemes in the spec: a frontier of one scheme always holds it"),
    "sweep_without_gptq.yaml": (6, "sweep calibration.samples changes no result"),
    "health_on_rtn.yaml": (7, "check: health on 'int4-g64', an RTN scheme, always holds"),
    "max_damp_below_damp.yaml": (6, "max_damp 0.05 is below the damp 0.1 that 'gptq-damped' starts from"),
    "grid_on_float.yaml": (5, "check: grid on 'fp32', a float scheme: it has no integer codes"),
    "spread_below_zero.yaml": (9, "spread < 0 can never hold"),
    "heldout_metric_without_heldout.yaml": (7, "mean_heldout_rel_loss is measured only with calibration.heldout_samples > 0"),
    "kld_without_kl_divergence.yaml": (7, "kld_mean is not measured with evaluation.kl_divergence: false"),
    "paired_metric_without_kl_divergence.yaml": (7, "delta_p_rms is not measured with evaluation.kl_divergence: false"),
    "task_metric_without_task.yaml": (5, "tasks.verb_tense.acc needs task 'verb_tense' under evaluation.tasks"),
    "heldout_sweep_wrong_metric.yaml": (10, "ppl does not depend on calibration.heldout_samples"),
    # export and checkpoint schemes (issue 12's schema)
    "export_float_scheme.yaml": (6, "export lists 'fp32', a float scheme; only integer schemes"),
    "export_undefined_scheme.yaml": (6, "export lists 'int4-g32', which is not defined under schemes"),
    "checkpoint_missing.yaml": (4, "checkpoint 'gguf:no/such/model.gguf': 'no/such/model.gguf' is not a file"),
    "checkpoint_with_bits.yaml": (6, "a checkpoint scheme takes no 'bits'"),
    "method_checkpoint_without_file.yaml": (4, "method checkpoint needs checkpoint: hf:PATH or gguf:FILE"),
    # confidence (issue 15): only on metrics with a standard error, a level in (0.5, 1), an inequality, paired units
    "confidence_on_bytes.yaml": (6, "bytes_total has no standard error to take a confidence from; confidence works "
                                    "with ppl, ppl_gap, kld_mean, top1_agreement, tasks.<task>.acc"),
    "confidence_out_of_range.yaml": (6, "confidence must be in (0.5, 1), e.g. 0.95"),
    "confidence_on_equality.yaml": (6, "confidence applies to <, <=, > and >=, not '=='"),
    "confidence_unpaired_units.yaml": (10, "tasks.verb_tense.acc is over items of verb_tense and top1_agreement over "
                                           "windows"),
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


def test_validate_prints_every_broken_example_as_one_located_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from quantlab.cli import main

    monkeypatch.chdir(tmp_path)
    paths = [EXAMPLES / name for name in sorted(BROKEN)]
    assert main(["validate", *map(str, paths)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"error {p}:{BROKEN[p.name][0]}" for p in paths]
    assert not any(tmp_path.iterdir())


def test_billion_laughs_is_refused_in_well_under_a_second():
    started = time.perf_counter()
    with pytest.raises(SpecError, match="expands to more than"):
        load_spec(EXAMPLES / "billion_laughs.yaml")
    assert time.perf_counter() - started < 0.5


def test_small_aliases_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("schemes:\n  fp32: fp32\n  g: &g {preset: int4-g64, method: gptq, damp: &d 0.02}\n"
                    "  g2: {<<: *g, act_order: true}\n"
                    "expect:\n  - {check: health, scheme: g2, max_damp: *d}\n")
    spec = load_spec(path)
    assert spec.schemes["g2"].act_order and spec.schemes["g2"].damp == 0.02 and spec.expect[0].options["max_damp"] == 0.02


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
    # what was compared: a's value, the scaling, and the threshold it made (not 11 passed off as a's ppl)
    assert "ppl of b = 12 is not < a's 10 \u00d7 1.1 = 11" in outcome.message and "margin -1" in outcome.message
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


def test_null_max_tokens_and_task_items_mean_the_whole_split_and_every_item():
    spec = parse_spec({"schemes": {"fp32": "fp32"},
                       "evaluation": {"max_tokens": None, "task_items": None, "tasks": ["verb_tense"]}})
    assert spec.evaluation.max_tokens is None and spec.evaluation.task_items is None


def _spec_file(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_hf_context_comes_from_config_json_and_none_means_unbounded(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    spec_text = f"model: hf:{model}\nevaluation: {{seq_len: 4096}}\nschemes: {{fp32: fp32}}\n"
    with pytest.raises(SpecError, match="config.json does not exist"):
        load_spec(_spec_file(tmp_path, spec_text))
    for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
        (model / "config.json").write_text(json.dumps({key: 1024}))
        with pytest.raises(SpecError, match=r"evaluation.seq_len = 4096 is longer than hf:.*context of 1024 tokens") as info:
            load_spec(_spec_file(tmp_path, spec_text))
        assert str(info.value).startswith(f"{tmp_path / 'spec.yaml'}:2: ")
    (model / "config.json").write_text(json.dumps({"model_type": "bloom"}))   # ALiBi: no stated context
    assert load_spec(_spec_file(tmp_path, spec_text)).evaluation.seq_len == 4096


def test_smollm2_context_is_known_without_fetching_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    spec = {"model": "smollm2-135m", "schemes": {"fp32": "fp32"}, "evaluation": {"seq_len": 8192, "max_tokens": 8192}}
    assert parse_spec(spec).evaluation.seq_len == 8192
    with pytest.raises(SpecError, match="context of 8192 tokens"):
        parse_spec({**spec, "calibration": {"seq_len": 8193}})
    assert not (tmp_path / "cache").exists()


def test_a_checkpoint_scheme_is_validated_only_and_integer_schemes_can_be_listed_for_export(tmp_path):
    from quantlab.spec import SCHEME_METHODS

    spec = parse_spec({"schemes": {"fp32": "fp32", "q": "int4-g64", "imported": {"checkpoint": f"hf:{tmp_path}"}},
                       "export": ["q"]})
    imported = spec.schemes["imported"]
    assert SCHEME_METHODS == ("float", "rtn", "gptq", "awq", "checkpoint")
    assert imported.method == "checkpoint" and not imported.needs_calibration and imported.quant_scheme() is None
    assert imported.describe() == {"method": "checkpoint", "checkpoint": f"hf:{tmp_path}"}
    assert spec.export == ["q"] and parse_spec({"schemes": {"fp32": "fp32"}}).export == []
    with pytest.raises(SpecError, match="'imported', a checkpoint scheme; only integer schemes"):
        parse_spec({"schemes": {"fp32": "fp32", "imported": {"checkpoint": f"hf:{tmp_path}"}}, "export": ["imported"]})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_spec({"schemes": {"fp32": "fp32", "g": {"checkpoint": f"gguf:{gguf}"}}}).schemes["g"].method == "checkpoint"
    with pytest.raises(SpecError, match="is not a file"):   # gguf: names a file, not a folder
        parse_spec({"schemes": {"fp32": "fp32", "g": {"checkpoint": f"gguf:{tmp_path}"}}})


def test_sweep_checks_keep_what_the_sweep_moves():
    schemes = {"fp32": "fp32", "rtn": "int4-g64", "g": {"preset": "int4-g64", "method": "gptq"}}
    spec = parse_spec({"schemes": schemes, "sweep": {"seed": [0, 1]},
                       "expect": [{"check": "spread", "metric": "ppl", "scheme": "*", "<=": 0.1}]})
    assert [e.scheme for e in spec.expect] == ["g"]      # '*' skips the schemes a seed cannot move
    # a metric measured against a GPTQ baseline moves with the seed even for an RTN scheme
    spec = parse_spec({"schemes": schemes, "baseline": "g", "sweep": {"seed": [0, 1]},
                       "expect": [{"check": "spread", "metric": "ppl_gap", "scheme": "rtn", "<=": 0.1}]})
    assert [e.scheme for e in spec.expect] == ["rtn"]


def test_markers_registered_in_the_schema_are_those_pytest_knows():
    import configparser

    from quantlab.spec import MARKERS

    ini = configparser.ConfigParser()
    ini.read(Path(__file__).parent.parent / "pytest.ini")
    registered = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].splitlines() if line.strip()}
    assert registered | {"quantlab_spec"} == set(MARKERS)
