"""Calibration-data selection (issue 14 items 8-10): text:GLOB and random corpora, the sweep over
calibration.dataset, the best-corpus check, duplicate calibration windows as a health event, and the plot."""
import pytest
import torch

from quantlab.data import (calibration_health, calibration_windows, corpus_tokens, dataset_files, dataset_problem,
                           duplicate_windows, list_datasets, load_text, random_corpus)
from quantlab.data.random_corpus import RANDOM_CORPUS_TOKENS
from quantlab.results import HealthEvent, HealthEventName
from quantlab.spec import SpecError, check, parse_spec


# --- text:GLOB ----------------------------------------------------------------------------------
def make_tree(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "b.py").write_text("b = 2\n")
    (root / "a.py").write_text("a = 1\n")
    (root / "pkg" / "c.py").write_text("c = 3\n")
    (root / "pkg" / "sub" / "d.py").write_text("d = 4\n")
    (root / "notes.txt").write_text("not code\n")


def test_glob_matches_recursively_and_reads_files_in_sorted_path_order(tmp_path):
    make_tree(tmp_path)
    dataset = f"text:{tmp_path}/**/*.py"
    assert [p.relative_to(tmp_path).as_posix() for p in dataset_files(dataset)] == [
        "a.py", "b.py", "pkg/c.py", "pkg/sub/d.py"]
    assert load_text(dataset) == "a = 1\n\n\nb = 2\n\n\nc = 3\n\n\nd = 4\n"
    assert dataset_problem(dataset) is None


def test_glob_without_double_star_stays_in_one_folder(tmp_path):
    make_tree(tmp_path)
    assert [p.name for p in dataset_files(f"text:{tmp_path}/*.py")] == ["a.py", "b.py"]


def test_glob_that_matches_nothing_is_one_line_saying_so(tmp_path):
    dataset = f"text:{tmp_path}/**/*.rs"
    problem = dataset_problem(dataset)
    assert "matches no file" in problem and "\n" not in problem
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_text(dataset)


def test_glob_corpus_replaces_bytes_that_are_not_utf8(tmp_path):
    (tmp_path / "latin1.py").write_bytes(b"# caf\xe9\n")
    assert load_text(f"text:{tmp_path}/*.py") == "# caf\ufffd\n"


def test_python_standard_library_is_a_code_corpus():
    # The catalogue specs calibrate on it: it must exist where quantlab runs.
    assert dataset_problem("text:/usr/lib/python3*/*.py") is None
    assert "def " in load_text("text:/usr/lib/python3*/*.py")[:100000]


# --- random -------------------------------------------------------------------------------------
class ByteModel:
    """The slice of a LanguageModel that corpus_tokens reads."""
    vocab_size = 256

    def encode(self, text):
        return torch.tensor(list(text.encode()), dtype=torch.long)


def test_random_corpus_is_uniform_seeded_ids_within_the_vocabulary():
    tokens = corpus_tokens(ByteModel(), "random", "train")
    assert tokens.dtype == torch.long and tokens.shape == (RANDOM_CORPUS_TOKENS,)
    assert int(tokens.min()) == 0 and int(tokens.max()) == 255
    assert torch.equal(tokens, random_corpus(256, "train"))                      # the same on every call
    assert not torch.equal(tokens, random_corpus(256, "validation"))             # splits differ
    counts = torch.bincount(tokens, minlength=256).float()
    assert float(counts.std() / counts.mean()) < 0.05                            # flat: ~4096 per id


def test_text_corpora_go_through_the_models_encoder(tmp_path):
    (tmp_path / "t.txt").write_text("hi")
    assert corpus_tokens(ByteModel(), f"text:{tmp_path / 't.txt'}").tolist() == [104, 105]


def test_random_is_listed_and_not_text():
    assert "random" in list_datasets() and "text:GLOB" in list_datasets()
    assert dataset_problem("random") is None
    with pytest.raises(ValueError, match="token ids, not text"):
        load_text("random")


# --- duplicate windows --------------------------------------------------------------------------
def test_duplicates_are_windows_that_repeat_an_earlier_one():
    windows = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [5, 6]])
    assert duplicate_windows(windows) == 2
    assert duplicate_windows(windows[:2]) == 0


