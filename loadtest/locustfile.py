"""Broadcast load test: people chatting in rooms, over real WebSockets.

    make loadtest                                   # starts the local stack itself
    make loadtest HOST=wss://{apiId}.execute-api.{region}.amazonaws.com/prod
    locust -f loadtest/locustfile.py --headless -u 200 -r 50 -t 60s \\
        --host ws://127.0.0.1:8080/local --rooms 10 --send-interval 2

The scenario: each user joins a room and keeps a receiver reading every frame.
Once every user is connected (so the ramp-up's handshakes stay out of the
figures), each sender sends a `message` of --payload-bytes to its room every
--send-interval seconds; --senders < 1 leaves the other users listening only.
A user whose connection drops reconnects at its next turn, to the same room, and
so does one the API tells it is in no room (404). Locust records, in its stats,
CSV and HTML report (request type "WS"):

    connect    the WebSocket handshake, which includes $connect (failures name the HTTP status)
    broadcast  a sender's send -> one recipient's receipt: one sample per delivery
    fanout     a sender's send -> its `sent` reply, once the Lambda has posted to the whole room
    closed     a connection the other end closed or dropped (the sample is how long it had lived)

Latency comes from one clock: the sender puts its `time.time()` into the message
body, and the recipient compares with its own. Users of one process share that
clock exactly; across machines, the figures are off by the clocks' skew.

Every delivery is accounted for (loadtest/ledger.py): each process knows the
rooms its users are in over time and what they sent, and counts owed deliveries
against received ones, duplicates and deliveries to the wrong room. Sending stops
--grace + 1 seconds before --run-time ends, so messages in flight are counted,
not called lost. The run exits with status 2 when a delivery was lost or went to
the wrong room, with locust's usual 1 when any request failed, else 0.

Several processes (--processes N, or master and workers on several machines):
each room belongs to one process (room i to the process whose worker index is
i modulo the number of workers), so every process accounts for its own rooms on
its own clock; the workers send their counts to the master, which adds them up.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import websocket
from locust import User, events, task
from locust.runners import LocalRunner, MasterRunner, WorkerRunner

from loadtest.ledger import Ledger, Tally
from loadtest.options import add_arguments

log = logging.getLogger("loadtest")

# --- Options (loadtest/options.py: --rooms, --send-interval, --payload-bytes, ...) ---

events.init_command_line_parser.add_listener(add_arguments)


# --- Per-process state --------------------------------------------------------------


class Swarm:
    """What the users of this process share: the ledger, room assignment, whether
    everyone is connected yet, and whether sending has stopped for the end-of-run
    grace period."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.user_numbers = itertools.count()
        self.all_spawned = gevent.event.Event()
        self.connecting = 0  # users of this process whose first handshake is under way
        self.draining = False
        self.settler: gevent.Greenlet | None = None
        # On the master (or the only process): the tallies reported so far, and how
        # many messages each reporting process still had pending at its last report.
        self.totals = Tally()
        self.pending_by_process: dict[str, int] = {}

    def reset(self, options: Any) -> None:
        self.ledger = Ledger(grace=options.grace, join_margin=options.join_margin)
        self.user_numbers = itertools.count()
        self.all_spawned.clear()
        self.connecting = 0
        self.draining = False

    def wait_until_everyone_connected(self) -> None:
        """Sending starts once every user of this process has connected, so the
        ramp-up's storm of handshakes stays out of the latency figures."""
        self.all_spawned.wait()
        while self.connecting:
            gevent.sleep(0.1)


swarm = Swarm()


def worker_position(environment: Any) -> tuple[int, int]:
    """(this process's index, number of processes): rooms are split by them."""
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        workers = max(1, int(getattr(environment.parsed_options, "expect_workers", 1) or 1))
        return runner.worker_index, workers
    return 0, 1


