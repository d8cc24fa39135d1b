"""YAML with line marks, and the located errors every part of spec validation raises.

A spec is read with ``yaml.SafeLoader`` semantics (no Python objects, no code) by a loader that keeps
each mapping's and list's line numbers, so any mistake found later (an unknown key, a wrong type, a
threshold that is not a number) is reported as ``file:line: message`` with the fix. YAML aliases are
counted before anything is built: a document that would expand to more than ``MAX_NODES`` values (a
"billion laughs") or that contains itself is refused, never expanded.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
import typing
from dataclasses import fields
from typing import Any, Optional

import yaml

class SpecError(ValueError):
    """A spec the user must fix. ``str()`` is a single line naming the file and line."""

    def __init__(self, message: str, source: str = "<spec>", line: Optional[int] = None):
        self.source, self.line, self.message = source, line, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


class Located(dict):
    """A YAML mapping that remembers the line of itself and of each key (1-based)."""

    line: Optional[int] = None
    key_lines: dict

    def line_of(self, key) -> Optional[int]:
        return self.key_lines.get(key, self.line)


class LocatedList(list):
    line: Optional[int] = None
    item_lines: list


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps node marks, so errors can point at the offending line."""


def _construct_mapping(loader, node):
    loader.flatten_mapping(node)
    mapping = Located()
    mapping.line, mapping.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            raise SpecError(f"mapping keys must be plain scalars, got {type(key).__name__}",
                            loader.name, key_node.start_mark.line + 1)
        if key in mapping:
            raise SpecError(f"duplicate key {key!r}; remove one of them", loader.name, key_node.start_mark.line + 1)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = key_node.start_mark.line + 1
    return mapping


def _construct_sequence(loader, node):
    seq = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    seq.line, seq.item_lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
    return seq


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


MAX_NODES = 10_000   # YAML values a spec may expand to, aliases included (the catalogue's largest: ~300)


def _check_expansion(root, source: str) -> None:
    """Refuse a node graph that aliases make huge or cyclic, in time linear in the nodes written."""
    sizes: dict = {}
    visiting: set = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if children_done:
            visiting.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_NODES:
                raise SpecError(f"this value expands to more than {MAX_NODES} values through YAML aliases (*name); "
                                "write the values out instead of nesting aliases", source, node.start_mark.line + 1)
            continue
        if id(node) in visiting:
            raise SpecError("a YAML alias (*name) refers to a value that contains it; write the value out",
                            source, node.start_mark.line + 1)
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def read_yaml(text: str, source: str) -> Any:
    loader = _LineLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(f"invalid YAML: {e.problem or e.context}; check indentation and quoting", source, line) from None
    except yaml.YAMLError as e:
        raise SpecError(f"invalid YAML: {e}", source) from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------
# Validation helpers


class Ctx:
    """Where we are in the spec: file, and the mapping whose keys are being checked."""

    def __init__(self, source: str, mapping: Optional[dict] = None, path: str = "the spec"):
        self.source, self.mapping, self.path = source, mapping, path

    def line(self, key=None):
        m = self.mapping
        if isinstance(m, Located):
            return m.line_of(key) if key is not None else m.line
        return None

    def error(self, message: str, key=None) -> SpecError:
        return SpecError(message, self.source, self.line(key))


def check_keys(mapping: dict, allowed, ctx: Ctx, what: str):
    if not isinstance(mapping, dict):
        raise ctx.error(f"{what} must be a mapping (key: value lines), got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(sorted(allowed))}"
            raise SpecError(f"unknown key {key!r} in {what}; {hint}", ctx.source,
                            mapping.line_of(key) if isinstance(mapping, Located) else None)


def get_value(mapping: dict, key, types, default, ctx: Ctx, what: str, check=None, fix: str = ""):
    if key not in mapping or mapping[key] is None and default is not None:
        return copy.deepcopy(default)
    value = mapping[key]
    line = mapping.line_of(key) if isinstance(mapping, Located) else None
    if types is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if types is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in as_tuple(types))):
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in as_tuple(types))
        raise SpecError(f"{what}.{key} must be {names}, got {value!r}{'; ' + fix if fix else ''}", ctx.source, line)
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{what}.{key} must be a finite number, got {value!r}{'; ' + fix if fix else ''}", ctx.source, line)
    if check is not None and not check(value):
        raise SpecError(f"{what}.{key} = {value!r} is invalid; {fix}", ctx.source, line)
    return value


def number(value, ctx: Ctx, key, what: str) -> float:
    """A finite number read from ``ctx.mapping[key]`` (a threshold, times, plus): never a bool, a
    string, .nan or .inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ctx.error(f"{what} must be a finite number, got {value!r}; write e.g. 0.15", key)
    return float(value)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a mapping"}


def as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def field_types(cls) -> dict:
    """{field: (the Python type a YAML value must have, whether null is allowed)}, read from the
    dataclass annotations (``Optional[int]`` -> (int, True), ``list`` -> (list, False))."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) is typing.Union and len(args) == 1
        out[f.name] = (args[0] if optional else hint, optional)
    return out


def dataclass_from(cls, mapping, ctx: Ctx, what: str, exclude=(), **extra):
    """Build a validating dataclass from a YAML mapping, turning its ValueErrors into SpecErrors."""
    mapping = mapping if mapping is not None else Located()
    types = {k: t for k, t in field_types(cls).items() if k not in exclude and k not in extra}
    check_keys(mapping, set(types), ctx, what)
    kwargs = {}
    for key, (typ, optional) in types.items():
        if key in mapping:
            # null is a value only where the field is Optional (max_tokens: null = the whole split)
            kwargs[key] = None if optional and mapping[key] is None else get_value(mapping, key, typ, None, ctx, what)
    try:
        return cls(**extra, **kwargs)
    except ValueError as e:
        bad = next((k for k in kwargs if re.search(rf"\b{re.escape(str(k))}\b", str(e))), None)
        line = mapping.line_of(bad) if isinstance(mapping, Located) and bad else getattr(mapping, "line", None)
        raise SpecError(f"{e}", ctx.source, line) from None


# ---------------------------------------------------------------------------------------------


def locate(obj):
    """Plain dicts/lists (a spec given as a Python dict) -> Located containers without line numbers."""
    if isinstance(obj, dict) and not isinstance(obj, Located):
        located = Located({k: locate(v) for k, v in obj.items()})
        located.line, located.key_lines = None, {}
        return located
    if isinstance(obj, list) and not isinstance(obj, LocatedList):
        located = LocatedList(locate(v) for v in obj)
        located.line, located.item_lines = None, [None] * len(located)
        return located
    return obj


def plain(obj):
    """Located containers -> plain dicts/lists (for hashing and JSON)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj
