"""The local Lambda runtime: execution environments as worker processes.

Each worker is one execution environment. It imports the handler once (the
init phase), then runs one invocation at a time and keeps its module state
between invocations, as Lambda does. Workers start on demand up to the
function's concurrency, and one is started ahead so the first connection does
not wait for an import. Being processes, they never share the gateway's GIL,
and a handler that crashes, hangs or is killed takes down only its worker: the
caller gets Lambda's error and a fresh worker takes its place.

Every invocation is logged as CloudWatch shows it (START, the handler's own
output, END, REPORT with Duration, Billed Duration, Memory Size, Max Memory
Used, Init Duration on a cold start, and the worker's CPU time), and its REPORT
figures are appended as one JSON object to an optional report file, which the
fan-out benchmark reads.

Two halves live here: the gateway side (`LambdaRuntime`, asyncio) and the
worker side (`worker_main`, run as `python -m local.runtime CONFIG`). They talk
over a socket pair, one JSON document per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import math
import os
import resource
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from local.processes import die_with_parent

ACCOUNT_ID = "123456789012"
# The largest line either side sends: a 6 MB Lambda response, JSON-escaped.
_CHANNEL_LIMIT = 32 * 1024 * 1024
# A worker that cannot even report its init within this many seconds is broken.
_INIT_TIMEOUT_SECONDS = 60.0

log = logging.getLogger("local.runtime")


# --- What an invocation produces -------------------------------------------------


@dataclass
class Outcome:
    """The result of one invocation as the gateway sees it."""

    request_id: str
    result: Any = None
    # Lambda's error document (errorType, errorMessage, ...) when the handler raised,
    # crashed, timed out or returned something that is not JSON.
    error: dict[str, Any] | None = None
    # The gateway stopped waiting (the integration timeout passed first).
    timed_out: bool = False
    report: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


# --- The worker side: one execution environment ------------------------------------


@dataclass
class LambdaContext:
    """The context object Lambda's Python runtime passes to handlers."""

    aws_request_id: str
    function_name: str
    memory_limit_in_mb: str  # a string, as in Lambda's own runtime
    invoked_function_arn: str
    log_group_name: str
    log_stream_name: str
    deadline_ms: int
    function_version: str = "$LATEST"
    identity: Any = None
    client_context: Any = None

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self.deadline_ms - int(time.time() * 1000))


class _RequestIdFilter(logging.Filter):
    """Stamps log records with the current request id, as Lambda's log handler does."""

    request_id = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = self.request_id
        return True


def _install_lambda_logging() -> _RequestIdFilter:
    """Lambda's Python runtime installs a root log handler before importing the
    handler (so logging.basicConfig() is a no-op there); do the same, with its
    text format: [LEVEL]<tab>timestamp<tab>request id<tab>message."""
    request_filter = _RequestIdFilter()
    handler = logging.StreamHandler(sys.stdout)
    formatter = logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
        "%Y-%m-%dT%H:%M:%S",
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(request_filter)
    logging.getLogger().addHandler(handler)
    return request_filter


def _error_document(error: BaseException, error_type: str | None = None) -> dict[str, Any]:
    return {
        "errorMessage": str(error),
        "errorType": error_type or type(error).__name__,
        # From the handler's frame on, as Lambda shows it (not the runtime's own frame).
        "stackTrace": traceback.format_tb(
            error.__traceback__.tb_next if error.__traceback__ else None
        ),
    }


def _load_handler(spec: str) -> Callable[[dict[str, Any], LambdaContext], Any]:
    module_name, _, function_name = spec.rpartition(".")
    if not module_name:
        raise ValueError(f"Bad handler {spec!r}: expected module.function")
    module = importlib.import_module(module_name)
    handler = getattr(module, function_name, None)
    if not callable(handler):
        raise AttributeError(f"Handler {function_name!r} missing on module {module_name!r}")
    return handler


def _print_error(error: dict[str, Any]) -> None:
    print(f"[ERROR] {error['errorType']}: {error['errorMessage']}")
    if error.get("stackTrace"):
        print("Traceback (most recent call last):")
    for frame in error.get("stackTrace", []):
        print(frame.rstrip("\n"))


def worker_main(config: dict[str, Any]) -> None:
    """Serve invocations until the gateway closes the channel."""
    # Without the gateway (stopping, or killed) there is nothing left to serve.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _serve_invocations(config)