def assign_room(environment: Any) -> tuple[str, bool]:
    """The room of this process's next user, and whether that user sends or only
    listens. Rooms are filled round robin (or to --room-size each), only from the
    rooms that belong to this process; in each room, --senders of the users send."""
    options = environment.parsed_options
    number = next(swarm.user_numbers)
    index, workers = worker_position(environment)
    prefix = options.room_prefix
    if options.room_size > 0:
        room, position = f"{prefix}-w{index}-{number // options.room_size}", number
    else:
        mine = [room for room in range(options.rooms) if room % workers == index % workers]
        if not mine:
            # Fewer rooms than processes: some rooms are shared. Accounting still only
            # pairs senders and recipients of this process, so it stays correct.
            mine = [index % options.rooms]
        room, position = f"{prefix}-{mine[number % len(mine)]}", number // len(mine)
    # Spread the senders evenly over each room's members (the first one always sends).
    sends = int((position + 1) * options.senders) > int(position * options.senders)
    return room, sends or position == 0


def room_url(host: str, room: str) -> str:
    separator = "&" if "?" in host else "?"
    return f"{host}{separator}room={room}"


def message_body(message_id: str, room: str, sent_at: float, size: int) -> dict[str, Any]:
    """The messageBody: the id and send time the accounting needs, padded to `size`
    bytes once encoded."""
    body: dict[str, Any] = {"loadtest": message_id, "sentAt": sent_at, "room": room}
    unpadded = len(json.dumps(body, separators=(",", ":"))) + len(',"padding":""')
    body["padding"] = "x" * max(0, size - unpadded)
    return body


def record(
    name: str, started: float, *, failure: str | None = None, length: int = 0, ended: float = 0.0
) -> None:
    """One sample in locust's stats: `name` took from `started` to `ended` (or now)."""
    events.request.fire(
        request_type="WS",
        name=name,
        response_time=((ended or time.time()) - started) * 1000,
        response_length=length,
        exception=Exception(failure) if failure else None,
        context={},
    )


# --- The user -----------------------------------------------------------------------


