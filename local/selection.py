"""API Gateway's route selection, as the emulator applies it to every inbound frame.

A WebSocket API's `RouteSelectionExpression` is evaluated against the JSON body
of each data frame, never on connect or disconnect. Two forms exist, and may be
mixed with static text: `$request.body.action` (the whole expression is one
variable) and `${request.body.service}/${request.body.action}`. A `\\$` is a
literal dollar sign. The result must match a route key exactly (case-sensitive);
otherwise the frame goes to `$default` if the API has one. A path that is not in
the body resolves to "", a frame that is not a JSON object goes to `$default`,
and no frame is ever routed to `$connect` or `$disconnect`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# One step of a JSONPath below `request.body`: `.name`, `['name']`, `["name"]` or `[3]`.
_STEP = re.compile(r"""\.([^.\[\]]+)|\[(\d+)\]|\['([^']*)'\]|\["([^"]*)"\]""")
# A bare variable ends where the characters a JSONPath can hold end.
_BARE_VARIABLE = re.compile(r"""\$request\.body((?:\.[A-Za-z0-9_-]+|\[\d+\]|\['[^']*'\])+)""")
_BRACED_VARIABLE = re.compile(r"\$\{request\.body((?:[^{}])+)\}")
_NOT_FOUND = object()
_LIFECYCLE_ROUTES = frozenset({"$connect", "$disconnect"})

Path = tuple[str | int, ...]
Part = str | Path  # static text, or the path of a body variable


class ExpressionError(ValueError):
    """The template's RouteSelectionExpression is not one API Gateway accepts."""


def parse_path(text: str) -> Path:
    """`.service.items[0]` -> ("service", "items", 0)."""
    steps: list[str | int] = []
    position = 0
    for match in _STEP.finditer(text):
        if match.start() != position:
            break
        name, index, single_quoted, double_quoted = match.groups()
        if index is not None:
            steps.append(int(index))
        else:
            steps.append(next(p for p in (name, single_quoted, double_quoted) if p is not None))
        position = match.end()
    if position != len(text) or not steps:
        raise ExpressionError(f"unsupported JSONPath after request.body: {text!r}")
    return tuple(steps)


def parse_expression(expression: str) -> list[Part]:
    """Split an expression into static text and body-variable paths."""
    parts: list[Part] = []
    text = ""
    position = 0
    while position < len(expression):
        if expression.startswith("\\$", position):
            text += "$"
            position += 2
            continue
        match = _BRACED_VARIABLE.match(expression, position) or _BARE_VARIABLE.match(
            expression, position
        )
        if match:
            if text:
                parts.append(text)
                text = ""
            parts.append(parse_path(match.group(1)))
            position = match.end()
            continue
        if expression[position] == "$":
            raise ExpressionError(
                f"RouteSelectionExpression {expression!r}: only $request.body.<path> and "
                "${request.body.<path>} variables are supported (escape a literal $ as \\$)"
            )
        text += expression[position]
        position += 1
    if text:
        parts.append(text)
    if not any(isinstance(part, tuple) for part in parts):
        raise ExpressionError(
            f"RouteSelectionExpression {expression!r} has no $request.body variable"
        )
    return parts


def _lookup(document: Any, path: Path) -> Any:
    for step in path:
        in_list = isinstance(step, int) and isinstance(document, list) and step < len(document)
        in_object = isinstance(step, str) and isinstance(document, dict) and step in document
        if not (in_list or in_object):
            return _NOT_FOUND
        document = document[step]
    return document


def as_route_text(value: Any) -> str:
    """How a selected value reads as route key text: strings as they are, a missing
    path as "", arrays as `[item1, item2]`, numbers and booleans in JSON form."""
    if value is _NOT_FOUND or value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + ", ".join(as_route_text(item) for item in value) + "]"
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class RouteSelector:
    """Picks the route for a frame's text, or None when nothing matches and the API
    has no `$default` (API Gateway then answers with a `Forbidden` error frame)."""

    parts: tuple[Part, ...]
    routes: frozenset[str]

    @classmethod
    def build(cls, expression: str, routes: Iterable[str]) -> RouteSelector:
        return cls(tuple(parse_expression(expression)), frozenset(routes))

    def evaluate(self, body: str) -> str | None:
        """The expression's value for this frame; None when the frame is not a JSON object."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
            return None
        if not isinstance(document, dict):
            return None
        return "".join(
            part if isinstance(part, str) else as_route_text(_lookup(document, part))
            for part in self.parts
        )

    def select(self, body: str) -> str | None:
        key = self.evaluate(body)
        if key is not None and key in self.routes and key not in _LIFECYCLE_ROUTES:
            return key
        return "$default" if "$default" in self.routes else None
