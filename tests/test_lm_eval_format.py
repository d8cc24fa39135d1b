"""results_lm_eval.json: a run as lm-evaluation-harness's results document, one (task, scheme) per entry."""
import json
import math

import pytest

from quantlab.files import write_json
from quantlab.lm_eval_format import lm_eval_results, lm_eval_results_for_scheme
from quantlab.results import RunResult, SchemeResult, TaskResult

# The top-level keys lm-eval's simple_evaluate returns and EvaluationTracker writes (lm-eval 0.4.x).
LM_EVAL_SECTIONS = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                    "config")


def a_run(task_scoring="summed log-likelihood of the continuation") -> RunResult:
    fp32 = SchemeResult(ppl=10.0, ppl_stderr=0.2, eval_tokens=1020,
                        tasks={"verb_tense": TaskResult(acc=0.9, acc_stderr=math.sqrt(0.9 * 0.1 / 600), n=600)})
    q = SchemeResult(ppl=11.5, ppl_stderr=None, eval_tokens=1020,
                     tasks={"verb_tense": TaskResult(acc=0.8, acc_stderr=math.sqrt(0.8 * 0.2 / 600), n=600),
                            "jsonl:data/qa.jsonl": TaskResult(acc=None, acc_stderr=None, n=0)})
    return RunResult(spec="minigpt/pareto", spec_sha256="ab" * 32, source="specs/minigpt/pareto.yaml", seed=3,
                     baseline="fp32",
                     fingerprint={"quantlab_version": "0.9.0", "model": "minigpt-shakespeare", "dataset": "shakespeare",
                                  "split": "test", "seq_len": 256, "windows": 4, "task_scoring": task_scoring},
                     schemes={"fp32": {"method": "float"}, "int4-g64": {"method": "rtn", "bits": 4}},
                     results={"fp32": fp32, "int4-g64": q.with_gap_to(fp32)},
                     model={"name": "minigpt-shakespeare"}, timestamp="2025-01-02T03:04:05+00:00")