class RoomUser(User):
    """One person in one room: a connection, a receiver reading it, and a message
    every --send-interval seconds. If the connection drops, the next turn to send
    reconnects first (to the same room)."""

    def wait_time(self) -> float:
        """Paced by hand, not with locust's constant_pacing (which counts from the
        user's creation, so a random start delay would be undone and users would
        fire together): the next send is due one interval after the previous one
        was due, whatever the send itself took."""
        return max(0.0, self.next_send - time.time())

    def on_start(self) -> None:
        self.options = self.environment.parsed_options
        self.room, self.sends = assign_room(self.environment)
        self.url = room_url(self.host or "", self.room)
        self.ws: websocket.WebSocket | None = None
        self.member = 0
        self.connected_at = 0.0
        self.receiver: gevent.Greenlet | None = None
        self.stopping = False
        self.rejoin = False
        self.awaiting_reply: dict[str, float] = {}  # message id -> sent at, oldest first
        self.next_send = time.time() + self.options.send_interval
        self.leave_at = float("inf")  # set by connect() when --churn-interval is on
        swarm.connecting += 1
        try:
            self.connect()
        finally:
            swarm.connecting -= 1
        swarm.wait_until_everyone_connected()
        # Spread the users' sends over one interval, then start the pacing clock.
        gevent.sleep(random.uniform(0, self.options.send_interval))  # noqa: S311 - jitter
        self.next_send = time.time()

    @task
    def send_message(self) -> None:
        interval = self.options.send_interval
        self.next_send = max(self.next_send + interval, time.time())
        if swarm.draining:
            return
        if self.rejoin:
            self.hang_up()  # the API said this connection is in no room: start afresh
        elif self.ws is not None and time.time() >= self.leave_at:
            # Churn (--churn-interval): leave, cleanly or by dropping the TCP
            # connection (--abrupt-share), and come straight back.
            self.hang_up(abrupt=random.random() < self.options.abrupt_share)  # noqa: S311
        if self.ws is None and not self.connect():
            return
        if not self.sends:
            return  # a listener: it only reconnects when its connection drops
        message_id = swarm.ledger.new_message_id()
        sent_at = time.time()
        body = message_body(message_id, self.room, sent_at, self.options.payload_bytes)
        # The ref comes back in the reply, so replies that arrive out of order are
        # still matched to their message.
        frame = {"action": "message", "messageBody": body, "ref": message_id}
        swarm.ledger.sent(message_id, self.member, sent_at)
        self.awaiting_reply[message_id] = sent_at
        try:
            self.ws.send(json.dumps(frame, separators=(",", ":")))  # type: ignore[union-attr]
        except (websocket.WebSocketException, OSError) as error:
            del self.awaiting_reply[message_id]
            swarm.ledger.refused(message_id)
            record("fanout", sent_at, failure=f"send failed: {error}")

    def on_stop(self) -> None:
        """The run is over: close the connection, which is no failure."""
        self.stopping = True
        self.hang_up()

    def hang_up(self, abrupt: bool = False) -> None:
        """Close the connection on purpose: nothing is owed to it from now on.
        `abrupt`: reset the TCP connection without a close frame, as a phone losing
        its network would (API Gateway's $disconnect then reports 1006)."""
        self.rejoin = False
        receiver, ws = getattr(self, "receiver", None), getattr(self, "ws", None)
        self.receiver = self.ws = None
        if receiver is not None:
            receiver.kill()  # before closing: only one greenlet may read the socket
        if ws is not None:
            swarm.ledger.left(self.member, time.time())
            with contextlib.suppress(websocket.WebSocketException, OSError):
                if abrupt and ws.sock is not None:
                    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
                    ws.sock.close()
                else:
                    ws.close(timeout=2)
        for message_id in self.awaiting_reply:
            swarm.ledger.unanswered(message_id)
        self.awaiting_reply.clear()

    # --- Connecting -------------------------------------------------------------------

    def connect(self) -> bool:
        started = time.time()
        try:
            ws = websocket.create_connection(self.url, timeout=30, enable_multithread=False)
        except websocket.WebSocketBadStatusException as error:
            record("connect", started, failure=f"HTTP {error.status_code}")
            return False
        except (websocket.WebSocketException, OSError) as error:
            record("connect", started, failure=f"{type(error).__name__}: {error}")
            return False
        ws.settimeout(None)  # the receiver waits as long as it takes
        self.connected_at = time.time()
        record("connect", started, ended=self.connected_at)
        self.ws = ws
        self.member = swarm.ledger.joined(self.room, self.connected_at)
        self.receiver = gevent.spawn(self.receive, ws, self.member)
        churn = self.options.churn_interval
        # Connections last an exponentially distributed time: a few long, many short.
        lasts = random.expovariate(1 / churn) if churn else float("inf")
        self.leave_at = self.connected_at + lasts
        return True

    # --- Receiving --------------------------------------------------------------------

    def receive(self, ws: websocket.WebSocket, member: int) -> None:
        """Read frames until the connection ends. Runs in its own greenlet: the
        socket is gevent's (locust patches it), so a read waits without blocking
        the other users, and each frame ends with a yield so a busy connection
        cannot starve the rest."""
        reason = "connection closed"
        while True:
            try:
                opcode, frame = ws.recv_data_frame(True)
            except (websocket.WebSocketException, OSError) as error:
                reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                reason = close_reason(frame.data)
                break
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self.on_text(frame.data.decode("utf-8", "replace"), member)
            gevent.sleep(0)
        self.connection_ended(ws, member, reason)

    def on_text(self, text: str, member: int) -> None:
        now = time.time()
        try:
            frame = json.loads(text)
        except ValueError:
            record("fanout", now, failure=f"unreadable frame: {text[:80]!r}")
            return
        if not isinstance(frame, dict):
            return
        action = frame.get("action")
        if action == "message":
            self.on_delivery(frame, member, len(text), now)
        elif action == "sent":
            self.on_reply(frame, now)
        elif action == "error":
            self.on_refusal(frame, f"error {frame.get('status')}: {frame.get('error')}", now)
            # 404: the connection is in no room (its items are gone). As the error
            # says, a client reconnects; the next turn to send does.
            self.rejoin = self.rejoin or frame.get("status") == 404
        elif action is None and "message" in frame:
            # API Gateway's own error frame: {"message": "Internal server error", ...}
            self.on_refusal(frame, str(frame["message"]), now)

    def on_delivery(self, frame: dict[str, Any], member: int, length: int, now: float) -> None:
        body = frame.get("messageBody")
        if not isinstance(body, dict) or "loadtest" not in body:
            swarm.ledger.foreign()  # someone else's message, not the load test's
            return
        kind = swarm.ledger.received(str(body["loadtest"]), member, str(frame.get("room")))
        if kind == "duplicate":
            return  # counted by the ledger; not a second delivery
        sent_at = float(body.get("sentAt") or now)
        failure = MISDELIVERIES.get(kind)
        record("broadcast", sent_at, failure=failure, length=length, ended=now)

    def answered(self, frame: dict[str, Any]) -> tuple[str, float] | None:
        """The message a reply answers: the one its `ref` names or, from an API that
        does not echo refs, this user's oldest unanswered message."""
        ref = frame.get("ref")
        if ref in self.awaiting_reply:
            return ref, self.awaiting_reply.pop(ref)
        if not self.awaiting_reply:
            return None
        oldest = next(iter(self.awaiting_reply))
        return oldest, self.awaiting_reply.pop(oldest)

    def on_reply(self, frame: dict[str, Any], now: float) -> None:
        """A `sent` reply: the fan-out of one of this user's messages is done."""
        answered = self.answered(frame)
        if answered is None:
            return
        message_id, sent_at = answered
        swarm.ledger.replied(message_id, frame)
        failed, recipients = int(frame.get("failed") or 0), int(frame.get("recipients") or 0)
        failure = f"{failed} of {recipients} recipients failed" if failed else None
        record("fanout", sent_at, failure=failure, length=recipients, ended=now)

    def on_refusal(self, frame: dict[str, Any], reason: str, now: float) -> None:
        """An error instead of `sent`: the sender knows it failed, so no delivery is owed."""
        answered = self.answered(frame)
        if answered is None:
            record("fanout", now, failure=reason, ended=now)
            return
        message_id, sent_at = answered
        swarm.ledger.refused(message_id)
        record("fanout", sent_at, failure=reason, ended=now)

    def connection_ended(self, ws: websocket.WebSocket, member: int, reason: str) -> None:
        now = time.time()
        swarm.ledger.left(member, now)
        if self.stopping:
            return
        record("closed", self.connected_at, failure=reason, ended=now)
        for message_id, sent_at in self.awaiting_reply.items():
            swarm.ledger.unanswered(message_id)
            record("fanout", sent_at, failure="no reply: the connection closed", ended=now)
        self.awaiting_reply.clear()
        if self.ws is ws:
            self.ws = None
        with contextlib.suppress(websocket.WebSocketException, OSError):
            ws.shutdown()