def test_a_corpus_barely_longer_than_a_window_raises_the_duplicate_event():
    # 20 tokens and windows of 16: 5 possible starts for 32 samples.
    windows = calibration_windows(torch.arange(20), n_samples=32, seq_len=16, seed=0)
    (event,) = calibration_health(windows)
    assert event["event"] == "duplicate_calibration_windows" and event["layer"] is None
    assert "of 32 calibration windows" in event["detail"] and "(5 distinct)" in event["detail"]
    assert HealthEvent(**event).event is HealthEventName.DUPLICATE_CALIBRATION_WINDOWS


def test_a_long_corpus_raises_no_event():
    windows = calibration_windows(torch.arange(100000), n_samples=128, seq_len=64, seed=0)
    assert calibration_health(windows) == [] and calibration_health(None) == []


def test_the_limit_is_ten_percent_of_the_windows():
    distinct = [[i, i] for i in range(18)]
    assert calibration_health(torch.tensor(distinct + [[0, 0]] * 2)) == []        # 2 of 20 repeat: 10%
    assert len(calibration_health(torch.tensor(distinct[:17] + [[0, 0]] * 3))) == 1   # 3 of 20: 15%


def test_the_pipeline_reports_duplicate_windows_of_a_short_calibration_corpus(tmp_path):
    import quantlab

    corpus = tmp_path / "short.txt"
    corpus.write_text("To be, or not to be: that is the question.")   # 43 bytes: 12 windows of 32
    spec = {"model": "minigpt-shakespeare", "calibration": {"dataset": f"text:{corpus}", "samples": 16, "seq_len": 32},
            "evaluation": {"max_tokens": 512, "seq_len": 256, "kl_divergence": False},
            "schemes": {"fp32": "fp32", "g": {"bits": 4, "group_size": 64, "method": "gptq"}}}
    run = quantlab.run(spec, use_cache=False)
    events = [e for e in run["health"] if e["event"] == "duplicate_calibration_windows"]
    assert [e["scheme"] for e in events] == ["g"]


# --- the sweep and the check --------------------------------------------------------------------
SCHEMES = {"fp32": "fp32", "r": "int4-g64", "g": {"preset": "int4-g64", "method": "gptq"}}
CORPORA = ["shakespeare", "text:/usr/lib/python3*/*.py", "verbs", "random"]


def spec_with(**overrides):
    return parse_spec({"model": "minigpt-shakespeare", "schemes": SCHEMES,
                       "sweep": {"calibration.dataset": CORPORA}, **overrides})


def test_calibration_dataset_is_sweepable_and_each_point_calibrates_on_its_corpus():
    spec = spec_with()
    assert spec.sweep == ("calibration.dataset", CORPORA)
    assert spec.with_value("calibration.dataset", "verbs").calibration.dataset == "verbs"


@pytest.mark.parametrize("sweep, message", [
    (["shakespeare", "shakspeare"], "unknown dataset 'shakspeare'; did you mean 'shakespeare'"),
    (["shakespeare", 4], "needs a list of at least two dataset names"),
    (["shakespeare", "shakespeare"], "lists a value twice"),
    (["shakespeare", "text:/no/such/**/*.py"], "matches no file"),
])
def test_bad_corpus_sweeps_are_refused_at_load(sweep, message):
    with pytest.raises(SpecError, match=message):
        spec_with(sweep={"calibration.dataset": sweep})


def test_random_is_refused_where_text_is_needed():
    with pytest.raises(SpecError, match="evaluation.dataset 'random' is token ids"):
        spec_with(evaluation={"dataset": "random"})
    with pytest.raises(SpecError, match="heldout_samples needs the calibration corpus's validation text"):
        spec_with(calibration={"heldout_samples": 4})


def sweep_results(values):
    return {"results": {}, "health": [], "sweeps": [{"key": "calibration.dataset", "values": CORPORA,
                                                     "results": [{"g": {"kld_mean": v}} for v in values]}]}


