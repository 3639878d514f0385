"""template.json against the code it deploys.

The template is the single source of truth for routes, table keys, environment
and permissions, and lambda_function.py relies on every one of them: each test
here fails when the two drift apart (a route, a key, a variable or a permission
added on one side only), and the linters hold the template to AWS's rules.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lambda_function
from local import template

ROOT = Path(__file__).resolve().parent.parent
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
TEMPLATE = template.load()
HANDLER_SOURCE = ast.parse((ROOT / "lambda_function.py").read_text())

# What the Lambda runtime itself sets in every execution environment: the handler
# may read these without the template or a default in code.
LAMBDA_RUNTIME_VARIABLES = {
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_ACCESS_KEY_ID",
    "AWS_DEFAULT_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_REGION",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "LAMBDA_RUNTIME_DIR",
    "LAMBDA_TASK_ROOT",
}


# --- Reading the template and the handler ---------------------------------------------


def logical_id(resource_type: str) -> str:
    (name,) = template.resources(TEMPLATE, resource_type)
    return name


def function_properties() -> dict[str, Any]:
    return template.only_resource(TEMPLATE, "AWS::Lambda::Function")["Properties"]


def policy_statements() -> dict[str, dict[str, Any]]:
    """Every statement granted to the function's role, by Sid: those of its inline
    policies and of the AWS::IAM::Policy resources attached to it."""
    role_name = function_properties()["Role"]["Fn::GetAtt"][0]
    role = TEMPLATE["Resources"][role_name]["Properties"]
    documents = [policy["PolicyDocument"] for policy in role.get("Policies", [])]
    documents += [
        policy["Properties"]["PolicyDocument"]
        for policy in template.resources(TEMPLATE, "AWS::IAM::Policy").values()
        if {"Ref": role_name} in policy["Properties"]["Roles"]
    ]
    return {
        statement["Sid"]: statement for document in documents for statement in document["Statement"]
    }


def condition_of_statement(sid: str) -> str | None:
    """The Condition of the AWS::IAM::Policy resource holding a statement, if any."""
    for policy in template.resources(TEMPLATE, "AWS::IAM::Policy").values():
        if sid in {
            statement["Sid"] for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        }:
            return policy.get("Condition")
    return None


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def environment_reads() -> dict[str, str | None]:
    """Every variable the handler reads: name -> its default in code (None: none).

    Collects `os.environ.get("NAME", default)`, `os.getenv("NAME", default)` and
    `os.environ["NAME"]`; a name that is not a literal fails the test, since it
    could not be checked.
    """
    reads: dict[str, str | None] = {}
    for node in ast.walk(HANDLER_SOURCE):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (
            "os.environ.get",
            "os.getenv",
        ):
            name, *default = node.args
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            name, default = node.slice, []
        else:
            continue
        assert isinstance(name, ast.Constant), f"unreadable variable name: {ast.unparse(node)}"
        reads[name.value] = ast.literal_eval(default[0]) if default else None
    return reads


def boto3_clients() -> dict[str, str]:
    """The handler's boto3 clients: variable name -> service name."""
    clients = {}
    for node in ast.walk(HANDLER_SOURCE):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "boto3.client"
        ):
            service = node.value.args[0]
            assert isinstance(service, ast.Constant), f"unreadable service: {ast.unparse(node)}"
            for target in node.targets:
                clients[ast.unparse(target)] = service.value
    return clients


def methods_called_on(client_name: str) -> set[str]:
    """Names of the methods the handler calls on one of its clients."""
    return {
        node.func.attr
        for node in ast.walk(HANDLER_SOURCE)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and ast.unparse(node.func.value) == client_name
    }


def management_api_methods() -> set[str]:
    """HTTP methods of the requests the handler signs and sends itself: the method
    (first argument or `method=`) of its `urlopen`, `request` and `AWSRequest` calls."""
    methods = set()
    for node in ast.walk(HANDLER_SOURCE):
        if not isinstance(node, ast.Call):
            continue
        if ast.unparse(node.func).rsplit(".", 1)[-1] not in ("urlopen", "request", "AWSRequest"):
            continue
        candidates = node.args[:1] + [kw.value for kw in node.keywords if kw.arg == "method"]
        methods |= {
            candidate.value
            for candidate in candidates
            if isinstance(candidate, ast.Constant) and candidate.value in HTTP_METHODS
        }
    return methods


# --- Linters ----------------------------------------------------------------------------


