"""Translate a run's results (the results.json mapping) into lm-evaluation-harness's results document.

The shape is the one lm-eval's ``simple_evaluate`` returns and ``EvaluationTracker.save_results_aggregated``
writes as ``results_<date>.json`` (read from EleutherAI/lm-evaluation-harness: ``lm_eval/evaluator_utils.py``
``consolidate_results`` and ``TaskOutput.calculate_aggregate_metric``, ``lm_eval/utils.py`` ``make_table``,
and a results file written by lm-eval 0.4.9):

    {"results":          {task: {"alias": str, "<metric>,<filter>": value, "<metric>_stderr,<filter>": value|"N/A"}},
     "group_subtasks":   {task: []},
     "configs":          {task: {"task", "output_type", "num_fewshot", "metric_list", "metadata", ...}},
     "versions":         {task: version},
     "n-shot":           {task: 0},
     "higher_is_better": {task: {metric: bool}},
     "n-samples":        {task: {"original": n, "effective": n}},
     "config":           {"model", "model_args", ...},
     "model_name", "date", ...}

One document, schemes as task suffixes. lm-eval writes one model per document, and quantlab has one per
scheme. A mapping scheme -> document would hold valid documents but is itself none: every reader of lm-eval
files (``make_table``, leaderboard parsers, scripts reading ``doc["results"][task]["acc,none"]``) would
fail on it. So ``results_lm_eval.json`` is one valid document whose tasks are named ``<task>@<scheme>``
(``verb_tense@int4-g64``), each with its scheme in ``alias`` and ``configs[task]["metadata"]``: any such
reader shows one row per (task, scheme). ``lm_eval_results_for_scheme`` gives one scheme's document under
plain task names, for tools that want one model per file (one directory per model).

What is and is not lm-eval's metric:
- a task's accuracy is lm-eval's ``acc`` (argmax of the summed log-likelihood of each choice), or
  ``acc_bytes`` when the run divided by each choice's UTF-8 bytes (``evaluation.length_normalize``);
  its stderr is recomputed as lm-eval computes it for a mean, the sample standard deviation over
  sqrt(n): sqrt(acc (1 - acc) / (n - 1)), not quantlab's sqrt(acc (1 - acc) / n); "N/A" for n < 2.
- perplexity stays quantlab's, as ``quantlab_token_perplexity`` in a ``quantlab_perplexity`` task: it is
  exp(mean NLL per scored *token*) over non-overlapping fixed-length windows of one token stream, while
  lm-eval's ``word_perplexity``/``byte_perplexity``/``bits_per_byte`` come from ``loglikelihood_rolling``
  over whole documents, normalised per whitespace word or per UTF-8 byte. The numbers are not comparable,
  so they never carry lm-eval's names.
Metrics that were not computed (null in results.json) are left out: lm-eval never writes a null value,
and ``make_table`` would fail on one.
"""
from __future__ import annotations

import math
from datetime import datetime
from typing import Optional

from quantlab.results import jsonable

FILTER = "none"                        # lm-eval's filter key for unfiltered metrics: "acc,none"
SEPARATOR = "@"                        # verb_tense@int4-g64
PERPLEXITY_TASK = "quantlab_perplexity"
PERPLEXITY_METRIC = "quantlab_token_perplexity"


def lm_eval_results(results) -> dict:
    """The whole run as one lm-eval results document, tasks named ``<task>@<scheme>`` in spec order."""
    documents = {scheme: lm_eval_results_for_scheme(results, scheme) for scheme in _schemes(results)}
    out = _skeleton(results)
    for scheme, document in documents.items():
        for task in document["results"]:
            key = f"{task}{SEPARATOR}{scheme}"
            out["results"][key] = {**document["results"][task], "alias": key}
            out["configs"][key] = {**document["configs"][task], "task": key}
            for section in ("group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples"):
                if task in document[section]:
                    out[section][key] = document[section][task]
    out["quantlab"]["schemes"] = {scheme: [f"{task}{SEPARATOR}{scheme}" for task in document["results"]]
                                  for scheme, document in documents.items()}
    return out


