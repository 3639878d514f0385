"""`python -m loadtest.soak` (`make soak`): the load test under churn and faults, then
the promises checked one by one.

    python -m loadtest.soak                        # 5 minutes, the figures in the README
    python -m loadtest.soak --run-time 30s --users 24 --connect-window 3   # what make test runs

1. A local stack (over DynamoDB Local unless --dynamodb says otherwise) whose
   management API injects faults: a fifth of the posts find their recipient
   dropped without a close frame and without its $disconnect, then answer 410;
   a tenth answer 429 (throttled) and deliver nothing.
2. The locust swarm of `python -m loadtest.run`, with churn: users leave and come
   back, and some of them reset their TCP connection instead of closing it.
3. Once every user has gone, a sweep: after the Lambda's connect window, one
   message into every room that still has items, as the next message of a real
   chat would be. Its 410s are what removes the connections whose $disconnect
   was lost.

Then it checks, prints and writes (soak.md beside locust's reports):

- no delivery lost to a recipient that stayed connected, none to the wrong room,
  no duplicate;
- every injected 429 either retried into a delivery or counted `failed` in the
  sender's `sent` reply, never silently dropped (a missing delivery the reply did
  not own up to counts as lost);
- the table holds no item once everybody has gone;
- the gateway's and the Lambda workers' memory (RSS) at the end within
  --memory-bound of what it was at the start.

Exit status 0 when every promise holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import websocket

from loadtest import run as loadtest_run

SWEEP_TIMEOUT_SECONDS = 30.0


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--users", type=int, default=60, help="users (connections)")
    add("--spawn-rate", type=float, default=20, help="users started per second")
    add("--run-time", default="5m", help="how long the swarm runs (90s, 5m, ...)")
    add("--rooms", type=int, default=15, help="rooms the users are spread over")
    add("--send-interval", type=float, default=2.0, help="seconds between a user's messages")
    add("--churn-interval", type=float, default=30.0, help="mean seconds a connection lasts")
    add("--abrupt-share", type=float, default=0.3, help="share of leaves that reset TCP")
    add("--gone-rate", type=float, default=0.2, help="share of posts whose recipient is dropped")
    add("--throttle-rate", type=float, default=0.1, help="share of posts answered 429")
    add("--grace", type=float, default=5.0, help="seconds a delivery may take")
    add(
        "--connect-window",
        type=float,
        default=None,
        help="the Lambda's CONNECT_WINDOW_SECONDS (default: the Lambda's own, 30)",
    )
    add(
        "--memory-bound",
        type=float,
        default=1.5,
        help="largest end/start ratio of each process's RSS",
    )
    add("--dynamodb", default="local", help="local (DynamoDB Local), moto or a URL")
    add("--concurrency", type=int, default=4, help="the local stack's Lambda workers")
    add("--results", type=Path, default=None, help="directory for the reports")
    return parser.parse_args(argv)


# --- The stack's processes and table -----------------------------------------------------


def memory(stack: Any) -> dict[str, float]:
    """RSS in MB of the gateway and of its largest Lambda worker."""
    gateway = psutil.Process(stack.pid)
    workers = [
        child.memory_info().rss
        for child in gateway.children(recursive=True)
        if "local.runtime" in " ".join(child.cmdline())
    ]
    return {
        "gatewayMb": round(gateway.memory_info().rss / 2**20, 1),
        "workerMb": round(max(workers, default=0) / 2**20, 1),
        "workers": len(workers),
    }


def table_items(stack: Any) -> list[dict[str, Any]]:
    client, items, request = stack.dynamodb_client(), [], {"TableName": stack.table_name}
    while True:
        page = client.scan(ConsistentRead=True, **request)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            return items
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def sweep(stack: Any, connect_window: float) -> dict[str, int]:
    """One message into every room that still has members, once the connect window
    has passed: the 410s of its posts remove the connections whose $disconnect was
    lost. Then wait until the sweepers' own $disconnects have run."""
    time.sleep(connect_window + 1)
    rooms = sorted(
        {
            item["PK"]["S"][len("ROOM#") :]
            for item in table_items(stack)
            if item["PK"]["S"].startswith("ROOM#")
        }
    )
    stale = 0
    for room in rooms:
        ws = websocket.create_connection(f"{stack.ws_url}?room={room}", timeout=30)
        ws.send(json.dumps({"action": "message", "messageBody": "sweep"}))
        while (reply := json.loads(ws.recv())).get("action") == "message":
            pass
        stale += int(reply.get("stale", 0))
        ws.close()
    deadline = time.monotonic() + SWEEP_TIMEOUT_SECONDS
    while table_items(stack) and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"roomsSwept": len(rooms), "staleRemoved": stale}


# --- The run -------------------------------------------------------------------------------


