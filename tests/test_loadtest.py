"""The load test: its delivery accounting (loadtest/ledger.py), and short headless
locust runs against the local stack, read back from the reports they write."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from loadtest.ledger import Ledger, Tally

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# --- The accounting ---------------------------------------------------------------------
#
# Times are plain numbers: one ledger, one clock. grace 5 s, join margin 1 s: a member
# is owed a message it joined at least 1 s before and stayed connected for 5 s after.


def ledger_with_room(*members: str) -> tuple[Ledger, dict[str, int]]:
    """A ledger whose room "r" has these members, all joined at t=0."""
    ledger = Ledger(grace=5.0, join_margin=1.0, tag="t")
    return ledger, {name: ledger.joined("r", at=0.0) for name in members}


def test_an_owed_delivery_that_never_arrives_is_lost() -> None:
    ledger, member = ledger_with_room("alice", "bob", "carol")
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.received("t-1", member["bob"], "r")

    tally = ledger.settle(now=15.0)

    assert (tally.expected, tally.received, tally.lost) == (2, 1, 1)
    assert tally.failed()
    assert "t-1" in tally.lost_examples[0]


def test_a_member_that_left_within_the_grace_period_is_owed_nothing() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.left(member["bob"], at=12.0)

    tally = ledger.settle(now=15.0)

    assert (tally.expected, tally.lost, tally.excused) == (0, 0, 1)
    assert not tally.failed()


def test_a_member_that_joined_just_before_the_send_is_owed_nothing() -> None:
    ledger, member = ledger_with_room("alice")
    newcomer = ledger.joined("r", at=9.5)
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.received("t-1", newcomer, "r")

    tally = ledger.settle(now=15.0)

    assert (tally.expected, tally.bonus, tally.lost) == (0, 1, 0)


def test_a_message_is_not_settled_before_its_grace_period_ends() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    ledger.sent("t-1", member["alice"], at=10.0)

    early = ledger.settle(now=14.9)
    ledger.received("t-1", member["bob"], "r")
    settled = ledger.settle(now=15.0)

    assert (early.messages, early.pending) == (0, 1)
    assert (settled.messages, settled.received, settled.lost) == (1, 1, 0)


def test_a_delivery_after_the_grace_period_moves_from_lost_to_late() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    ledger.sent("t-1", member["alice"], at=10.0)
    settled = ledger.settle(now=15.0)

    kind = ledger.received("t-1", member["bob"], "r")
    total = Tally()
    for part in (settled, ledger.settle(now=16.0)):
        total.add(part)

    assert kind == "late"
    assert (total.expected, total.lost, total.late) == (1, 0, 1)
    assert not total.failed()


def test_a_second_copy_is_counted_as_a_duplicate_not_a_delivery() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.received("t-1", member["bob"], "r")

    kind = ledger.received("t-1", member["bob"], "r")
    tally = ledger.settle(now=15.0)

    assert kind == "duplicate"
    assert (tally.received, tally.duplicates, tally.lost) == (1, 1, 0)


def test_a_copy_in_a_member_of_another_room_is_counted_and_fails_the_run() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    stranger = ledger.joined("elsewhere", at=0.0)
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.received("t-1", member["bob"], "r")

    kind = ledger.received("t-1", stranger, "r")
    tally = ledger.settle(now=15.0)

    assert kind == "wrong room"
    assert (tally.wrong_room, tally.lost) == (1, 0)
    assert tally.failed()


def test_a_copy_labelled_with_another_room_is_counted_as_wrong_room() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    ledger.sent("t-1", member["alice"], at=10.0)

    assert ledger.received("t-1", member["bob"], "not-r") == "wrong room"


def test_the_sender_is_owed_nothing_and_a_copy_back_to_it_fails_the_run() -> None:
    ledger, member = ledger_with_room("alice")
    ledger.sent("t-1", member["alice"], at=10.0)

    kind = ledger.received("t-1", member["alice"], "r")
    tally = ledger.settle(now=15.0)

    assert kind == "echoed"
    assert (tally.expected, tally.echoed) == (0, 1)
    assert tally.failed()


def test_a_refused_or_unanswered_message_owes_nothing() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.sent("t-2", member["alice"], at=10.0)
    ledger.refused("t-1")
    ledger.unanswered("t-2")

    tally = ledger.settle(now=15.0)

    assert (tally.messages, tally.refused, tally.unanswered) == (2, 1, 1)
    assert (tally.expected, tally.lost) == (0, 0)


def test_messages_this_process_did_not_send_are_foreign() -> None:
    ledger, member = ledger_with_room("bob")

    assert ledger.received("other-process-1", member["bob"], "r") == "foreign"
    assert ledger.settle(now=1.0).foreign == 1


def test_the_sent_replies_are_summed_for_the_cross_check() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.replied("t-1", {"recipients": 3, "delivered": 1, "stale": 1, "failed": 1})

    tally = ledger.settle(now=15.0)

    assert (tally.replied, tally.server_recipients, tally.server_delivered) == (1, 3, 1)
    assert (tally.server_stale, tally.server_failed) == (1, 1)


def test_a_missing_delivery_the_sent_reply_counted_failed_is_reported_not_lost() -> None:
    ledger, member = ledger_with_room("alice", "bob", "carol", "dave")
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.received("t-1", member["bob"], "r")
    ledger.replied("t-1", {"recipients": 3, "delivered": 1, "stale": 0, "failed": 1})

    tally = ledger.settle(now=15.0)

    # Two deliveries missing, one owned up to by the server: the other is lost.
    assert (tally.expected, tally.received, tally.reported, tally.lost) == (3, 1, 1, 1)
    assert tally.failed()


def test_every_missing_delivery_reported_failed_fails_nothing() -> None:
    ledger, member = ledger_with_room("alice", "bob")
    ledger.sent("t-1", member["alice"], at=10.0)
    ledger.replied("t-1", {"recipients": 1, "delivered": 0, "stale": 0, "failed": 1})

    tally = ledger.settle(now=15.0)

    assert (tally.reported, tally.lost) == (1, 0)
    assert not tally.failed()


def test_tallies_reported_in_parts_add_up_to_one_settled_at_the_end() -> None:
    def play(ledger: Ledger, settle_along: bool) -> Tally:
        total = Tally()
        a, b, c = (ledger.joined("r", at=0.0) for _ in range(3))
        for second in range(10):
            ledger.sent(f"t-{second}", (a, b)[second % 2], at=10.0 + second)
            ledger.received(f"t-{second}", c, "r")
            if second % 3:
                ledger.received(f"t-{second}", (b, a)[second % 2], "r")
            if settle_along:
                total.add(ledger.settle(now=10.0 + second))
        ledger.left(c, at=30.0)
        total.add(ledger.settle_all())
        return total

    in_parts = play(Ledger(tag="t"), settle_along=True)
    at_the_end = play(Ledger(tag="t"), settle_along=False)

    assert in_parts.as_dict() == at_the_end.as_dict()
    assert (at_the_end.expected, at_the_end.received, at_the_end.lost) == (20, 16, 4)


# --- Headless runs on the local stack ---------------------------------------------------


def run_loadtest(results: Path, moto_endpoint: str, stack_args: str = "") -> dict[str, Any]:
    """`python -m loadtest.run`, 24 users in 3 rooms for 15 s, against a local stack on
    the session's moto server; its exit status, output and the summary it wrote."""
    command = [
        *(sys.executable, "-m", "loadtest.run", "--results", str(results)),
        *("--dynamodb", moto_endpoint, "--users", "24", "--spawn-rate", "50"),
        *("--rooms", "3", "--send-interval", "1", "--grace", "3", "--run-time", "15s"),
        f"--stack-args=--table-name loadtest-{uuid.uuid4().hex[:8]} {stack_args}",
        "--locust-args=--only-summary",
    ]
    finished = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    output = finished.stdout[-4000:] + finished.stderr[-4000:]
    summary = results / "summary.json"
    assert summary.exists(), output
    return {"status": finished.returncode, "output": output, **json.loads(summary.read_text())}


