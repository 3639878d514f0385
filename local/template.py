"""Read `template.json`, the single source of truth for the API and the table.

The local stack and the tests take the route selection expression, the routes,
the two-way routes, the function's environment and the table's schema from
here, so what runs locally is what CloudFormation deploys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "template.json"


@cache
def _load_cached(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load(path: Path | str = TEMPLATE_PATH) -> dict[str, Any]:
    """The parsed template (cached: treat it as read-only)."""
    return _load_cached(str(path))


def resources(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    """Logical id -> resource, for every resource of one type."""
    return {
        name: resource
        for name, resource in template["Resources"].items()
        if resource["Type"] == resource_type
    }


def only_resource(template: dict[str, Any], resource_type: str) -> dict[str, Any]:
    """The one resource of a type the project has exactly one of (table, function, API)."""
    found = list(resources(template, resource_type).values())
    if len(found) != 1:
        raise ValueError(f"template.json should hold one {resource_type}, found {len(found)}")
    return found[0]


def parameter_default(template: dict[str, Any], name: str) -> str:
    return str(template["Parameters"][name]["Default"])


def resolve(template: dict[str, Any], value: Any) -> str | None:
    """A property value as a string: literals as they are, `Ref` to a parameter as
    its default, anything that only exists once deployed (a resource) as None."""
    if isinstance(value, dict):
        ref = value.get("Ref")
        if ref in template.get("Parameters", {}):
            return parameter_default(template, ref)
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- The WebSocket API --------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """What the emulator needs to route frames as API Gateway does."""

    route_selection_expression: str
    routes: frozenset[str]
    two_way_routes: frozenset[str]


def api(template: dict[str, Any] | None = None) -> Api:
    template = template or load()
    api_resource = only_resource(template, "AWS::ApiGatewayV2::Api")
    routes = resources(template, "AWS::ApiGatewayV2::Route")
    with_response = {
        response["Properties"]["RouteId"].get("Ref")
        for response in resources(template, "AWS::ApiGatewayV2::RouteResponse").values()
        if response["Properties"].get("RouteResponseKey") == "$default"
    }
    two_way = {
        route["Properties"]["RouteKey"]
        for name, route in routes.items()
        if name in with_response
        and route["Properties"].get("RouteResponseSelectionExpression") == "$default"
    }
    return Api(
        route_selection_expression=api_resource["Properties"]["RouteSelectionExpression"],
        routes=frozenset(route["Properties"]["RouteKey"] for route in routes.values()),
        two_way_routes=frozenset(two_way),
    )


# --- The function ------------------------------------------------------------------


def function_environment(template: dict[str, Any] | None = None) -> dict[str, str]:
    """The function's environment as deployed with default parameters; variables whose
    value only exists once deployed (the table name) are left out for the caller to set."""
    template = template or load()
    function = only_resource(template, "AWS::Lambda::Function")
    variables = function["Properties"].get("Environment", {}).get("Variables", {})
    resolved = {name: resolve(template, value) for name, value in variables.items()}
    return {name: value for name, value in resolved.items() if value is not None}


def function_setting(name: str, template: dict[str, Any] | None = None) -> str | None:
    """One property of the function as deployed with default parameters, e.g.
    MemorySize, Timeout or Handler (None when the template does not set it)."""
    template = template or load()
    function = only_resource(template, "AWS::Lambda::Function")
    value = function["Properties"].get(name)
    return None if value is None else resolve(template, value)


def function_environment_names(template: dict[str, Any] | None = None) -> set[str]:
    template = template or load()
    function = only_resource(template, "AWS::Lambda::Function")
    return set(function["Properties"].get("Environment", {}).get("Variables", {}))


# --- The table ---------------------------------------------------------------------


def table_properties(template: dict[str, Any] | None = None) -> dict[str, Any]:
    return only_resource(template or load(), "AWS::DynamoDB::Table")["Properties"]


def create_table(client: Any, table_name: str, template: dict[str, Any] | None = None) -> None:
    """Create the connections table exactly as the template defines it (keys, billing,
    TTL), through any DynamoDB client: moto in-process, moto's server, DynamoDB Local
    or AWS itself. Waits until the table is ACTIVE."""
    properties = table_properties(template)
    client.create_table(
        TableName=table_name,
        AttributeDefinitions=properties["AttributeDefinitions"],
        KeySchema=properties["KeySchema"],
        BillingMode=properties["BillingMode"],
    )
    client.get_waiter("table_exists").wait(
        TableName=table_name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 150}
    )
    ttl = properties.get("TimeToLiveSpecification")
    if ttl and ttl.get("Enabled"):
        client.update_time_to_live(
            TableName=table_name,
            TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": True},
        )


def table_keys(template: dict[str, Any] | None = None) -> tuple[str, str]:
    """(partition key, sort key) attribute names."""
    schema = {
        key["KeyType"]: key["AttributeName"] for key in table_properties(template)["KeySchema"]
    }
    return schema["HASH"], schema["RANGE"]


def ttl_attribute(template: dict[str, Any] | None = None) -> str:
    return table_properties(template)["TimeToLiveSpecification"]["AttributeName"]