def test_the_run_is_one_lm_eval_document_with_a_task_per_task_and_scheme():
    doc = lm_eval_results(a_run())
    assert all(section in doc for section in LM_EVAL_SECTIONS)
    assert list(doc["results"]) == ["quantlab_perplexity@fp32", "verb_tense@fp32",
                                    "quantlab_perplexity@int4-g64", "verb_tense@int4-g64"]
    for section in ("group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert set(doc[section]) == set(doc["results"]), section
    entry = doc["results"]["verb_tense@int4-g64"]
    assert entry == {"alias": "verb_tense@int4-g64", "acc,none": 0.8, "acc_stderr,none": pytest.approx(
        math.sqrt(0.8 * 0.2 / 599))}
    assert doc["configs"]["verb_tense@int4-g64"]["task"] == "verb_tense@int4-g64"
    assert doc["configs"]["verb_tense@int4-g64"]["metadata"]["quantlab_scheme"] == "int4-g64"
    assert doc["configs"]["verb_tense@int4-g64"]["output_type"] == "multiple_choice"
    assert doc["n-samples"]["verb_tense@fp32"] == {"original": 600, "effective": 600}
    assert doc["n-shot"]["verb_tense@fp32"] == 0 and doc["versions"]["verb_tense@fp32"] == "0.9.0"
    assert doc["higher_is_better"]["verb_tense@fp32"] == {"acc": True}
    assert doc["group_subtasks"]["verb_tense@fp32"] == []
    assert doc["quantlab"]["schemes"]["int4-g64"] == ["quantlab_perplexity@int4-g64", "verb_tense@int4-g64"]
    assert doc["config"]["model"] == "quantlab" and doc["config"]["model_args"] == {"pretrained": "minigpt-shakespeare"}
    assert doc["date"] == 1735787045.0


def test_accuracy_stderr_is_recomputed_as_lm_eval_computes_it_for_a_mean():
    # lm-eval: sample standard deviation / sqrt(n) = sqrt(p (1 - p) / (n - 1)); quantlab divides by n.
    doc = lm_eval_results_for_scheme(a_run(), "fp32")
    assert doc["results"]["verb_tense"]["acc_stderr,none"] == pytest.approx(math.sqrt(0.9 * 0.1 / 599))
    one = RunResult(spec="s", spec_sha256="", source="", seed=0, baseline="a", fingerprint={}, schemes={},
                    results={"a": SchemeResult(tasks={"t": TaskResult(acc=1.0, acc_stderr=0.0, n=1)})})
    assert lm_eval_results_for_scheme(one, "a")["results"]["t"]["acc_stderr,none"] == "N/A"


def test_perplexity_keeps_quantlabs_name_never_lm_evals_word_or_byte_perplexity():
    doc = lm_eval_results(a_run())
    ppl = doc["results"]["quantlab_perplexity@int4-g64"]
    assert ppl["quantlab_token_perplexity,none"] == 11.5
    assert ppl["quantlab_token_perplexity_stderr,none"] == "N/A"   # not computed: lm-eval's marker, never null
    assert doc["results"]["quantlab_perplexity@fp32"]["quantlab_token_perplexity_stderr,none"] == 0.2
    assert doc["higher_is_better"]["quantlab_perplexity@fp32"] == {"quantlab_token_perplexity": False}
    assert doc["n-samples"]["quantlab_perplexity@fp32"] == {"original": 4, "effective": 4}   # windows
    text = json.dumps(doc)
    for lm_eval_metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert f'"{lm_eval_metric},' not in text


def test_metrics_not_computed_are_left_out_rather_than_written_as_null():
    doc = lm_eval_results(a_run())
    assert not any(key.startswith("jsonl:") for key in doc["results"])
    no_ppl = RunResult(spec="s", spec_sha256="", source="", seed=0, baseline="a", fingerprint={}, schemes={},
                       results={"a": SchemeResult()})
    assert lm_eval_results(no_ppl)["results"] == {}


def test_length_normalised_scoring_is_lm_evals_acc_bytes():
    doc = lm_eval_results_for_scheme(a_run("summed log-likelihood of the continuation, divided by its UTF-8 bytes"),
                                     "fp32")
    assert set(doc["results"]["verb_tense"]) == {"alias", "acc_bytes,none", "acc_bytes_stderr,none"}
    assert doc["higher_is_better"]["verb_tense"] == {"acc_bytes": True}


def test_one_scheme_document_uses_plain_task_names_and_names_the_scheme_in_the_model():
    doc = lm_eval_results_for_scheme(a_run(), "int4-g64")
    assert list(doc["results"]) == ["quantlab_perplexity", "verb_tense"]
    assert doc["model_name"] == "minigpt-shakespeare@int4-g64"
    assert doc["config"]["model_args"] == {"pretrained": "minigpt-shakespeare", "scheme": "int4-g64"}
    with pytest.raises(KeyError, match="no scheme 'int8'.*defined: fp32, int4-g64"):
        lm_eval_results_for_scheme(a_run(), "int8")


def test_a_results_json_read_back_from_disk_gives_the_same_document(tmp_path):
    run = a_run()
    path = write_json(tmp_path / "results.json", run)
    assert lm_eval_results(json.loads(path.read_text())) == lm_eval_results(run)


def test_lm_evals_own_table_reader_can_read_the_document():
    # What lm_eval.utils.make_table does with a results document, without pytablewriter: every entry's
    # metric "m,f" with an "m_stderr,f" next to it, stderr a number or "N/A", versions and n-shot per task.
    doc = json.loads(json.dumps(lm_eval_results(a_run()), allow_nan=False))
    rows = []
    for key, entry in doc["results"].items():
        entry = dict(entry)
        name = entry.pop("alias")
        for metric_filter, value in sorted(entry.items()):
            metric, _, filt = metric_filter.partition(",")
            if metric.endswith("_stderr"):
                continue
            stderr = entry[f"{metric}_stderr,{filt}"]
            rows.append([name, doc["versions"].get(key, "N/A"), filt, str(doc["n-shot"][key]), metric,
                         "%.4f" % value, "N/A" if stderr == "N/A" else "%.4f" % stderr])
    assert ["verb_tense@int4-g64", "0.9.0", "none", "0", "acc", "0.8000", "0.0163"] in rows
    assert len(rows) == 4
