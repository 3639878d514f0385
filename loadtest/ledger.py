"""Delivery accounting for the load test: which deliveries were owed, and which arrived.

A load test that only measures latency cannot tell a fast system from one that
silently drops messages. The ledger knows every message this process sent and
every room membership of this process's users over time, so when a message is
settled it can say, for each member of the room, whether a delivery was owed
and whether it arrived.

A delivery is owed (counted in `expected`) to every member of the sender's room,
except the sender, that

- joined at least `join_margin` seconds before the send (0 by default: the
  broadcast reads the room strongly consistently, so a member whose handshake
  completed before the send is in the room; a handler that reads eventually
  consistently may miss a member for a moment after it joined); and
- was still connected `grace` seconds after the send: a member that left (or
  was dropped) sooner may have been gone when its turn came.

A message is settled `grace` seconds after it was sent. An owed delivery that
has not arrived by then is `reported` when the sender's `sent` reply counted
that many recipients `failed` (the sender was told: a post throttled on every
retry, say), and otherwise `lost`: silently dropped, the one thing a broadcast
must never do; if it turns up later after all (within
`keep_settled` seconds), it moves from `lost` to `late`: slow, not lost.
Deliveries to members outside the margins are counted as `bonus` when they
arrive and `excused` when they do not: neither required nor wrong. Every
receipt is also checked on arrival: a second copy is a `duplicate`, a copy in a
member of another room is `wrong_room`, a copy back to its own sender is
`echoed`, and a message this process did not send (another process's user, or
someone else in the room) is `foreign` and otherwise ignored.

Everything here is plain Python, without locust or gevent, driven by the times
the caller passes in, so these rules are unit-tested directly. One clock: every
time given to one ledger must come from the same process's `time.time()`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# How many lost deliveries a tally describes in full, for a human to chase.
LOST_EXAMPLES = 10


@dataclass
class Tally:
    """Counts of settled messages and their deliveries. Tallies add up, so each
    process can report what changed since its last report (a late arrival is
    lost -1, late +1) and the totals stay exact however the reports are split."""

    messages: int = 0  # settled messages (refused and unanswered ones included)
    refused: int = 0  # messages the API answered with an error: nothing was owed
    unanswered: int = 0  # the sender's connection closed before any reply: nothing was owed
    expected: int = 0  # owed deliveries
    received: int = 0  # owed deliveries that arrived within the grace period
    lost: int = 0  # owed deliveries that never arrived, and no `sent` reply said so
    reported: int = 0  # owed deliveries that never arrived, counted `failed` by the reply
    late: int = 0  # owed deliveries that arrived after the grace period
    excused: int = 0  # not owed (member joined or left around the send) and not received
    bonus: int = 0  # not owed, received anyway
    duplicates: int = 0  # copies beyond the first of a message in one member
    wrong_room: int = 0  # copies in a member of another room
    echoed: int = 0  # copies back to the sender itself
    foreign: int = 0  # messages this process did not send
    # What the senders' `sent` replies said, summed over settled messages.
    replied: int = 0  # messages that got a `sent` reply
    server_recipients: int = 0
    server_delivered: int = 0
    server_stale: int = 0
    server_failed: int = 0
    pending: int = 0  # messages not yet settled when the tally was taken (not additive)
    lost_examples: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        room = LOST_EXAMPLES - len(self.lost_examples)
        self.lost_examples += other.lost_examples[:room]

    def failed(self) -> bool:
        """Whether the run must fail: a lost or misrouted delivery is a bug, whatever
        the latency figures say. Late deliveries show in the latency; duplicates are
        reported but allowed (a post retried after a dropped connection may deliver
        twice, and each copy carries the message's id)."""
        return bool(self.lost or self.wrong_room or self.echoed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Tally:
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in document.items() if key in known})


# The additive fields of a Tally (everything but `pending` and `lost_examples`).
COUNTS = [item.name for item in fields(Tally) if item.name not in ("pending", "lost_examples")]


