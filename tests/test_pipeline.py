"""The pipeline's guarantees: cache keys change exactly when an input that determines a result changes,
the protocol fingerprint is keyed on all it holds, one process computes a key, and Ctrl-C leaves whole
entries and one line.

Keys are computed without running anything (a key never needs the model's weights), so these tests
are fast; the one end-to-end run uses the committed MiniGPT on a few hundred tokens.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from quantlab import pipeline
from quantlab.cache import SchemeCache, data_checksum
from quantlab.pipeline import RunInterrupted, SpecRun, _cached_fingerprint
from quantlab.spec import parse_spec

BASE = {
    "model": "minigpt-shakespeare",
    "calibration": {"samples": 4, "seq_len": 32},
    "evaluation": {"seq_len": 32, "max_tokens": 256, "kl_divergence": True},
    "schemes": {"fp32": "fp32", "rtn": "int4-g64", "gptq": {"preset": "int4-g64", "method": "gptq"}},
}


def spec_of(**changes):
    data = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_spec(data, "<test>", name="test/pipeline")


def keys(spec, tmp_path):
    runner = SpecRun(spec, SchemeCache(tmp_path / "cache"))
    return {name: runner.cache_key(spec, cfg) for name, cfg in spec.schemes.items()}


# ---------------------------------------------------------------------------------------------
# Cache keys


def test_keys_are_stable_and_differ_between_schemes(tmp_path):
    first, again = keys(spec_of(), tmp_path), keys(spec_of(), tmp_path)
    assert first == again and len(set(first.values())) == 3


def test_calibration_changes_only_the_schemes_that_draw_calibration_data(tmp_path):
    before, after = keys(spec_of(), tmp_path), keys(spec_of(calibration__samples=8), tmp_path)
    assert before["gptq"] != after["gptq"]
    assert before["rtn"] == after["rtn"] and before["fp32"] == after["fp32"]


def test_every_scheme_key_holds_the_baselines_key_including_its_calibration(tmp_path):
    # A calibrated baseline: its result moves with the calibration, and so do every other scheme's KL
    # divergence and ppl_gap, which are measured against it.
    before = keys(spec_of(baseline="gptq"), tmp_path)
    after = keys(spec_of(baseline="gptq", calibration__samples=8), tmp_path)
    assert before["rtn"] != after["rtn"] and before["fp32"] != after["fp32"]


def test_a_sweep_point_keys_its_schemes_on_that_points_baseline(tmp_path):
    spec = spec_of(baseline="gptq")
    runner = SpecRun(spec, SchemeCache(tmp_path / "cache"))
    variant = spec.with_value("calibration.samples", 8)
    assert runner.cache_key(variant, spec.schemes["rtn"]) != runner.cache_key(spec, spec.schemes["rtn"])


def test_library_versions_are_part_of_every_key(tmp_path, monkeypatch):
    before = keys(spec_of(), tmp_path)
    monkeypatch.setattr(pipeline, "result_versions", lambda: {"torch": "9.9.9"})
    after = keys(spec_of(), tmp_path)
    assert all(before[name] != after[name] for name in before)


def test_the_torch_thread_count_is_part_of_every_key(tmp_path):
    # Float32 reductions split differently over threads: GPTQ codes (and so perplexities) move with the
    # thread count, so a cache filled on one count must not answer for another.
    from quantlab.testing import torch_threads

    with torch_threads(1):
        one = keys(spec_of(), tmp_path)
    with torch_threads(2):
        two = keys(spec_of(), tmp_path)
    assert all(one[name] != two[name] for name in one)


def test_a_user_corpus_keys_on_the_content_of_exactly_the_files_read(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("to be or not to be")
    dataset = f"text:{folder}"
    first = data_checksum(dataset)
    (folder / "notes.md").write_text("not read: only *.txt files are")
    assert data_checksum(dataset) == first
    (folder / "a.txt").rename(folder / "b.txt")     # same bytes, another name: another order of files
    assert data_checksum(dataset) != first
    (folder / "b.txt").write_text("that is the question")
    assert data_checksum(dataset) != first


def test_a_jsonl_path_with_a_hash_in_a_folder_name_is_read_and_keyed_by_the_same_file(tmp_path):
    folder = tmp_path / "run#1"
    folder.mkdir()
    path = folder / "data.jsonl"
    path.write_text('{"text": "alpha"}\n')
    dataset = f"jsonl:{path}#text"
    first = data_checksum(dataset)
    path.write_text('{"text": "beta"}\n')
    assert data_checksum(dataset) != first


def test_a_results_entry_records_the_versions_that_computed_it():
    from quantlab.results import SchemeResult

    entry = SchemeResult(versions=pipeline.result_versions()).to_json()
    assert entry["versions"]["torch"] and "numpy" in entry["versions"]


# ---------------------------------------------------------------------------------------------
# The protocol fingerprint


def fingerprints(specs, tmp_path, monkeypatch):
    """The cached fingerprint each spec gets, when computing one records what it was computed from."""
    computed = []

    def fake_fingerprint(self, spec):
        computed.append(spec.name)
        return {"baseline": spec.baseline, "keep": list(spec.keep), "dataset": spec.evaluation.dataset}

    monkeypatch.setattr(SpecRun, "fingerprint", fake_fingerprint)
    cache = SchemeCache(tmp_path / "cache")
    return [_cached_fingerprint(SpecRun(spec, cache), spec) for spec in specs], computed


def test_fingerprints_of_specs_that_differ_in_baseline_or_keep_are_not_shared(tmp_path, monkeypatch):
    got, _ = fingerprints([spec_of(), spec_of(baseline="rtn"), spec_of(keep=["embeddings"])], tmp_path, monkeypatch)
    assert [g["baseline"] for g in got] == ["fp32", "rtn", "fp32"]
    assert got[2]["keep"] == ["embeddings"]


def test_a_changed_corpus_gets_a_fresh_fingerprint(tmp_path, monkeypatch):
    corpus = tmp_path / "eval.txt"
    corpus.write_text("first version")
    spec = spec_of(evaluation__dataset=f"text:{corpus}")
    _, computed = fingerprints([spec, spec], tmp_path, monkeypatch)
    assert len(computed) == 1                      # the second is cached
    corpus.write_text("second version")
    _, computed = fingerprints([spec], tmp_path, monkeypatch)
    assert len(computed) == 1                      # recomputed, not the stale entry


# ---------------------------------------------------------------------------------------------
# Locking and interrupts


LOCKED_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from quantlab.cache import SchemeCache

    cache_dir, log = Path(sys.argv[1]), Path(sys.argv[2])

    def compute():
        with open(log, "a") as f:
            f.write("computed\\n")
        time.sleep(1.0)          # long enough for the other process to arrive and wait
        return {"value": 42}

    value, cached = SchemeCache(cache_dir).get_or_compute("k", compute)
    print(value["value"], cached)
""")


