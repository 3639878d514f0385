"""Route selection as API Gateway evaluates it (local/selection.py)."""

from __future__ import annotations

import pytest

from local.selection import ExpressionError, RouteSelector, parse_expression

ROUTES = ["$connect", "$disconnect", "$default", "message", "ping"]


def select(
    body: str, expression: str = "$request.body.action", routes: list[str] = ROUTES
) -> str | None:
    return RouteSelector.build(expression, routes).select(body)


def test_the_action_selects_its_route() -> None:
    assert select('{"action":"message"}') == "message"


def test_matching_is_case_sensitive() -> None:
    assert select('{"action":"Message"}') == "$default"


def test_a_frame_that_is_not_json_goes_to_default() -> None:
    assert select("hello") == "$default"


def test_json_nested_deeper_than_python_parses_goes_to_default() -> None:
    depth = 16_000
    assert select('{"action":"message","x":' + "[" * depth + "]" * depth + "}") == "$default"


def test_json_that_is_not_an_object_goes_to_default() -> None:
    assert select('["message"]') == "$default"


def test_a_missing_path_goes_to_default() -> None:
    assert select('{"other":"message"}') == "$default"


def test_frames_are_never_routed_to_connect_or_disconnect() -> None:
    assert select('{"action":"$connect"}') == "$default"


def test_without_default_an_unmatched_frame_has_no_route() -> None:
    assert select('{"action":"nope"}', routes=["message"]) is None


def test_variables_mix_with_static_text() -> None:
    expression = "${request.body.service}/${request.body.action}"
    assert select('{"service":"chat","action":"join"}', expression, ["chat/join"]) == "chat/join"


def test_a_missing_variable_reads_as_empty_text() -> None:
    selector = RouteSelector.build("${request.body.action}-${request.body.x}", ["join-"])
    assert selector.evaluate('{"action":"join"}') == "join-"


def test_nested_paths_and_indexes_are_followed() -> None:
    selector = RouteSelector.build("$request.body.a.b[1]", ["y"])
    assert selector.select('{"a":{"b":["x","y"]}}') == "y"


def test_arrays_numbers_and_booleans_read_as_text() -> None:
    selector = RouteSelector.build("${request.body.a}|${request.body.n}|${request.body.t}", [])
    assert selector.evaluate('{"a":["x",1],"n":2,"t":true}') == "[x, 1]|2|true"


def test_an_escaped_dollar_is_literal_text() -> None:
    assert parse_expression("\\$${request.body.a}") == ["$", ("a",)]


def test_an_unsupported_variable_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ExpressionError, match=r"\$request\.body"):
        parse_expression("$context.routeKey")
