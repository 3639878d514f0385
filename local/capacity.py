"""How much the local gateway holds: `python -m local.capacity` (or `make capacity`).

A benchmark, not a test. It opens N WebSocket connections to a local stack
hosting a trivial Lambda, then posts messages to them through the management
API from a SEPARATE process (SigV4-signed, over keep-alive connections, like
the Lambda's fan-out), and reports:

- connections held (all N still open at the end),
- posts per second through the management API, and
- the gateway process's own CPU time per post (user + system, from the OS),
  which is what matters on a shared machine, whatever the wall clock says.

For scale it feeds the same number of sockets from a bare aiohttp server, the
floor of the same work in the same library: a POST per message that sends one
frame (no signature check, no checks at all), and an in-process loop that
sends a frame to every socket (no HTTP at all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The trivial Lambda the stack hosts: accepts every connection, replies nothing."""
    return {"statusCode": 200}


# --- Holding the connections (this process) -----------------------------------------


class Clients:
    """N WebSocket clients that count the frames they receive."""

    def __init__(self) -> None:
        self.sockets: list[Any] = []
        self.received = 0
        self._readers: list[asyncio.Task[Any]] = []
        self._session: Any = None

    async def open(self, url: str, count: int, parallel: int = 100) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        )
        gate = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with gate:
                ws = await self._session.ws_connect(url, autoping=True, max_msg_size=0)
            self.sockets.append(ws)
            self._readers.append(asyncio.ensure_future(self._read(ws)))

        await asyncio.gather(*(one() for _ in range(count)))

    async def _read(self, ws: Any) -> None:
        async for _ in ws:
            self.received += 1

    async def wait_for(self, frames: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.received < frames:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def open_count(self) -> int:
        return sum(1 for ws in self.sockets if not ws.closed)

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        if self._session is not None:
            await self._session.close()


# --- Posting (a separate process) ----------------------------------------------------


async def post_all(
    base_url: str, targets: list[str], posts: int, concurrency: int, payload: bytes, sign: bool
) -> float:
    """POST `payload` to `{base_url}/{target}` `posts` times, round robin; the seconds taken.

    The requests are signed before the clock starts: signing is the caller's work
    (the Lambda's), not the gateway's, and would otherwise be what limits the rate."""
    import aiohttp
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from local.server import CREDENTIALS, REGION

    signer = SigV4Auth(
        Credentials(CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]),
        "execute-api",
        REGION,
    )
    requests: list[tuple[str, dict[str, str]]] = []
    for number in range(posts):
        url = f"{base_url}/{targets[number % len(targets)]}"
        headers: dict[str, str] = {}
        if sign:
            request = AWSRequest(method="POST", url=url, data=payload)
            signer.add_auth(request)
            headers = dict(request.headers)
        requests.append((url, headers))
    pending = iter(requests)
    failures: dict[int, int] = {}

    async def worker(session: aiohttp.ClientSession) -> None:
        for url, headers in pending:
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    failures[response.status] = failures.get(response.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, skip_auto_headers=["Content-Type"]
    ) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        print(f"poster: non-200 answers {failures}", file=sys.stderr)
    return elapsed