def lm_eval_results_for_scheme(results, scheme: str) -> dict:
    """One scheme's lm-eval results document, tasks under their own names (``verb_tense``)."""
    entries = results.get("results") or {}
    if scheme not in entries:
        raise KeyError(f"no scheme {scheme!r} in these results; defined: {', '.join(entries) or 'none'}")
    entry = entries[scheme]
    fingerprint = results.get("fingerprint") or {}
    version = fingerprint.get("quantlab_version") or (results.get("versions") or {}).get("quantlab") or "N/A"
    metadata = {"quantlab_scheme": scheme, "quantlab_spec": results.get("spec"),
                "quantlab_scheme_config": (results.get("schemes") or {}).get(scheme)}
    out = _skeleton(results, scheme)
    out["quantlab"]["schemes"] = {scheme: []}

    def add(task, metric, aggregation, higher_is_better, value, stderr, n, config):
        out["results"][task] = {"alias": task, f"{metric},{FILTER}": value, f"{metric}_stderr,{FILTER}": stderr}
        out["group_subtasks"][task] = []
        out["configs"][task] = {"task": task, "num_fewshot": 0, "metadata": {**metadata, "version": version},
                                "metric_list": [{"metric": metric, "aggregation": aggregation,
                                                 "higher_is_better": higher_is_better}],
                                **config}
        out["versions"][task] = version
        out["n-shot"][task] = 0
        out["higher_is_better"][task] = {metric: higher_is_better}
        if n is not None:
            out["n-samples"][task] = {"original": n, "effective": n}
        out["quantlab"]["schemes"][scheme].append(task)

    ppl = _number(entry.get("ppl"))
    if ppl is not None:
        stderr = _number(entry.get("ppl_stderr"))
        add(PERPLEXITY_TASK, PERPLEXITY_METRIC, "exp_mean_token_nll", False, ppl,
            stderr if stderr is not None else "N/A", _number(fingerprint.get("windows")),
            {"output_type": "quantlab_token_perplexity",
             "description": "exp(mean NLL per scored token) over non-overlapping windows; n-samples counts "
                            "windows. Not lm-eval's loglikelihood_rolling word/byte perplexity.",
             "dataset_path": fingerprint.get("dataset"), "test_split": fingerprint.get("split"),
             "seq_len": fingerprint.get("seq_len"), "eval_tokens": _number(entry.get("eval_tokens"))})

    metric = "acc_bytes" if _length_normalised(fingerprint) else "acc"
    for task, result in sorted((entry.get("tasks") or {}).items()):
        acc, n = _number(result.get("acc")), _number(result.get("n"))
        if acc is None:
            continue
        add(task, metric, "mean", True, acc, _lm_eval_mean_stderr(acc, n), n,
            {"output_type": "multiple_choice", "dataset_path": task,
             "description": fingerprint.get("task_scoring") or ""})
    return out


def _skeleton(results, scheme: Optional[str] = None) -> dict:
    model = (results.get("model") or {}).get("name") or (results.get("fingerprint") or {}).get("model") or ""
    name = f"{model}{SEPARATOR}{scheme}" if scheme else model
    out = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
           "higher_is_better": {}, "n-samples": {},
           "config": {"model": "quantlab",
                      "model_args": {"pretrained": model, **({"scheme": scheme} if scheme else {})},
                      "batch_size": None, "limit": None, "random_seed": results.get("seed")},
           "model_name": name, "model_source": "quantlab",
           # quantlab's own provenance, under its own key (lm-eval readers ignore keys they do not know)
           "quantlab": {"spec": results.get("spec"), "spec_sha256": results.get("spec_sha256"),
                        "baseline": results.get("baseline"), "schemes": {}}}
    date = _epoch(results.get("timestamp"))
    if date is not None:
        out["date"] = date   # lm-eval writes a Unix time
    return jsonable(out)


def _schemes(results) -> list:
    # results.json keeps spec order; fall back to the results' own order
    entries = results.get("results") or {}
    order = [s for s in (results.get("schemes") or {}) if s in entries]
    return order + [s for s in entries if s not in order]


def _lm_eval_mean_stderr(acc: float, n) -> object:
    """lm-eval's stderr of a mean of 0/1 items: sample stddev / sqrt(n) = sqrt(acc (1 - acc) / (n - 1))."""
    if n is None or n < 2:
        return "N/A"
    return math.sqrt(acc * (1.0 - acc) / (n - 1))


def _length_normalised(fingerprint: dict) -> bool:
    # The run records its task scoring only as this sentence (quantlab.evaluate.EvalPlan.fingerprint).
    return "UTF-8 bytes" in str(fingerprint.get("task_scoring") or "")


def _number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return x if math.isfinite(x) else None


def _epoch(timestamp) -> Optional[float]:
    if not isinstance(timestamp, str):
        return None
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return None
