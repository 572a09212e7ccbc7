"""Reading the JSON and YAML a user can hand a command, with their size, nesting and (YAML)
aliases bounded (`diffusevae.limits`), so that a hostile file is refused in one line instead of
exhausting memory or the stack.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from ..errors import ConfigError
from ..limits import MAX_NESTING, MAX_TEXT_BYTES, MAX_YAML_VALUES

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def too_big(size: int, where: str, error: type[Exception]) -> None:
    if size > MAX_TEXT_BYTES:
        raise error(f"{where} holds {size} bytes, more than the {MAX_TEXT_BYTES} a file read "
                    "here may hold; it is not a file diffusevae wrote or reads")


def _too_deep(depth: int, where: str, error: type[Exception]) -> None:
    if depth > MAX_NESTING:
        raise error(f"{where} nests lists or mappings more than {MAX_NESTING} levels deep; it "
                    "is not a file diffusevae wrote or reads")


def parse_json(text: str | bytes, where: str, error: type[Exception] = ConfigError) -> Any:
    """`text` as JSON, refused (`error`, naming `where`) past MAX_TEXT_BYTES or MAX_NESTING
    levels: the nesting is counted before parsing, which recurses once per level."""
    too_big(len(text), where, error)
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise error(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    brackets = re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text))
    _too_deep(max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0),
              where, error)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{where} is not valid JSON ({str(exc)[:200]})") from None


def _yaml_children(node: Any) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_yaml_graph(root: Any, where: str) -> None:
    """Refuse a YAML document whose values, aliases expanded, pass MAX_YAML_VALUES (an alias
    bomb: a few lines that expand to billions of values), that nests past MAX_NESTING, or that
    holds itself. Walks the graph of nodes once, without expanding it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key, children = id(node), _yaml_children(node)
        if finished:
            on_path.discard(key)
            size[key] = min(MAX_YAML_VALUES + 1, 1 + sum(size[id(c)] for c in children))
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{where}: an alias refers to a value that holds it; a config "
                              "cannot contain itself")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    _too_deep(depth[id(root)] - 1, where, ConfigError)
    if size[id(root)] > MAX_YAML_VALUES:
        raise ConfigError(f"{where} holds more than {MAX_YAML_VALUES} values once its aliases "
                          "(*name) are expanded; write the values out instead")


def _check_yaml_nesting(text: str, where: str) -> None:
    """Count the levels in the parser's events (a loop) before the composer (which recurses
    once per level) builds them."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            _too_deep(depth, where, ConfigError)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml(text: str, where: str) -> Any:
    """`text` as YAML (safe: plain values only), refused with a ConfigError naming `where` past
    MAX_TEXT_BYTES, MAX_NESTING levels or MAX_YAML_VALUES values (aliases expanded)."""
    import yaml

    too_big(len(text), where, ConfigError)
    try:
        _check_yaml_nesting(text, where)
        loader = yaml.SafeLoader(text)  # its reader refuses unprintable characters already
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_yaml_graph(node, where)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML's own message spans several lines
        why = (f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}" if mark
               else str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ConfigError(f"cannot parse {where}: {why}") from None