def run_poster(arguments: list[str], job: dict[str, Any]) -> float:
    """Run post_all() in a child process (its CPU is not the gateway's)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(job, file)
    try:
        output = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "local.capacity", "--poster", file.name, *arguments],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(file.name)
    return float(output.strip().splitlines()[-1])


def _poster_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    elapsed = asyncio.run(
        post_all(
            job["baseUrl"],
            job["targets"],
            job["posts"],
            job["concurrency"],
            b"x" * job["payloadBytes"],
            job["sign"],
        )
    )
    print(elapsed)


# --- The floor: a bare aiohttp server (a separate process) --------------------------


def bare_server_main(ready_path: str) -> None:
    """WebSockets on /ws; POST /post/{index} sends the body to socket `index`;
    POST /broadcast?rounds=R sends it to every socket R times (once by default).
    Writes its port to `ready_path` when it listens. `make bench` uses it too."""
    from aiohttp import web

    sockets: list[web.WebSocketResponse] = []

    async def accept(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        sockets.append(ws)
        async for _ in ws:
            pass
        return ws

    async def post(request: web.Request) -> web.Response:
        await sockets[int(request.match_info["index"])].send_str((await request.read()).decode())
        return web.Response()

    async def broadcast(request: web.Request) -> web.Response:
        text = await request.text()
        for _ in range(int(request.query.get("rounds", "1"))):
            for ws in sockets:
                await ws.send_str(text)
        return web.Response()

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/ws", accept)
        app.router.add_post("/post/{index}", post)
        app.router.add_post("/broadcast", broadcast)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        Path(ready_path).write_text(str(port))
        await asyncio.Event().wait()

    asyncio.run(main())


# --- The benchmark -------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _measure(
    name: str,
    pid: int,
    clients: Clients,
    job: dict[str, Any],
) -> dict[str, Any]:
    expected = clients.received + job["posts"]
    cpu_before = _cpu_seconds(pid)
    elapsed = await asyncio.to_thread(run_poster, [], job)
    delivered = await clients.wait_for(expected, timeout=60)
    cpu = _cpu_seconds(pid) - cpu_before
    return {
        "name": name,
        "posts": job["posts"],
        "postsPerSecond": job["posts"] / elapsed,
        "cpuMsPerPost": cpu * 1000 / job["posts"],
        "allDelivered": delivered,
    }


async def benchmark(options: argparse.Namespace) -> list[dict[str, Any]]:
    from local import stack

    results = []
    job = {
        "posts": options.posts,
        "concurrency": options.post_concurrency,
        "payloadBytes": options.payload_bytes,
    }

    for verify in (True, False):
        with stack.running(handler="local.capacity.handler", verify_sigv4=verify) as local_stack:
            clients = Clients()
            await clients.open(local_stack.ws_url, options.connections)
            targets = [c["connectionId"] for c in local_stack.connections() if c["established"]]
            name = "emulator, SigV4 checked" if verify else "emulator, --no-verify-sigv4"
            results.append(
                await _measure(
                    name,
                    local_stack.pid,
                    clients,
                    {
                        **job,
                        "baseUrl": f"{local_stack.callback_url}/@connections",
                        "targets": targets,
                        "sign": True,
                    },
                )
            )
            results[-1]["held"] = f"{len(local_stack.connections())}/{options.connections}"
            await clients.close()

    with tempfile.TemporaryDirectory() as directory:
        ready = Path(directory) / "port"
        bare_server = [sys.executable, "-m", "local.capacity", "--bare-server", str(ready)]
        server = subprocess.Popen(bare_server)  # noqa: S603 - our own interpreter and module
        try:
            while not ready.exists():
                await asyncio.sleep(0.05)
            base = f"http://127.0.0.1:{ready.read_text()}"
            clients = Clients()
            await clients.open(f"ws://{base.removeprefix('http://')}/ws", options.connections)
            targets = [str(index) for index in range(options.connections)]
            results.append(
                await _measure(
                    "bare aiohttp: POST -> one frame",
                    server.pid,
                    clients,
                    {**job, "baseUrl": f"{base}/post", "targets": targets, "sign": False},
                )
            )
            rounds = max(1, options.posts // options.connections)
            expected = clients.received + rounds * options.connections
            cpu_before = _cpu_seconds(server.pid)
            import aiohttp

            async with aiohttp.ClientSession() as session:
                started = time.perf_counter()
                await session.post(
                    f"{base}/broadcast?rounds={rounds}", data="x" * options.payload_bytes
                )
                elapsed = time.perf_counter() - started
            delivered = await clients.wait_for(expected, timeout=60)
            frames = rounds * options.connections
            results.append(
                {
                    "name": "bare aiohttp: in-process loop",
                    "posts": frames,
                    "postsPerSecond": frames / elapsed,
                    "cpuMsPerPost": (_cpu_seconds(server.pid) - cpu_before) * 1000 / frames,
                    "allDelivered": delivered,
                }
            )
            await clients.close()
        finally:
            server.terminate()
            server.wait()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m local.capacity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--posts", type=int, default=20000)
    parser.add_argument("--post-concurrency", type=int, default=32)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--poster", help=argparse.SUPPRESS)
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.poster:
        _poster_main(options.poster)
        return 0
    if options.bare_server:
        bare_server_main(options.bare_server)
        return 0

    results = asyncio.run(benchmark(options))
    if options.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"{options.connections} connections, {options.posts} posts of {options.payload_bytes} "
        f"bytes, {options.post_concurrency} concurrent posters, {os.cpu_count()} CPUs"
    )
    print(f"{'':36}{'posts/s':>10}{'CPU per post':>16}  held       all delivered")
    for result in results:
        rate, cpu = result["postsPerSecond"], result["cpuMsPerPost"]
        print(
            f"{result['name']:36}{rate:>10,.0f}{cpu:>13.3f} ms"
            f"  {result.get('held', ''):10} {result['allDelivered']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