def test_cfn_lint_reports_nothing() -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run(
        [cfn_lint, "--format", "parseable", "template.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_checkov_fails_no_check() -> None:
    # The tools environment is made once and kept; `make tools` is a no-op after that.
    subprocess.run(["make", "-s", "tools"], cwd=ROOT, check=True, timeout=600)
    result = subprocess.run(
        [
            ROOT / ".venv-tools" / "bin" / "checkov",
            "--file",
            "template.json",
            "--framework",
            "cloudformation",
            "--skip-download",
            "--output",
            "json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
    )
    report = json.loads(result.stdout)
    failed = [
        f"{check['check_id']} on {check['resource']}: {check['check_name']}"
        for check in report["results"]["failed_checks"]
    ]
    assert failed == []
    assert report["summary"]["passed"] > 0


def test_every_skipped_checkov_check_says_why() -> None:
    skips = [
        (name, skip)
        for name, resource in TEMPLATE["Resources"].items()
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", [])
    ]
    assert skips, "the template skips checks; this test must see them"
    assert [(name, skip["id"]) for name, skip in skips if len(skip.get("comment", "")) < 20] == []


# --- Routes -----------------------------------------------------------------------------


def test_every_route_the_handler_dispatches_on_is_deployed_and_no_other() -> None:
    assert "$default" in lambda_function.ROUTES
    assert set(lambda_function.ROUTES) == template.api(TEMPLATE).routes


def test_the_two_way_routes_are_message_ping_and_default() -> None:
    assert template.api(TEMPLATE).two_way_routes == {"message", "ping", "$default"}


def test_every_route_invokes_the_function() -> None:
    integration_name = logical_id("AWS::ApiGatewayV2::Integration")
    integration = TEMPLATE["Resources"][integration_name]["Properties"]
    function_arn = f"${{{logical_id('AWS::Lambda::Function')}.Arn}}"
    assert integration["IntegrationType"] == "AWS_PROXY"
    assert function_arn in integration["IntegrationUri"]["Fn::Sub"]
    target = {"Fn::Sub": f"integrations/${{{integration_name}}}"}
    for name, route in template.resources(TEMPLATE, "AWS::ApiGatewayV2::Route").items():
        assert route["Properties"]["Target"] == target, name


def test_the_stage_deploys_after_every_route_and_route_response() -> None:
    # With AutoDeploy, a stage created before its routes would first deploy without them.
    stage = template.only_resource(TEMPLATE, "AWS::ApiGatewayV2::Stage")
    routes = template.resources(TEMPLATE, "AWS::ApiGatewayV2::Route")
    responses = template.resources(TEMPLATE, "AWS::ApiGatewayV2::RouteResponse")
    assert set(stage["DependsOn"]) == set(routes) | set(responses)


# --- Table ------------------------------------------------------------------------------


def test_the_table_keys_and_ttl_are_the_ones_the_handler_writes() -> None:
    assert template.table_keys(TEMPLATE) == (
        lambda_function.PARTITION_KEY,
        lambda_function.SORT_KEY,
    )
    assert template.ttl_attribute(TEMPLATE) == lambda_function.TTL_ATTRIBUTE
    assert template.table_properties(TEMPLATE)["TimeToLiveSpecification"]["Enabled"] is True


# --- Environment ------------------------------------------------------------------------


def test_every_variable_the_handler_reads_is_set_by_the_template_or_has_a_default() -> None:
    set_by_template = template.function_environment_names(TEMPLATE)
    unset = {
        name
        for name, default in environment_reads().items()
        if default is None and name not in set_by_template | LAMBDA_RUNTIME_VARIABLES
    }
    assert unset == set()


def test_every_variable_the_template_sets_is_read_by_the_handler() -> None:
    assert template.function_environment_names(TEMPLATE) - set(environment_reads()) == set()


def test_the_template_defaults_are_the_handler_defaults() -> None:
    # Deployed with default parameters, the function behaves as it does locally.
    reads = environment_reads()
    deployed = template.function_environment(TEMPLATE)
    assert deployed, "no parameter-backed variables found"
    assert {name: reads[name] for name in deployed} == deployed


# --- Permissions ------------------------------------------------------------------------


def test_the_handler_calls_exactly_the_dynamodb_methods_it_declares() -> None:
    assert methods_called_on("dynamodb") == set(lambda_function.DYNAMODB_ACTIONS)


def test_the_table_policy_grants_exactly_the_declared_actions_on_this_table_only() -> None:
    statement = policy_statements()["ConnectionsTable"]
    assert statement["Effect"] == "Allow"
    assert sorted(as_list(statement["Action"])) == sorted(
        set(lambda_function.DYNAMODB_ACTIONS.values())
    )
    assert as_list(statement["Resource"]) == [
        {"Fn::GetAtt": [logical_id("AWS::DynamoDB::Table"), "Arn"]}
    ]


def test_manage_connections_is_granted_on_this_stage_for_the_methods_the_handler_uses() -> None:
    statement = policy_statements()["ManageConnections"]
    api = logical_id("AWS::ApiGatewayV2::Api")
    stage = template.only_resource(TEMPLATE, "AWS::ApiGatewayV2::Stage")
    stage_parameter = stage["Properties"]["StageName"]["Ref"]
    assert as_list(statement["Action"]) == ["execute-api:ManageConnections"]
    assert management_api_methods(), "found no management API request in the handler"
    assert [resource["Fn::Sub"] for resource in as_list(statement["Resource"])] == [
        "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"
        f"${{{api}}}/${{{stage_parameter}}}/{method}/@connections/*"
        for method in sorted(management_api_methods())
    ]


def test_the_function_role_grants_every_aws_service_the_handler_calls_and_no_other() -> None:
    granted = {
        action.split(":")[0]
        for statement in policy_statements().values()
        for action in as_list(statement["Action"])
    }
    # Lambda's runtime writes the logs; the management API is called by signed HTTP.
    assert granted - {"logs", "execute-api"} == set(boto3_clients().values())


def test_token_mode_generates_the_secret_and_only_the_function_may_read_it() -> None:
    (secrets_client,) = [
        name for name, service in boto3_clients().items() if service == "secretsmanager"
    ]
    actions = {
        "secretsmanager:" + method.title().replace("_", "")
        for method in methods_called_on(secrets_client)
    }
    statement = policy_statements()["RoomTokenSecret"]
    assert sorted(as_list(statement["Action"])) == sorted(actions)
    assert as_list(statement["Resource"]) == [{"Ref": "RoomTokenSecret"}]
    condition = condition_of_statement("RoomTokenSecret")
    assert TEMPLATE["Conditions"][condition] == {"Fn::Equals": [{"Ref": "AuthMode"}, "token"]}
    secret = TEMPLATE["Resources"]["RoomTokenSecret"]
    assert secret["Type"] == "AWS::SecretsManager::Secret"
    assert secret["Condition"] == condition
    # Generated by Secrets Manager: the value is in no template, parameter or output.
    assert "SecretString" not in secret["Properties"]
    assert secret["Properties"]["GenerateSecretString"]["PasswordLength"] >= 32
    variables = function_properties()["Environment"]["Variables"]
    assert variables["AUTH_SECRET_ARN"] == {
        "Fn::If": [condition, {"Ref": "RoomTokenSecret"}, {"Ref": "AWS::NoValue"}]
    }
    assert variables["AUTH_MODE"] == {"Ref": "AuthMode"}
    assert TEMPLATE["Parameters"]["AuthMode"]["AllowedValues"] == ["none", "token"]


def test_a_hand_off_may_invoke_this_function_and_no_other_once_within_a_minute() -> None:
    """The rest of a big room goes to an asynchronous invocation of the function
    itself; a failed one is not retried, and one queued over a minute is dropped."""
    methods = methods_called_on("lambda_api()")
    assert methods == {"invoke"}
    statement = policy_statements()["HandOff"]
    assert as_list(statement["Action"]) == ["lambda:InvokeFunction"]
    function = logical_id("AWS::Lambda::Function")
    assert as_list(statement["Resource"]) == [{"Fn::GetAtt": [function, "Arn"]}]
    assert condition_of_statement("HandOff") is None
    config = template.only_resource(TEMPLATE, "AWS::Lambda::EventInvokeConfig")["Properties"]
    assert config["FunctionName"] == {"Ref": function}
    assert (config["MaximumRetryAttempts"], config["MaximumEventAgeInSeconds"]) == (0, 60)


def test_the_function_role_grants_no_wildcard_action_or_resource() -> None:
    for sid, statement in policy_statements().items():
        assert statement["Effect"] == "Allow", sid
        assert not [action for action in as_list(statement["Action"]) if "*" in action], sid
        for resource in as_list(statement["Resource"]):
            text = json.dumps(resource)
            # Only the connection id, the last segment of a management API path, is open.
            assert text.count("*") == text.count("/@connections/*"), sid


def test_only_this_api_stage_may_invoke_the_function() -> None:
    permission = template.only_resource(TEMPLATE, "AWS::Lambda::Permission")["Properties"]
    assert permission["Principal"] == "apigateway.amazonaws.com"
    assert permission["FunctionName"] == {"Ref": logical_id("AWS::Lambda::Function")}
    api = logical_id("AWS::ApiGatewayV2::Api")
    stage = template.only_resource(TEMPLATE, "AWS::ApiGatewayV2::Stage")
    stage_parameter = stage["Properties"]["StageName"]["Ref"]
    assert permission["SourceArn"]["Fn::Sub"] == (
        "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"
        f"${{{api}}}/${{{stage_parameter}}}/*"
    )


# --- The function -----------------------------------------------------------------------


def test_the_function_runs_lambda_function_py_alone() -> None:
    # Code is the file itself (`make package` zips it alone), and Handler names it.
    properties = function_properties()
    assert properties["Code"] == "lambda_function.py"
    module, function = properties["Handler"].rsplit(".", 1)
    assert (ROOT / properties["Code"]).stem == module == lambda_function.__name__
    assert callable(getattr(lambda_function, function))