# SO_LINGER on, 0 seconds: close() resets the connection instead of closing it.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)

MISDELIVERIES = {
    "wrong room": "delivered to a member of another room",
    "echoed": "delivered back to its own sender",
}


def close_reason(data: bytes) -> str:
    if len(data) < 2:
        return "closed without a status code"
    code = int.from_bytes(data[:2], "big")
    text = data[2:].decode("utf-8", "replace")
    return f"closed {code}{': ' + text if text else ''}"


# --- Coordinating the processes -----------------------------------------------------


@events.init.add_listener
def on_init(environment: Any, **_: Any) -> None:
    runner = environment.runner
    options = environment.parsed_options
    if options is not None and not isinstance(runner, WorkerRunner) and not options.room_prefix:
        # Workers receive the master's custom options, this one included.
        options.room_prefix = f"lt{os.urandom(4).hex()}"
    if isinstance(runner, MasterRunner | LocalRunner):
        runner.register_message("delivery_report", on_delivery_report)
    if isinstance(runner, WorkerRunner | LocalRunner):
        runner.register_message("drain", on_drain)


@events.test_start.add_listener
def on_test_start(environment: Any, **_: Any) -> None:
    runner, options = environment.runner, environment.parsed_options
    if isinstance(runner, WorkerRunner | LocalRunner):
        swarm.reset(options)
        swarm.settler = gevent.spawn(settle_every_second, environment)
    if isinstance(runner, MasterRunner | LocalRunner):
        swarm.totals, swarm.pending_by_process = Tally(), {}
        run_time = getattr(options, "run_time", None)
        lead = options.grace + 1
        if run_time and run_time > lead:
            gevent.spawn_later(run_time - lead, runner.send_message, "drain")
        elif run_time:
            log.warning("--run-time %ss leaves no time to drain (--grace %s + 1)", run_time, lead)