@dataclass
class Member:
    """One connection of one user: a user that reconnects is a new member."""

    key: int
    room: str
    joined: float
    left: float | None = None


@dataclass
class Sent:
    """One message this process sent, from the send until it is forgotten."""

    message_id: str
    room: str
    sender: int  # the sending member's key
    sent_at: float
    receivers: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)  # owed members that had nothing when settled
    refused: bool = False
    unanswered: bool = False
    reply: dict[str, int] | None = None  # recipients / delivered / stale / failed


class Ledger:
    """The deliveries of one process's users. See the module's docstring."""

    def __init__(
        self,
        grace: float = 5.0,
        join_margin: float = 0.0,
        keep_settled: float = 60.0,
        tag: str = "",
    ) -> None:
        self.grace = grace
        self.join_margin = join_margin
        self.keep_settled = keep_settled
        # Message ids start with this process's tag, so a message from another
        # process is told apart from one of ours.
        self.tag = tag or os.urandom(4).hex()
        self._numbers = itertools.count(1)
        self._member_keys = itertools.count(1)
        self._members: dict[int, Member] = {}
        self._rooms: dict[str, dict[int, Member]] = {}
        self._pending: dict[str, Sent] = {}  # in the order sent
        self._settled: dict[str, Sent] = {}  # kept a while for late arrivals
        self._changes = Tally()  # counted on arrival, reported with the next settle

    # --- What the users tell the ledger -----------------------------------------------

    def joined(self, room: str, at: float) -> int:
        """A connection to `room` is open (its handshake, so its $connect, is done);
        the member's key."""
        member = Member(next(self._member_keys), room, at)
        self._members[member.key] = member
        self._rooms.setdefault(room, {})[member.key] = member
        return member.key

    def left(self, member: int, at: float) -> None:
        """The member's connection is closed, by its user or by the other end."""
        if member in self._members and self._members[member].left is None:
            self._members[member].left = at

    def new_message_id(self) -> str:
        return f"{self.tag}-{next(self._numbers)}"

    def sent(self, message_id: str, sender: int, at: float) -> None:
        """`sender` sent `message_id` to its room at `at` (taken just before the send)."""
        room = self._members[sender].room
        self._pending[message_id] = Sent(message_id, room, sender, at)

    def replied(self, message_id: str, reply: dict[str, Any]) -> None:
        """The sender's `sent` reply: what the server says it did."""
        message = self._pending.get(message_id)
        if message is not None:
            counts = ("recipients", "delivered", "stale", "failed")
            message.reply = {name: int(reply.get(name) or 0) for name in counts}

    def refused(self, message_id: str) -> None:
        """The API answered the send with an error: no delivery is owed."""
        message = self._pending.get(message_id)
        if message is not None:
            message.refused = True

    def unanswered(self, message_id: str) -> None:
        """The sender's connection closed before the reply came: the frame may never
        have been read, so no delivery is owed (those that arrive are a bonus)."""
        message = self._pending.get(message_id)
        if message is not None:
            message.unanswered = True

    def foreign(self) -> None:
        """A member received a message that is not from this load test at all."""
        self._changes.foreign += 1

    def received(self, message_id: str, recipient: int, room: str) -> str:
        """`recipient` received `message_id`, labelled with `room` by the server. What
        kind of receipt it was: "ok", "late", "duplicate", "wrong room", "echoed" or
        "foreign"."""
        message = self._pending.get(message_id) or self._settled.get(message_id)
        if message is None and message_id.startswith(f"{self.tag}-"):
            return "late"  # ours, but so late it was forgotten: it stays counted as lost
        if message is None:
            self._changes.foreign += 1
            return "foreign"
        member = self._members.get(recipient)
        if member is None or member.room != message.room or room != message.room:
            self._changes.wrong_room += 1
            return "wrong room"
        if recipient == message.sender:
            self._changes.echoed += 1
            return "echoed"
        if recipient in message.receivers:
            self._changes.duplicates += 1
            return "duplicate"
        message.receivers.add(recipient)
        if message.message_id in self._pending:
            return "ok"
        # After settling: an owed delivery was slow, not lost; any other was a bonus.
        if recipient in message.lost:
            message.lost.discard(recipient)
            self._changes.lost -= 1
            self._changes.late += 1
        else:
            self._changes.bonus += 1
        return "late"

    # --- Settling ---------------------------------------------------------------------

    def settle(self, now: float) -> Tally:
        """Settle every message sent at least `grace` seconds before `now`. Returns
        what changed since the last call: the messages settled, and what arrived
        meanwhile (duplicates, late deliveries, ...)."""
        tally, self._changes = self._changes, Tally()
        while self._pending:
            message = next(iter(self._pending.values()))
            if message.sent_at + self.grace > now:
                break
            del self._pending[message.message_id]
            self._settle_one(message, tally)
            self._settled[message.message_id] = message
        self._forget(now)
        tally.pending = len(self._pending)
        return tally

    def settle_all(self) -> Tally:
        """Settle everything, at the end of a run: every user has closed its
        connection by now, so each message is judged on who was connected when."""
        return self.settle(float("inf"))

    def _settle_one(self, message: Sent, tally: Tally) -> None:
        tally.messages += 1
        if message.reply is not None:
            tally.replied += 1
            tally.server_recipients += message.reply["recipients"]
            tally.server_delivered += message.reply["delivered"]
            tally.server_stale += message.reply["stale"]
            tally.server_failed += message.reply["failed"]
        if message.refused:
            tally.refused += 1
        elif message.unanswered:
            tally.unanswered += 1
        owes = not (message.refused or message.unanswered)
        # Recipients the server owned up to: missing deliveries up to this many were
        # reported to the sender, not lost.
        reported_left = message.reply["failed"] if message.reply else 0
        for member in self._rooms.get(message.room, {}).values():
            if member.key == message.sender:
                continue
            got = member.key in message.receivers
            if owes and self._owed(member, message.sent_at):
                tally.expected += 1
                if got:
                    tally.received += 1
                elif reported_left:
                    reported_left -= 1
                    tally.reported += 1
                else:
                    tally.lost += 1
                    message.lost.add(member.key)
                    if len(tally.lost_examples) < LOST_EXAMPLES:
                        tally.lost_examples.append(self._describe_loss(message, member))
            elif got:
                tally.bonus += 1
            elif self._connected_at(member, message.sent_at):
                tally.excused += 1

    def _owed(self, member: Member, sent_at: float) -> bool:
        joined_in_time = member.joined <= sent_at - self.join_margin
        stayed = member.left is None or member.left >= sent_at + self.grace
        return joined_in_time and stayed

    @staticmethod
    def _connected_at(member: Member, moment: float) -> bool:
        return member.joined <= moment and (member.left is None or member.left > moment)

    def _describe_loss(self, message: Sent, member: Member) -> str:
        left = "still connected" if member.left is None else f"left {member.left:.3f}"
        return (
            f"message {message.message_id} to room {message.room} sent at "
            f"{message.sent_at:.3f}: member {member.key} (joined {member.joined:.3f}, {left}) "
            "got nothing"
        )

    def _forget(self, now: float) -> None:
        """Drop what can no longer change, so long runs do not grow without bound:
        settled messages after `keep_settled` seconds, and members that left before
        anything still pending was sent."""
        while self._settled:
            message = next(iter(self._settled.values()))
            if message.sent_at + self.grace + self.keep_settled > now:
                break
            del self._settled[message.message_id]
        oldest = next(iter(self._pending.values())).sent_at if self._pending else now
        horizon = min(oldest, now) - self.join_margin - self.grace
        gone = [m for m in self._members.values() if m.left is not None and m.left < horizon]
        for member in gone:
            del self._members[member.key]
            del self._rooms[member.room][member.key]
