"""`python -m loadtest.run`: one headless locust run, its reports, and a summary.

    python -m loadtest.run                         # against a local stack started here
    python -m loadtest.run --host wss://{apiId}.execute-api.{region}.amazonaws.com/prod
    python -m loadtest.run --users 500 --processes 2 --rooms 25 --send-interval 1

Without --host it starts the local stack (`local.stack`, on a free port, over
DynamoDB Local unless --dynamodb says otherwise) and stops it afterwards. Locust
writes its CSV files and HTML report, and the locustfile its delivery accounting,
into one directory (default loadtest/results/<timestamp>/); this script then
prints a summary table, saves it there as summary.md, and exits with locust's
status: 0 clean, 1 some request failed, 2 a delivery was lost or went to the
wrong room.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtest.options import add_arguments

LOADTEST_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = LOADTEST_DIR.parent
LOCUSTFILE = LOADTEST_DIR / "locustfile.py"
CSV_PREFIX = "locust"  # locust_stats.csv, locust_failures.csv, ...
SUMMARY_JSON = "summary.json"  # the locustfile's: delivery accounting, latency percentiles
HARNESS_OPTIONS = [
    "rooms",
    "room_size",
    "senders",
    "send_interval",
    "payload_bytes",
    "grace",
    "join_margin",
    "churn_interval",
    "abrupt_share",
    "room_prefix",
]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default="", help="ws:// or wss:// URL of a stage; empty: start the local stack")
    add("--users", type=int, default=200, help="users (connections)")
    add("--spawn-rate", type=float, default=50, help="users started per second")
    add("--run-time", default="60s", help="how long the run lasts (locust's format: 90s, 5m)")
    add("--processes", type=int, default=0, help="locust worker processes (0: just one process)")
    add("--results", type=Path, default=None, help="directory for the reports")
    add(
        "--dynamodb",
        default="local",
        help="the local stack's DynamoDB: local (DynamoDB Local), moto or a URL",
    )
    add("--concurrency", type=int, default=4, help="the local stack's Lambda workers")
    add(
        "--stack-args",
        default="",
        help='more flags for the local stack, e.g. "--fault-gone-rate 0.1"',
    )
    add(
        "--locust-args",
        default="",
        help='more flags for locust, e.g. "--loglevel DEBUG"',
    )
    harness = parser.add_argument_group("the scenario (loadtest/locustfile.py)")
    add_arguments(harness, report_file=False)
    return parser.parse_args(argv)


# --- Running --------------------------------------------------------------------------


@contextlib.contextmanager
def target(arguments: argparse.Namespace) -> Iterator[str]:
    """The URL to load: --host, or a local stack's, started for the run."""
    if arguments.host:
        yield arguments.host
        return
    from local import stack

    with stack.running(
        dynamodb=arguments.dynamodb,
        concurrency=arguments.concurrency,
        extra_args=shlex.split(arguments.stack_args),
    ) as local_stack:
        print(f"loadtest: local stack at {local_stack.ws_url}", flush=True)
        yield local_stack.ws_url


def locust_command(arguments: argparse.Namespace, host: str, results: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "--locustfile",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(arguments.users),
        "--spawn-rate",
        str(arguments.spawn_rate),
        "--run-time",
        arguments.run_time,
        "--host",
        host,
        "--csv",
        str(results / CSV_PREFIX),
        "--html",
        str(results / "report.html"),
        "--summary-json",
        str(results / SUMMARY_JSON),
    ]
    if arguments.processes:
        command += ["--processes", str(arguments.processes)]
    for name in HARNESS_OPTIONS:
        value = getattr(arguments, name)
        if value not in ("", None):
            command += [f"--{name.replace('_', '-')}", str(value)]
    return command + shlex.split(arguments.locust_args)


def run(arguments: argparse.Namespace) -> int:
    results = arguments.results or LOADTEST_DIR / "results" / time.strftime("%Y%m%d-%H%M%S")
    results.mkdir(parents=True, exist_ok=True)
    with target(arguments) as host:
        command = locust_command(arguments, host, results)
        print("loadtest:", shlex.join(command[2:]), flush=True)
        status = subprocess.call(command, cwd=PROJECT_ROOT)  # noqa: S603 - our interpreter, locust
    summary = summarize(results, arguments, host)
    print(summary)
    (results / "summary.md").write_text(summary + "\n")
    print(f"loadtest: reports in {results} (exit status {status})")
    return status


# --- The summary ----------------------------------------------------------------------


def read_failures(results: Path) -> list[dict[str, str]]:
    path = results / f"{CSV_PREFIX}_failures.csv"
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return sorted(csv.DictReader(file), key=lambda row: -int(row["Occurrences"]))


def read_summary(results: Path) -> dict[str, Any]:
    path = results / SUMMARY_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def summarize(results: Path, arguments: argparse.Namespace, host: str) -> str:
    """A markdown summary of the run: latency percentiles, rates, and the accounting."""
    summary, failures = read_summary(results), read_failures(results)
    if not summary:
        return "No summary was written: the run did not finish."
    requests, delivery = summary["requests"], summary["delivery"]
    rooms = f"rooms of {arguments.room_size}" if arguments.room_size else f"{arguments.rooms} rooms"
    lines = [
        f"{arguments.users} users in {rooms}, a {arguments.payload_bytes}-byte message every "
        f"{arguments.send_interval:g} s from each, {arguments.run_time}, against {host}",
        "",
        "| | p50 ms | p95 ms | p99 ms | samples | failures | per second |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "broadcast": "broadcast (send → each recipient)",
        "fanout": "fan-out (send → `sent` reply)",
        "connect": "connect (handshake + $connect)",
    }
    for name, label in names.items():
        row = requests[name]
        lines.append(
            f"| {label} | {row['p50']:,.0f} | {row['p95']:,.0f} | {row['p99']:,.0f} | "
            f"{row['count']:,} | {row['failures']:,} | {row['perSecond']:,.1f} |"
        )
    lines += [
        "",
        "| deliveries owed | received | lost | late | duplicates | wrong room | to sender |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| {expected:,} | {received:,} | {lost:,} | {late:,} | {duplicates:,} | "
        "{wrong_room:,} | {echoed:,} |".format(**delivery),
    ]
    if delivery.get("pending"):
        lines.append(f"\n{delivery['pending']:,} messages were never settled.")
    if failures:
        lines += ["", "Failures (most frequent first):"]
        lines += [
            f"- {row['Name']}: {row['Error']} ({int(row['Occurrences']):,})" for row in failures[:8]
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        return run(arguments)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