def soak(arguments: argparse.Namespace) -> int:
    from local import stack as local_stack

    results = arguments.results or (
        loadtest_run.LOADTEST_DIR / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    )
    results.mkdir(parents=True, exist_ok=True)
    stack_flags = [
        *("--fault-gone-rate", str(arguments.gone_rate)),
        *("--fault-throttle-rate", str(arguments.throttle_rate)),
    ]
    env = {}
    if arguments.connect_window is not None:
        env["CONNECT_WINDOW_SECONDS"] = str(arguments.connect_window)
    connect_window = arguments.connect_window if arguments.connect_window is not None else 30.0

    with local_stack.running(
        dynamodb=arguments.dynamodb,
        concurrency=arguments.concurrency,
        env=env,
        extra_args=stack_flags,
    ) as stack:
        print(f"soak: local stack at {stack.ws_url}", flush=True)
        started = memory(stack)
        load = loadtest_run.parse_arguments(
            [
                *("--host", stack.ws_url, "--results", str(results)),
                *("--users", str(arguments.users), "--spawn-rate", str(arguments.spawn_rate)),
                *("--run-time", arguments.run_time, "--rooms", str(arguments.rooms)),
                *("--send-interval", str(arguments.send_interval), "--grace", str(arguments.grace)),
                *("--churn-interval", str(arguments.churn_interval)),
                *("--abrupt-share", str(arguments.abrupt_share)),
            ]
        )
        command = [*loadtest_run.locust_command(load, stack.ws_url, results), "--only-summary"]
        print("soak:", shlex.join(command[2:]), flush=True)
        locust_status = subprocess.call(command, cwd=loadtest_run.PROJECT_ROOT)  # noqa: S603 - our interpreter, locust
        swept = sweep(stack, connect_window)
        left_over = len(table_items(stack))
        ended = memory(stack)
        posts = stack.stats()["posts"]

    summary = loadtest_run.read_summary(results)
    report, holds = verdicts(
        summary.get("delivery", {}), posts, left_over, started, ended, arguments
    )
    text = "\n".join(
        [
            f"Soak: {arguments.users} users in {arguments.rooms} rooms for {arguments.run_time}, "
            f"a message every {arguments.send_interval:g} s each, connections lasting "
            f"{arguments.churn_interval:g} s on average ({arguments.abrupt_share:.0%} of leaves "
            f"reset TCP), {arguments.gone_rate:.0%} of posts finding their recipient dropped, "
            f"{arguments.throttle_rate:.0%} throttled; DynamoDB: {arguments.dynamodb}",
            "",
            loadtest_run.summarize(results, load, stack.ws_url),
            "",
            f"Posts: {posts['delivered']:,} delivered, {posts['injectedGone']:,} recipients "
            f"dropped (410), {posts['injectedThrottle']:,} throttled (429), {posts['gone']:,} "
            f"to connections already gone (410). Sweep: {swept['roomsSwept']} rooms, "
            f"{swept['staleRemoved']} stale connections removed.",
            "",
            "| promise | measured | holds |",
            "| --- | --- | --- |",
            *report,
        ]
    )
    print(text)
    (results / "soak.md").write_text(text + "\n")
    (results / "soak.json").write_text(
        json.dumps(
            {
                "holds": holds,
                "locustStatus": locust_status,
                "posts": posts,
                "sweep": swept,
                "tableItemsLeft": left_over,
                "memoryStart": started,
                "memoryEnd": ended,
                "delivery": summary.get("delivery", {}),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"soak: reports in {results}; {'every promise holds' if holds else 'FAILED'}")
    return 0 if holds else 1


def verdicts(
    delivery: dict[str, Any],
    posts: dict[str, int],
    left_over: int,
    started: dict[str, float],
    ended: dict[str, float],
    arguments: argparse.Namespace,
) -> tuple[list[str], bool]:
    """The promises as table rows, and whether all of them hold."""
    bound = arguments.memory_bound

    def grew(name: str) -> float:
        return ended[name] / started[name] if started[name] else 0.0

    checks = [
        (
            "no delivery lost to a recipient that stayed connected",
            f"{delivery.get('lost', '?')} lost of {delivery.get('expected', 0):,} owed "
            f"({delivery.get('received', 0):,} received, {delivery.get('late', 0):,} late)",
            delivery.get("lost") == 0 and delivery.get("expected", 0) > 0,
        ),
        (
            "none to the wrong room, none back to the sender",
            f"{delivery.get('wrong_room', '?')} / {delivery.get('echoed', '?')}",
            delivery.get("wrong_room") == 0 and delivery.get("echoed") == 0,
        ),
        ("no duplicate", str(delivery.get("duplicates", "?")), delivery.get("duplicates") == 0),
        (
            "every 429 retried into a delivery or counted failed in the `sent` reply",
            f"{posts['injectedThrottle']:,} injected; {delivery.get('server_failed', 0):,} "
            f"counted failed; {delivery.get('reported', 0):,} owed deliveries missing, "
            "all of them counted",
            posts["injectedThrottle"] > 0 and delivery.get("lost") == 0,
        ),
        ("the table is empty once everybody has gone", f"{left_over} items", left_over == 0),
        (
            f"gateway memory at the end within {bound:g}x of the start",
            f"{started['gatewayMb']:g} MB -> {ended['gatewayMb']:g} MB",
            grew("gatewayMb") <= bound,
        ),
        (
            f"Lambda worker memory at the end within {bound:g}x of the start",
            f"{started['workerMb']:g} MB -> {ended['workerMb']:g} MB ({ended['workers']} workers)",
            grew("workerMb") <= bound,
        ),
    ]
    rows = [
        f"| {promise} | {measured} | {'yes' if ok else '**NO**'} |"
        for promise, measured, ok in checks
    ]
    return rows, all(ok for _, _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    try:
        return soak(parse_arguments(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
