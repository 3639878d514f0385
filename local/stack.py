"""The local stack from Python: for tests, the load test and the benchmark.

    from local import stack

    with stack.running(handler="lambda_function.lambda_handler") as local_stack:
        ws = websocket.create_connection(local_stack.ws_url + "?room=lobby")
        local_stack.management_client().post_to_connection(ConnectionId=..., Data=b"hi")
        local_stack.reports()  # one dict per invocation: durationMs, cpuMs, routeKey, ...

`running()` starts `python -m local serve --port 0 ...` as a child process (the
same path as `make run`, with its own GIL and its own workers), waits until
it is ready, and on exit stops it with SIGTERM: connections close with 1001,
their $disconnects run, and no process is left behind. Every keyword is a
`python -m local` flag; `extra_args` passes any other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    """The stack did not start; the message ends with its output."""


@dataclass
class Stack:
    """A running local stack and how to reach it."""

    process: subprocess.Popen[bytes]
    ws_url: str  # ws://127.0.0.1:PORT/STAGE
    http_url: str  # http://127.0.0.1:PORT
    callback_url: str  # the management API endpoint: http://127.0.0.1:PORT/STAGE
    table_name: str
    dynamodb_endpoint: str
    region: str
    credentials: dict[str, str]  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    log_path: Path
    report_path: Path
    _directory: Path = field(repr=False)

    @property
    def pid(self) -> int:
        """The gateway's process (the Lambda workers and DynamoDB are its children)."""
        return self.process.pid

    def boto3_kwargs(self) -> dict[str, str]:
        return {
            "region_name": self.region,
            "aws_access_key_id": self.credentials["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.credentials["AWS_SECRET_ACCESS_KEY"],
        }

    def management_client(self, **config: Any) -> Any:
        """A plain boto3 `apigatewaymanagementapi` client for this stack, signed with
        the credentials the handler has. `config` goes to botocore's Config."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "apigatewaymanagementapi",
            endpoint_url=self.callback_url,
            config=Config(**config) if config else None,
            **self.boto3_kwargs(),
        )

    def dynamodb_client(self) -> Any:
        import boto3

        return boto3.client("dynamodb", endpoint_url=self.dynamodb_endpoint, **self.boto3_kwargs())

    def reports(self) -> list[dict[str, Any]]:
        """One dict per finished invocation, in order: requestId, routeKey, connectionId,
        durationMs, billedDurationMs, cpuMs, maxMemoryUsedMb, workerPid, error, ..."""
        if not self.report_path.exists():
            return []
        lines = self.report_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def log(self) -> str:
        """Everything the stack printed so far: its own lines and the handler's."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connections(self) -> list[dict[str, Any]]:
        """The live connections: connectionId, connectedAt, identity, query, established."""
        return self._local_control("connections")

    def stats(self) -> dict[str, Any]:
        """How the management API's posts went (delivered, gone, injectedGone,
        injectedThrottle, bufferFull) and how many connections are open."""
        return self._local_control("stats")

    def _local_control(self, name: str) -> Any:
        """GET /@local/{name} (the gateway's controls for tests), as JSON."""
        with urllib.request.urlopen(f"{self.http_url}/@local/{name}", timeout=10) as response:  # noqa: S310 - our loopback URL
            return json.loads(response.read())

    def lose_disconnect(self, connection_id: str) -> None:
        """Make this connection's $disconnect never run (it can be lost on AWS too), so
        only the 410 of a later post can clean it up."""
        request = urllib.request.Request(  # noqa: S310 - our loopback URL
            f"{self.http_url}/@local/connections/{connection_id}/lose-disconnect", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - our loopback URL
            pass

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (SIGKILL after `timeout` seconds); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)


def command(
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    stage: str | None = None,
    handler: str | None = None,
    concurrency: int | None = None,
    dynamodb: str = "moto",
    table_name: str | None = None,
    template: str | Path | None = None,
    env: dict[str, str] | None = None,
    post_latency_ms: float | None = None,
    connect_latency_ms: float | None = None,
    idle_timeout: float | None = None,
    max_duration: float | None = None,
    integration_timeout: float | None = None,
    function_timeout: float | None = None,
    max_frame_bytes: int | None = None,
    max_message_bytes: int | None = None,
    fault_gone_rate: float | None = None,
    fault_throttle_rate: float | None = None,
    fault_seed: int | None = None,
    verify_sigv4: bool = True,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The `python -m local serve` command line for these settings (None: its default)."""
    argv = [sys.executable, "-m", "local", "serve", "--host", host, "--port", str(port)]
    argv += ["--dynamodb", dynamodb]
    flags = {
        "--stage": stage,
        "--handler": handler,
        "--concurrency": concurrency,
        "--table-name": table_name,
        "--template": template,
        "--post-latency-ms": post_latency_ms,
        "--connect-latency-ms": connect_latency_ms,
        "--idle-timeout": idle_timeout,
        "--max-duration": max_duration,
        "--integration-timeout": integration_timeout,
        "--function-timeout": function_timeout,
        "--max-frame-bytes": max_frame_bytes,
        "--max-message-bytes": max_message_bytes,
        "--fault-gone-rate": fault_gone_rate,
        "--fault-throttle-rate": fault_throttle_rate,
        "--fault-seed": fault_seed,
    }
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, str(value)]
    for name, value in (env or {}).items():
        argv += ["--env", f"{name}={value}"]
    if not verify_sigv4:
        argv.append("--no-verify-sigv4")
    return argv + list(extra_args)


def start(*, startup_timeout: float = 90.0, **settings: Any) -> Stack:
    """Start a stack (see `command()` for the settings) and wait until it is ready."""
    directory = Path(tempfile.mkdtemp(prefix="local-stack-"))
    log_path, report_path, ready_path = (
        directory / name for name in ("log", "reports.jsonl", "ready.json")
    )
    argv = command(**settings)
    argv += ["--ready-file", str(ready_path), "--report-file", str(report_path)]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            argv,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + startup_timeout
    while not ready_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
                process.wait()
            output = log_path.read_text(errors="replace")
            shutil.rmtree(directory, ignore_errors=True)
            raise StackError(
                f"the local stack did not start (exit {process.returncode}):\n{output}"
            )
        time.sleep(0.05)
    ready = json.loads(ready_path.read_text())
    return Stack(
        process=process,
        ws_url=ready["wsUrl"],
        http_url=ready["httpUrl"],
        callback_url=ready["callbackUrl"],
        table_name=ready["tableName"],
        dynamodb_endpoint=ready["dynamodbEndpoint"],
        region=ready["region"],
        credentials=ready["credentials"],
        log_path=log_path,
        report_path=report_path,
        _directory=directory,
    )


@contextlib.contextmanager
def running(**settings: Any) -> Iterator[Stack]:
    """`with running(handler=..., idle_timeout=2) as stack:` a stack for the block."""
    stack = start(**settings)
    try:
        yield stack
    finally:
        stack.stop()
        stack.cleanup()