def test_best_holds_when_the_corpus_beats_every_other_by_the_margin():
    spec = spec_with(expect=[{"check": "best", "metric": "kld_mean", "scheme": "g", "at": "shakespeare", "by": 0.1}])
    (exp,) = spec.expect
    outcome = check(exp, sweep_results([0.010, 0.0115, 0.02, 0.03]), spec)
    assert outcome.passed and outcome.measured == pytest.approx(0.15)
    outcome = check(exp, sweep_results([0.010, 0.0105, 0.02, 0.03]), spec)
    assert not outcome.passed and "the closest, text:/usr/lib/python3*/*.py, is +5.0% worse" in outcome.message
    assert not check(exp, sweep_results([0.010, 0.009, 0.02, 0.03]), spec).passed    # another corpus is better


@pytest.mark.parametrize("item, message", [
    ({"check": "best", "metric": "kld_mean", "scheme": "g", "at": "shakspeare"}, "needs at: one of the sweep's values"),
    ({"check": "best", "metric": "kld_mean", "scheme": "r", "at": "verbs"}, "false by construction"),
    ({"check": "best", "metric": "kld_mean", "scheme": "g", "at": "verbs", "by": -0.1}, "relative margin >= 0"),
    ({"check": "monotone", "metric": "kld_mean", "scheme": "g"}, "use check: best"),
])
def test_best_and_monotone_refuse_what_cannot_be_measured(item, message):
    with pytest.raises(SpecError, match=message):
        spec_with(expect=[item])


# --- the plot -----------------------------------------------------------------------------------
def test_the_calibration_data_plot_is_drawn_from_a_dataset_sweep_only(tmp_path):
    from quantlab.report.plots import make_plots

    entry = {"ppl": 5.7, "ppl_gap_stderr": 0.001, "kld_mean": 0.01, "kld_stderr": 0.001}
    results = {"spec": "t", "baseline": "fp32",
               "schemes": {"fp32": {"method": "float"}, "r": {"method": "rtn", "scheme": "INT4"},
                           "g": {"method": "gptq", "scheme": "INT4"}},
               "results": {"fp32": {"ppl": 5.6}, "r": {"ppl": 5.8, "kld_mean": 0.02}, "g": entry},
               "sweeps": [{"key": "calibration.dataset", "values": CORPORA, "results": [{"g": entry}] * 4}]}
    written = make_plots(results, tmp_path, ["calibration_data"])
    assert written["calibration_data"].read_bytes().startswith(b"\x89PNG")
    results["sweeps"][0]["key"] = "seed"
    assert make_plots(results, tmp_path / "none", ["calibration_data"]) == {}


def test_the_health_check_fails_on_duplicate_windows_unless_allowed():
    detail = "30 of 32 calibration windows of 16 tokens repeat another (2 distinct)"
    results = {"results": {"g": {"layers": {}}}, "sweeps": [],
               "health": [{"scheme": "g", "layer": None, "event": "duplicate_calibration_windows", "detail": detail}]}
    strict, lenient = spec_with(expect=[{"check": "health", "scheme": "g"},
                                        {"check": "health", "scheme": "g", "allow_duplicate_windows": True}]).expect
    outcome = check(strict, results, spec_with())
    assert not outcome.passed and detail in outcome.message
    assert check(lenient, results, spec_with()).passed


def test_the_interpretation_names_the_best_and_worst_corpus():
    from quantlab.report.page import interpretation

    results = {"baseline": "fp32", "schemes": {"fp32": {"method": "float"}, "g": {"method": "gptq"}},
               "results": {"fp32": {"ppl": 5.6}, "g": {"ppl": 5.7}},
               "sweeps": [{"key": "calibration.dataset", "values": CORPORA,
                           "results": [{"g": {"ppl": p, "kld_mean": k}} for p, k in
                                       ((5.70, 0.004), (5.71, 0.0045), (5.72, 0.006), (5.75, 0.008))]}]}
    assert ("Calibration corpus, g: the lowest KL divergence comes from shakespeare (0.004), the highest from "
            "random (0.008, 2x); perplexity spans 5.7 to 5.75.") in interpretation(results)