def test_two_processes_on_one_cache_compute_a_key_once(tmp_path):
    log = tmp_path / "computations.log"
    procs = [subprocess.Popen([sys.executable, "-c", LOCKED_WORKER, str(tmp_path / "cache"), str(log)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=60)[0].split() for p in procs)
    assert log.read_text().splitlines() == ["computed"]
    assert outputs == [["42", "False"], ["42", "True"]]


def test_ctrl_c_in_a_run_leaves_whole_entries_and_says_a_rerun_resumes(tmp_path, monkeypatch):
    calls = []

    def compute(self, spec, name):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        from quantlab.results import SchemeResult
        return SchemeResult(ppl=10.0)

    monkeypatch.setattr(SpecRun, "_compute", compute)
    with pytest.raises(RunInterrupted) as info:
        pipeline.run(spec_of(), cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message and "1 new result(s) stored" in message and "a rerun resumes" in message
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
    assert len(entries) == 1 and json.loads((tmp_path / "cache" / entries[0]).read_text())["ppl"] == 10.0


def test_without_the_hf_extra_servability_is_left_unsaid_not_a_crash(monkeypatch, tmp_path, make_minigpt):
    # `pip install quantlab` has no transformers: the engine must still run every scheme.
    monkeypatch.setitem(sys.modules, "transformers", None)
    spec = spec_of()
    runner = SpecRun(spec, SchemeCache(tmp_path / "cache"))
    runner.__dict__["model"] = make_minigpt(block_size=32)
    assert runner.servable("rtn", spec.schemes["rtn"]) is None
    assert runner.servable("fp32", spec.schemes["fp32"]) is None
