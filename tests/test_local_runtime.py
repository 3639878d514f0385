"""The local Lambda runtime: worker processes as execution environments."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import psutil
import pytest
import websocket

from local import stack as local_stack
from tests.local_harness import connect, wait_for, who_am_i

ERROR_FRAME = re.compile(r'^\{"message": "(?P<text>[^"]+)", "connectionId":')


def ask(ws: Any, frame: dict[str, Any]) -> str:
    ws.send(json.dumps(frame))
    return ws.recv()


def test_module_state_is_kept_between_invocations_of_a_worker(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    counts: dict[int, list[int]] = {}
    for _ in range(6):
        reply = json.loads(ask(ws, {"do": "count"}))
        counts.setdefault(reply["pid"], []).append(reply["count"])
    for per_worker in counts.values():
        assert per_worker == sorted(per_worker) and len(set(per_worker)) == len(per_worker)
    assert max(len(per_worker) for per_worker in counts.values()) >= 2


def test_a_killed_worker_answers_internal_server_error_and_is_replaced(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    frame = ERROR_FRAME.match(ask(ws, {"do": "crash"}))
    assert frame is not None and frame["text"] == "Internal server error"
    killed = [r for r in stack.reports() if r.get("errorType") == "Runtime.ExitError"][-1]
    assert not psutil.pid_exists(killed["workerPid"])
    assert json.loads(ask(ws, {"do": "whoami"}))["pid"] != killed["workerPid"]
    assert "Runtime exited with error: signal: killed" in stack.log()


def test_the_handler_gets_a_lambda_context(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    context = recording.events(connection_id, "$connect")[0]["context"]
    assert re.fullmatch(r"[0-9a-f-]{36}", context["aws_request_id"])
    assert context["function_name"] == "local-BroadcastFunction"
    assert context["memory_limit_in_mb"] == "1024"  # the template's MemorySize, as a string
    assert context["invoked_function_arn"].endswith(":function:local-BroadcastFunction")
    assert context["log_group_name"] == "/aws/lambda/local-BroadcastFunction"
    assert context["log_stream_name"]
    assert 0 < context["remaining_ms"] <= 29_000  # the template's Timeout


def test_the_handler_environment_points_at_the_local_stack(stack_factory: Any) -> None:
    stack, recording = stack_factory(env={"EXTRA": "yes", "DEFAULT_ROOM": "lobby"})
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    environment = recording.events(connection_id, "$connect")[0]["environment"]
    assert environment == {
        "TABLE_NAME": stack.table_name,
        "CALLBACK_URL": stack.callback_url,
        "AWS_ENDPOINT_URL_DYNAMODB": stack.dynamodb_endpoint,
        "AWS_REGION": "us-east-1",
        "DEFAULT_ROOM": "lobby",  # the template says "1"; --env wins
        "EXTRA": "yes",
    }


def test_each_invocation_is_logged_and_reported_like_lambda(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    report = wait_for(
        lambda: [
            r
            for r in stack.reports()
            if r["connectionId"] == connection_id and r["routeKey"] == "$default"
        ],
        what="the REPORT of the message",
    )[0]
    assert report["durationMs"] > 0 and report["cpuMs"] >= 0
    assert report["billedDurationMs"] >= 1 and report["memorySizeMb"] == 1024
    request_id = report["requestId"]
    log = stack.log()
    assert f"START RequestId: {request_id} Version: $LATEST" in log
    assert f"END RequestId: {request_id}" in log
    line = re.search(rf"REPORT RequestId: {request_id}\t.*", log)
    assert line is not None
    for field in (
        "Duration: ",
        "Billed Duration: ",
        "Memory Size: 1024 MB",
        "Max Memory Used: ",
        "CPU: ",
    ):
        assert field in line.group(0)


def test_workers_start_on_demand_up_to_the_concurrency(stack_factory: Any) -> None:
    stack, _ = stack_factory(concurrency=2)
    sockets = [connect(stack.ws_url) for _ in range(4)]
    for ws in sockets:
        ws.send(json.dumps({"do": "sleep", "seconds": 0.5}))
    for ws in sockets:
        ws.recv()
    pids = {report["workerPid"] for report in stack.reports()}
    assert len(pids) == 2


@pytest.fixture(scope="module")
def impatient(stack_factory: Any) -> Any:
    """A stack whose gateway waits half a second for the handler."""
    return stack_factory(integration_timeout=0.5)


def test_past_the_integration_timeout_a_frame_gets_endpoint_request_timed_out(
    impatient: Any,
) -> None:
    stack, _ = impatient
    ws = connect(stack.ws_url)
    frame = ERROR_FRAME.match(ask(ws, {"do": "sleep", "seconds": 1.5}))
    assert frame is not None and frame["text"] == "Endpoint request timed out"


def test_past_the_integration_timeout_a_handshake_gets_504(impatient: Any) -> None:
    stack, _ = impatient
    with pytest.raises(websocket.WebSocketBadStatusException) as rejected:
        connect(stack.ws_url + "?sleep=1.5")
    assert rejected.value.status_code == 504


def test_past_the_function_timeout_the_worker_is_stopped(stack_factory: Any) -> None:
    stack, _ = stack_factory(function_timeout=0.5)
    ws = connect(stack.ws_url)
    frame = ERROR_FRAME.match(ask(ws, {"do": "sleep", "seconds": 5}))
    assert frame is not None and frame["text"] == "Internal server error"
    assert "Task timed out after 0.50 seconds" in stack.log()
    assert json.loads(ask(ws, {"do": "whoami"}))["pid"] > 0


def test_a_handler_that_cannot_be_imported_stops_the_start_with_a_clear_error(
    moto_endpoint: str,
) -> None:
    argv = local_stack.command(
        handler="no_such_module.handler", dynamodb=moto_endpoint, table_name="import-error"
    )
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "Runtime.ImportModuleError: No module named 'no_such_module'" in result.stderr


@pytest.mark.parametrize("flag", ["--fault-gone-rate=2", "--concurrency=0"])
def test_bad_flags_are_refused_with_a_message(flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "local", flag],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert flag.split("=")[0] in result.stderr