def test_a_short_run_delivers_every_owed_message_and_reports_it(
    tmp_path: Path, moto_endpoint: str
) -> None:
    run = run_loadtest(tmp_path, moto_endpoint)

    delivery, broadcast = run["delivery"], run["requests"]["broadcast"]
    assert run["status"] == 0, run["output"]
    assert delivery["received"] > 0
    assert delivery["lost"] == delivery["wrong_room"] == delivery["echoed"] == 0
    assert broadcast["count"] > 0 and broadcast["failures"] == 0
    assert (tmp_path / "locust_stats.csv").exists() and (tmp_path / "report.html").exists()
    assert "| deliveries owed |" in (tmp_path / "summary.md").read_text()


def test_dropped_connections_reconnect_and_lose_nothing_owed(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """One post in ten finds its recipient dropped (the emulator cuts it and answers
    410, with no $disconnect): users reconnect, and every delivery owed to a member
    connected throughout still arrives."""
    run = run_loadtest(tmp_path, moto_endpoint, stack_args="--fault-gone-rate 0.1")

    delivery, requests = run["delivery"], run["requests"]
    assert requests["closed"]["failures"] > 0  # connections were dropped...
    assert requests["connect"]["count"] > 24  # ...and users reconnected
    assert delivery["server_stale"] > 0
    assert delivery["expected"] > 0
    assert delivery["lost"] == delivery["wrong_room"] == 0, run["output"]
