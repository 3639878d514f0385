"""The stack as a whole: `make run`, shutdown, and each kind of DynamoDB."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

from local import stack, template
from tests.local_harness import (
    SCRIPTED,
    Recording,
    close_frame,
    connect,
    dynamodb_local_or_skip,
    wait_for,
    who_am_i,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_make_run_serves_until_sigterm_and_leaves_no_process(tmp_path: Path) -> None:
    output = tmp_path / "make-run.log"
    with output.open("wb") as log:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "run", "PORT=0", f"ARGS=--handler {SCRIPTED}"],
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "Ready." in output.read_text(), timeout=120, what="make run to be ready")
        ws_url = re.search(r"WebSocket API:\s+(ws://\S+)", output.read_text())
        assert ws_url is not None
        processes = [psutil.Process(make.pid), *psutil.Process(make.pid).children(recursive=True)]
        assert len(processes) >= 4  # make, the gateway, DynamoDB, a Lambda worker
        ws = connect(ws_url.group(1))
        assert who_am_i(ws)
        make.send_signal(signal.SIGTERM)
        assert close_frame(ws)[0] == 1001
        make.wait(60)
    finally:
        if make.poll() is None:
            make.kill()
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == []


def test_stopping_closes_connections_with_1001_and_runs_their_disconnects(
    moto_endpoint: str, tmp_path: Path
) -> None:
    record = tmp_path / "record.jsonl"
    running = stack.start(
        handler=SCRIPTED,
        dynamodb=moto_endpoint,
        table_name=f"stop-{uuid.uuid4().hex[:8]}",
        env={"RECORD_FILE": str(record)},
    )
    try:
        ws = connect(running.ws_url)
        connection_id = who_am_i(ws)
        running.process.send_signal(signal.SIGTERM)
        assert close_frame(ws) == (1001, "Going away")
        assert running.process.wait(60) == 0
    finally:
        running.stop()
        running.cleanup()
    context = Recording(record).disconnect_of(connection_id)["requestContext"]
    assert (context["disconnectStatusCode"], context["disconnectReason"]) == (1001, "Going away")


def assert_table_made_from_the_template(running: stack.Stack) -> None:
    client = running.dynamodb_client()
    table = client.describe_table(TableName=running.table_name)["Table"]
    expected = template.table_properties()
    assert table["KeySchema"] == expected["KeySchema"]
    assert table["BillingModeSummary"]["BillingMode"] == expected["BillingMode"]
    ttl = client.describe_time_to_live(TableName=running.table_name)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == template.ttl_attribute()


def test_dynamodb_moto_gets_the_table_from_the_template() -> None:
    with stack.running(handler=SCRIPTED, dynamodb="moto") as running:
        assert_table_made_from_the_template(running)


def test_dynamodb_local_gets_the_table_from_the_template() -> None:
    dynamodb_local_or_skip()
    with stack.running(handler=SCRIPTED, dynamodb="local") as running:
        assert running.dynamodb_endpoint.startswith("http://127.0.0.1:")
        assert_table_made_from_the_template(running)


def test_an_unknown_dynamodb_is_refused_with_a_clear_error() -> None:
    argv = stack.command(handler=SCRIPTED, dynamodb="postgres")
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd=PROJECT_ROOT
    )
    assert result.returncode == 1
    assert "--dynamodb takes moto, local or an http(s):// URL, not 'postgres'" in result.stderr


def test_a_port_in_use_is_refused_with_a_clear_error() -> None:
    with socket_bound() as port:
        argv = stack.command(handler=SCRIPTED, port=port)
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False, cwd=PROJECT_ROOT
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@contextlib.contextmanager
def socket_bound() -> Iterator[int]:
    """A loopback port someone else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]
