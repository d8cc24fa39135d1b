"""What a spec names outside itself, checked when it is loaded: the model and its context length, the
datasets and tasks, and the spec's name as a folder under golden/ and the output folder.

Nothing here loads weights, reads a corpus or downloads anything: a model's context length comes from
its config files (``quantlab.models.registry.context_length``), a dataset or task from its name and
whether the file it names exists (``quantlab.data.dataset_problem`` / ``task_problem``). Relative paths
are relative to the directory quantlab runs in, as when the spec runs. Split from ``schema.py``, which
calls these while it builds a Spec; each raises a located one-line SpecError.
"""
from __future__ import annotations

from typing import Optional

from quantlab.spec.located import Ctx


def model_context(model: str, ctx: Ctx) -> Optional[int]:
    """Check the model name (built-in or an existing ``hf:PATH``) and return its context length in tokens
    (None: the model's config states none, so any length is read)."""
    from quantlab.models.registry import context_length

    try:
        return context_length(model)
    except (ValueError, OSError) as e:
        raise ctx.error(f"{e}".replace("\n", " "), "model") from None


def check_seq_len(value: int, context: Optional[int], model: str, what: str, ctx: Ctx, key) -> None:
    if context is not None and value > context:
        raise ctx.error(f"{what} = {value} is longer than {model}'s context of {context} tokens; "
                        f"use a seq_len of at most {context}", key)


def check_dataset(dataset: str, ctx: Ctx, key: str, what: str) -> None:
    from quantlab.data import dataset_problem

    problem = dataset_problem(dataset)
    if problem:
        raise ctx.error(f"{what}: {problem}", key)


def check_tasks(tasks: list, ctx: Ctx) -> None:
    from quantlab.data import task_problem

    seen = set()
    for task in tasks:
        problem = task_problem(task)
        if problem:
            raise ctx.error(f"evaluation.tasks: {problem}", "tasks")
        if task in seen:
            raise ctx.error(f"evaluation.tasks lists {task!r} twice; list each task once", "tasks")
        seen.add(task)


def check_name(name: str, ctx: Ctx) -> None:
    """A spec's name becomes golden/<name>/ and <out>/<name>/: it must stay inside both."""
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise ctx.error(f"name {name!r} must be a relative path without '.', '..' or empty parts, since golden files "
                        f"go to golden/<name>/ and results to <out>/<name>/; write e.g. minigpt/pareto", "name")