@events.spawning_complete.add_listener
def on_spawning_complete(**_: Any) -> None:
    swarm.all_spawned.set()


def on_drain(environment: Any, **_: Any) -> None:
    """Stop sending; keep receiving, so the last messages are delivered and settled."""
    swarm.draining = True


def settle_every_second(environment: Any) -> None:
    while True:
        gevent.sleep(1.0)
        report(environment, swarm.ledger.settle(time.time()))


def report(environment: Any, tally: Tally) -> None:
    environment.runner.send_message("delivery_report", tally.as_dict())


@events.test_stop.add_listener
def on_test_stop(environment: Any, **_: Any) -> None:
    """Every user has closed its connection: settle what is left and report it."""
    if isinstance(environment.runner, WorkerRunner | LocalRunner) and swarm.settler is not None:
        swarm.settler.kill()
        swarm.settler = None
        report(environment, swarm.ledger.settle_all())


def on_delivery_report(environment: Any, msg: Any, **_: Any) -> None:
    tally = Tally.from_dict(msg.data)
    swarm.totals.add(tally)
    swarm.pending_by_process[str(msg.node_id)] = tally.pending


@events.quitting.add_listener
def on_quitting(environment: Any, **_: Any) -> None:
    """Print the accounting, write the run's summary if asked, and fail the run
    (exit status 2) on any lost or misrouted delivery."""
    if isinstance(environment.runner, WorkerRunner):
        return
    totals = swarm.totals
    totals.pending = sum(swarm.pending_by_process.values())
    print(delivery_summary(totals))
    path = environment.parsed_options.summary_json
    if path:
        summary = {"delivery": totals.as_dict(), "requests": request_summary(environment)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")
    if totals.failed() or totals.pending:
        environment.process_exit_code = 2


def request_summary(environment: Any) -> dict[str, dict[str, float]]:
    """Locust's final figures per request name (its CSV is written once a second,
    so it can miss the last moment; these cannot)."""
    summary = {}
    for name in ("broadcast", "fanout", "connect", "closed"):
        entry = environment.stats.get(name, "WS")
        summary[name] = {
            "count": entry.num_requests,
            "failures": entry.num_failures,
            "perSecond": round(entry.total_rps, 2),
            "p50": entry.get_response_time_percentile(0.50),
            "p95": entry.get_response_time_percentile(0.95),
            "p99": entry.get_response_time_percentile(0.99),
            "max": entry.max_response_time,
        }
    return summary


def delivery_summary(totals: Tally) -> str:
    verdict = "FAILED" if totals.failed() or totals.pending else "ok"
    lines = [
        f"Delivery accounting ({verdict}):",
        f"  messages settled        {totals.messages:>10,}  ({totals.refused:,} refused,"
        f" {totals.unanswered:,} unanswered)",
        f"  deliveries owed         {totals.expected:>10,}",
        f"  received in time        {totals.received:>10,}",
        f"  received late           {totals.late:>10,}  (after --grace)",
        f"  lost                    {totals.lost:>10,}",
        f"  duplicates              {totals.duplicates:>10,}",
        f"  wrong room / to sender  {totals.wrong_room:>10,} / {totals.echoed:,}",
        f"  not owed, received      {totals.bonus:>10,}  (joined or left around the send)",
        f"  not owed, missed        {totals.excused:>10,}",
        f"  `sent` replies: {totals.server_delivered:,} delivered, {totals.server_stale:,} stale,"
        f" {totals.server_failed:,} failed of {totals.server_recipients:,} recipients",
    ]
    if totals.pending:
        lines.append(f"  NOT SETTLED: {totals.pending:,} messages (a process did not report)")
    lines += [f"  lost: {example}" for example in totals.lost_examples]
    return "\n".join(lines)
