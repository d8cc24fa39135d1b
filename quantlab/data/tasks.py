"""Multiple-choice tasks: items scored by comparing a causal LM's log-likelihood of each candidate."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BLANK = "__"


@dataclass
class MCItem:
    """One multiple-choice item. ``context`` may hold one blank "__" where the choice goes
    ("Yesterday he __ to the store."); without a blank the choice is appended to the context."""
    context: str
    choices: list[str]
    answer: int

    def __post_init__(self):
        if not isinstance(self.context, str):
            raise TypeError(f"MCItem.context must be a string, got {type(self.context).__name__}")
        if self.context.count(BLANK) > 1:
            raise ValueError(f"MCItem.context {self.context!r} has {self.context.count(BLANK)} blanks "
                             f"{BLANK!r}; use at most one")
        if not isinstance(self.choices, list) or not all(isinstance(c, str) for c in self.choices):
            raise TypeError(f"MCItem.choices must be a list of strings, got {self.choices!r}")
        if len(self.choices) < 2:
            raise ValueError(f"MCItem needs at least 2 choices to be a multiple-choice item, got {self.choices!r}")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"MCItem.choices {self.choices!r} repeat a candidate; make them distinct")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) \
                or not 0 <= self.answer < len(self.choices):
            raise ValueError(f"MCItem.answer must be an index into choices (0..{len(self.choices) - 1}), "
                             f"got {self.answer!r}")

    def completions(self) -> list[tuple[str, str]]:
        """(prefix, continuation) per choice. Every choice shares the prefix, and the continuation runs
        to the end of the sentence, so summing the continuation's log-likelihood compares whole
        sentences: words after the blank ("... walked home yesterday") still count."""
        if BLANK in self.context:
            prefix, suffix = self.context.split(BLANK)
            return [(prefix, choice + suffix) for choice in self.choices]
        return [(self.context, choice) for choice in self.choices]


def load_jsonl_task(path: str | Path) -> list[MCItem]:
    """Items from a JSON-lines file of {"context": ..., "choices": [...], "answer": index}; blank
    lines are skipped. Errors name the file and line so the data can be fixed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist; give the path of a .jsonl file with "
                                'one {"context", "choices", "answer"} object per line')
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with context, choices, answer")
            missing = [k for k in ("context", "choices", "answer") if k not in record]
            if missing:
                raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; each line needs "
                                 "context, choices and answer")
            try:
                items.append(MCItem(record["context"], record["choices"], record["answer"]))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}: {err}") from None
    if not items:
        raise ValueError(f"{path} holds no task items; add one JSON object per line")
    return items