def _serve_invocations(config: dict[str, Any]) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the gateway stops the
    # workers itself, after their last $disconnect has run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdout: Any = sys.stdout
    stdout.reconfigure(line_buffering=True)
    channel = socket.socket(fileno=config["fd"])
    inbox = channel.makefile("rb")
    outbox = channel.makefile("wb")
    request_filter = _install_lambda_logging()
    log_stream = time.strftime("%Y/%m/%d/[$LATEST]", time.gmtime()) + uuid.uuid4().hex

    started = time.perf_counter()
    handler = None
    init_error = None
    try:
        handler = _load_handler(config["handler"])
    except Exception as error:
        error_type = "Runtime.ImportModuleError" if isinstance(error, ImportError) else None
        init_error = _error_document(error, error_type)
        handler_name = config["handler"]
        print(f"[ERROR] {init_error['errorType']}: Unable to import {handler_name!r}: {error}")
    init_ms = (time.perf_counter() - started) * 1000
    _send(outbox, {"initDurationMs": init_ms, "error": init_error})

    first = True
    for line in inbox:
        request = json.loads(line)
        request_filter.request_id = request["requestId"]
        context = LambdaContext(
            aws_request_id=request["requestId"],
            function_name=config["functionName"],
            memory_limit_in_mb=str(config["memorySizeMb"]),
            invoked_function_arn=(
                f"arn:aws:lambda:{config['region']}:{ACCOUNT_ID}:function:{config['functionName']}"
            ),
            log_group_name=f"/aws/lambda/{config['functionName']}",
            log_stream_name=log_stream,
            deadline_ms=request["deadlineMs"],
        )
        response = _invoke(handler, init_error, request["event"], context)
        report = _report(context, response.pop("_timing"), config, init_ms if first else None)
        first = False
        print(f"END RequestId: {context.aws_request_id}")
        print(report_line(report))
        response["report"] = report
        _send(outbox, response)
        request_filter.request_id = ""


def _invoke(
    handler: Callable[..., Any] | None,
    init_error: dict[str, Any] | None,
    event: dict[str, Any],
    context: LambdaContext,
) -> dict[str, Any]:
    print(f"START RequestId: {context.aws_request_id} Version: $LATEST")
    cpu_started = time.process_time()
    started = time.perf_counter()
    response: dict[str, Any]
    if handler is None:
        response = {"error": init_error}
    else:
        try:
            result = handler(event, context)
        except Exception as error:
            response = {"error": _error_document(error)}
        else:
            try:
                json.dumps(result)  # what cannot be serialized cannot leave Lambda either
                response = {"result": result}
            except (TypeError, ValueError) as error:
                response = {"error": _error_document(error, "Runtime.MarshalError")}
    duration_ms = (time.perf_counter() - started) * 1000
    cpu_ms = (time.process_time() - cpu_started) * 1000
    if response.get("error"):
        _print_error(response["error"])
    response["_timing"] = (duration_ms, cpu_ms)
    return response


def _report(
    context: LambdaContext,
    timing: tuple[float, float],
    config: dict[str, Any],
    init_ms: float | None,
) -> dict[str, Any]:
    duration_ms, cpu_ms = timing
    report = {
        "requestId": context.aws_request_id,
        "durationMs": round(duration_ms, 2),
        "billedDurationMs": max(1, math.ceil(duration_ms)),
        "memorySizeMb": int(config["memorySizeMb"]),
        # ru_maxrss is in kilobytes on Linux.
        "maxMemoryUsedMb": math.ceil(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpuMs": round(cpu_ms, 2),
        "workerPid": os.getpid(),
    }
    if init_ms is not None:
        report["initDurationMs"] = round(init_ms, 2)
    return report


def report_line(report: dict[str, Any]) -> str:
    """The REPORT line as CloudWatch shows it, plus the worker's CPU time."""
    fields = [
        f"REPORT RequestId: {report['requestId']}",
        f"Duration: {report['durationMs']:.2f} ms",
        f"Billed Duration: {report['billedDurationMs']} ms",
        f"Memory Size: {report['memorySizeMb']} MB",
        f"Max Memory Used: {report['maxMemoryUsedMb']} MB",
    ]
    if "initDurationMs" in report:
        fields.append(f"Init Duration: {report['initDurationMs']:.2f} ms")
    if "status" in report:
        fields.append(f"Status: {report['status']}")
    if "errorType" in report:
        fields.append(f"Error Type: {report['errorType']}")
    if "cpuMs" in report:
        fields.append(f"CPU: {report['cpuMs']:.2f} ms")
    return "\t".join(fields)


def _send(outbox: IO[bytes], message: dict[str, Any]) -> None:
    outbox.write(json.dumps(message).encode() + b"\n")
    outbox.flush()


# --- The gateway side: the pool of execution environments ---------------------------


@dataclass(eq=False)
class _Worker:
    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    init_duration_ms: float
    # Lambda keeps an environment whose init failed and fails each invocation with it.
    init_error: dict[str, Any] | None
    alive: bool = True

    @property
    def pid(self) -> int:
        return self.process.pid


class HandlerInitError(RuntimeError):
    """The handler could not be imported (Lambda's Runtime.ImportModuleError)."""


@dataclass
class RuntimeSettings:
    handler: str
    environment: dict[str, str]
    concurrency: int = 4
    memory_size_mb: int = 1024
    timeout_seconds: float = 29.0
    function_name: str = "local-BroadcastFunction"
    region: str = "us-east-1"
    working_directory: Path = field(default_factory=Path.cwd)
    report_file: Path | None = None


class LambdaRuntime:
    """Invokes the handler in worker processes, at most `concurrency` at a time."""

    def __init__(self, settings: RuntimeSettings) -> None:
        if settings.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.settings = settings
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._processes: set[asyncio.subprocess.Process] = set()  # started, until they exit
        self._starting = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._report_file: IO[str] | None = None

    @property
    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self._workers if worker.alive]

    async def start(self) -> None:
        """Start the first execution environment, so the first invocation is warm; an
        import error of the handler is raised here, before anyone connects."""
        if self.settings.report_file is not None:
            self._report_file = self.settings.report_file.open("a", buffering=1)
        self._starting += 1
        try:
            worker = await self._spawn()
        finally:
            self._starting -= 1
        if worker.init_error is not None:
            error = worker.init_error
            raise HandlerInitError(f"{error['errorType']}: {error['errorMessage']}")
        self._idle.put_nowait(worker)

    async def invoke(self, event: dict[str, Any], *, wait_seconds: float) -> Outcome:
        """Run one invocation; give up waiting after `wait_seconds` (the invocation
        itself runs on to its end or to the function timeout, as on Lambda)."""
        request_id = str(uuid.uuid4())
        task = self._background(self._run(request_id, event))
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait_seconds)
        except TimeoutError:
            return Outcome(request_id, timed_out=True)

    async def stop(self) -> None:
        """Close every worker's channel (they exit at EOF), then make sure they are gone."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()  # a worker still starting is killed (see _spawn)
        for worker in list(self._workers):
            worker.writer.close()
        for process in list(self._processes):
            try:
                await asyncio.wait_for(process.wait(), 3)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._report_file is not None:
            self._report_file.close()

    # -- internals --

    def _background(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, request_id: str, event: dict[str, Any]) -> Outcome:
        worker = await self._acquire()
        if worker is None:
            error = {"errorType": "Runtime.ExitError", "errorMessage": "the worker failed to start"}
            return Outcome(request_id, error=error)
        outcome = await self._invoke_on(worker, request_id, event)
        if worker.alive:
            self._idle.put_nowait(worker)
        self._write_report(outcome, event)
        return outcome

    async def _acquire(self) -> _Worker | None:
        while True:
            if (
                self._idle.empty()
                and len(self._workers) + self._starting < self.settings.concurrency
            ):
                self._start_worker_soon()
            worker = await self._idle.get()
            if worker is None or worker.alive:
                return worker

    def _start_worker_soon(self) -> None:
        self._starting += 1

        async def start() -> None:
            try:
                worker = await self._spawn()
            except Exception:
                log.exception("could not start a Lambda worker")
                self._idle.put_nowait(None)
                return
            finally:
                self._starting -= 1
            self._idle.put_nowait(worker)

        self._background(start())

    async def _spawn(self) -> _Worker:
        parent_end, child_end = socket.socketpair()
        config = {
            "fd": child_end.fileno(),
            "handler": self.settings.handler,
            "functionName": self.settings.function_name,
            "memorySizeMb": self.settings.memory_size_mb,
            "region": self.settings.region,
        }
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "local.runtime",
                json.dumps(config),
                pass_fds=(child_end.fileno(),),
                env=self.settings.environment,
                cwd=self.settings.working_directory,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            child_end.close()
        self._processes.add(process)
        process_exited = asyncio.ensure_future(process.wait())
        process_exited.add_done_callback(lambda _: self._processes.discard(process))
        try:
            reader, writer = await asyncio.open_unix_connection(
                sock=parent_end, limit=_CHANNEL_LIMIT
            )
            hello = await asyncio.wait_for(reader.readline(), _INIT_TIMEOUT_SECONDS)
        except BaseException:  # cancelled by stop(), or timed out
            process.kill()
            raise
        if not hello:
            process.kill()
            writer.close()
            await process_exited
            raise HandlerInitError(
                f"the Lambda worker exited during init (exit status {process.returncode})"
            )
        init = json.loads(hello)
        worker = _Worker(process, reader, writer, init["initDurationMs"], init["error"])
        self._workers.add(worker)
        self._background(self._watch(worker))
        return worker

    async def _watch(self, worker: _Worker) -> None:
        """Notice a worker that died, even while idle, and put a fresh one in its place."""
        await worker.process.wait()
        worker.alive = False
        self._workers.discard(worker)
        if not self._stopping and worker.process.returncode != 0:
            log.warning(
                "Lambda worker %s exited (%s); starting a new one",
                worker.pid,
                _exit_description(worker.process.returncode),
            )
            if len(self._workers) + self._starting < self.settings.concurrency:
                self._start_worker_soon()

    async def _invoke_on(self, worker: _Worker, request_id: str, event: dict[str, Any]) -> Outcome:
        timeout = self.settings.timeout_seconds
        request = {
            "requestId": request_id,
            "deadlineMs": int(time.time() * 1000 + timeout * 1000),
            "event": event,
        }
        started = time.perf_counter()
        try:
            worker.writer.write(json.dumps(request).encode() + b"\n")
            await worker.writer.drain()
            line = await asyncio.wait_for(worker.reader.readline(), timeout)
        except TimeoutError:
            return await self._timed_out(worker, request_id, started)
        except (ConnectionError, OSError):
            line = b""
        if not line:
            return await self._died(worker, request_id, started)
        response = json.loads(line)
        return Outcome(
            request_id, response.get("result"), response.get("error"), report=response["report"]
        )

    async def _timed_out(self, worker: _Worker, request_id: str, started: float) -> Outcome:
        """Lambda stops the environment at the function timeout; so do we."""
        worker.alive = False
        worker.process.kill()
        await worker.process.wait()
        seconds = self.settings.timeout_seconds
        message = f"Task timed out after {seconds:.2f} seconds"
        print(f"{_utc_now()} {request_id} {message}", flush=True)
        return self._failed(worker, request_id, started, "timeout", "Sandbox.Timedout", message)

    async def _died(self, worker: _Worker, request_id: str, started: float) -> Outcome:
        worker.alive = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.process.wait(), 2)
        how = _exit_description(worker.process.returncode)
        message = f"RequestId: {request_id} Error: Runtime exited with error: {how}"
        print(f"{message}\nRuntime.ExitError", flush=True)
        return self._failed(worker, request_id, started, "error", "Runtime.ExitError", message)

    def _failed(
        self,
        worker: _Worker,
        request_id: str,
        started: float,
        status: str,
        error_type: str,
        message: str,
    ) -> Outcome:
        duration_ms = (time.perf_counter() - started) * 1000
        report = {
            "requestId": request_id,
            "durationMs": round(duration_ms, 2),
            "billedDurationMs": max(1, math.ceil(duration_ms)),
            "memorySizeMb": self.settings.memory_size_mb,
            "maxMemoryUsedMb": 0,
            "workerPid": worker.pid,
            "status": status,
            "errorType": error_type,
        }
        print(f"END RequestId: {request_id}\n{report_line(report)}", flush=True)
        error = {"errorType": error_type, "errorMessage": message}
        return Outcome(request_id, error=error, report=report)

    def _write_report(self, outcome: Outcome, event: dict[str, Any]) -> None:
        if self._report_file is None or outcome.report is None:
            return
        context = event.get("requestContext", {})
        record = {
            **outcome.report,
            "routeKey": context.get("routeKey"),
            "connectionId": context.get("connectionId"),
            "error": outcome.error["errorType"] if outcome.error else None,
        }
        self._report_file.write(json.dumps(record) + "\n")


def _exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "unknown"
    if returncode < 0:
        # Worded as Lambda words it: "signal: killed", "signal: segmentation fault".
        description = signal.strsignal(-returncode) or f"signal {-returncode}"
        return f"signal: {description.lower()}"
    return f"exit status {returncode}"


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


if __name__ == "__main__":
    worker_main(json.loads(sys.argv[1]))
