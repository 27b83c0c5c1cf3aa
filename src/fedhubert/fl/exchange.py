"""Sending messages to clients and taking each reply as it arrives, with bounded memory and a progress line.

Flower's `Grid.send_and_receive` keeps every reply of an exchange until the last one has arrived. Here messages
are pushed (at most `window` in flight, so the SuperLink holds a bounded number of them), replies are pulled in
small batches of message ids (a pull returns every reply ready for the ids it is given, and the SuperLink drops a
message once it is pulled), and each reply is handed to `take` at once, so the caller can fold it into a running
result and let it go. Every `every_s` seconds the exchange says how many replies have come of how many sent, how
long it has waited and how long it will still wait.

A dead or hung client should cost a round no more than the round needs: `FittedTimeout` waits the configured cap
until it has seen an exchange complete, then `factor` times the last complete exchange's time plus a slack.

What an exchange gives up on must not stay in the SuperLink: Flower deletes an instruction and its reply only when
the reply is pulled, or once the instruction's TTL (12 h by default) has passed and its id is asked for. The callers
give their instructions a TTL of the exchange's wait plus `TTL_SLACK_S` (`message_ttl`), and `Stragglers` keeps the
ids of the instructions an exchange gave up on and pulls them again at the start of every later exchange: a late
reply is taken and dropped, and once the TTL has passed Flower answers the pull with an expiry error and deletes
the instruction. Either way the id is let go, so the stored messages stay flat over rounds with timeouts.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
PULL_BATCH = 4  # message ids per pull: at most this many replies are held at once before `take` sees them
POLL_MIN_S, POLL_MAX_S = 0.02, 0.1
TTL_SLACK_S = 60.0  # an instruction outlives its exchange's wait by this much


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def message_ttl(wait_s: float | None) -> float | None:
    """The TTL of an exchange's instructions: its wait plus TTL_SLACK_S (None, Flower's default: no wait limit)."""
    return None if wait_s is None else wait_s + TTL_SLACK_S


class Stragglers:
    """The ids of instructions that exchanges gave up on, pulled again until the SuperLink lets them go."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}  # message id -> what it was (for the log)
        self.late_replies = 0

    def add(self, ids: Sequence[str], label: str) -> None:
        self.ids.update(dict.fromkeys(ids, label))

    def collect(self, grid: Grid) -> None:
        """Pull every straggler once: a late reply (dropped) or Flower's expiry error lets its id go."""
        ids = list(self.ids)
        for first in range(0, len(ids), PULL_BATCH):
            for reply in grid.pull_messages(ids[first : first + PULL_BATCH]):
                label = self.ids.pop(reply.metadata.reply_to_message_id, None)
                if label is not None and not reply.has_error():
                    self.late_replies += 1
                    log.info("%s: a late reply came and was dropped", label)


def stored_messages(grid: Grid) -> dict[str, int]:
    """What the run's link state holds now, where the ServerApp can see it (simulation: Flower's in-memory state,
    in this process): instructions, replies and message objects (payloads). Empty on a deployment SuperLink,
    whose state is in another process. Flat over rounds when nothing an exchange gave up on is left behind."""
    from flwr.superlink.grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        return {}
    state = grid.state
    return {
        "link_instructions": state.num_message_ins(),
        "link_replies": state.num_message_res(),
        "link_objects": len(state.object_store),
    }


def send_window(nodes: int) -> int:
    """How many messages an exchange keeps in flight for `nodes` serving nodes: a few per node, since Flower's
    simulation dispatcher scans every stored message for each node (and a SuperLink holds what is in flight)."""
    return max(16, 4 * nodes)


def client_error(reply: Message) -> str:
    """The client's own error message from an error reply. Flower's reason wraps it in the exception's type and, in
    simulation, in Ray's traceback; the message that the client raised is its last "Message: " part."""
    reason = ANSI.sub("", reply.error.reason)
    said = reason.rpartition("Message: ")[2] if "Message: " in reason else reason.partition(":<'")[2] or reason
    return said.removesuffix("'>").strip()


@dataclass
class Exchanged:
    """How an exchange ended: the keys whose reply did not come in time, and when (seconds after the start) the
    last reply was taken (0 if none came)."""

    missing: list = field(default_factory=list)
    last_reply_s: float = 0.0
    unanswered: list[str] = field(default_factory=list)  # ids of the sent instructions among the missing


@dataclass
class FittedTimeout:
    """How long the next exchange of a kind waits: `cap_s` (None: no limit) until one has completed with every
    reply, then `factor` x that exchange's time + `slack_s`, never above the cap. An exchange with missing replies
    does not refit it (its time is the timeout itself, not the clients' pace)."""

    cap_s: float | None
    factor: float = 3.0
    slack_s: float = 60.0
    measured_s: float | None = None

    def seconds(self) -> float | None:
        if self.measured_s is None:
            return self.cap_s
        fitted = self.factor * self.measured_s + self.slack_s
        return fitted if self.cap_s is None else min(self.cap_s, fitted)

    def observe(self, done: Exchanged) -> None:
        if not done.missing:
            self.measured_s = done.last_reply_s


def exchange(
    grid: Grid,
    outgoing: Sequence[tuple[K, Message]],
    take: Callable[[K, Message], None],
    *,
    timeout_s: float | None,
    label: str,
    window: int | None = None,
    every_s: float = 30.0,
    stragglers: Stragglers | None = None,
) -> Exchanged:
    """Send each (key, message) of `outgoing` in order and call `take(key, reply)` for each reply as it is pulled.
    Returns the keys whose reply did not come within `timeout_s` (None: wait as long as it takes) of the start,
    and when the last reply came.
    When a pass pulls nothing it waits 20 ms, up to 100 ms when many replies are pending (one pull per 4 ids), so a
    round's last reply is taken within tens of milliseconds without flooding a remote SuperLink with pulls.
    With `stragglers`, those of earlier exchanges are pulled first and this one's unanswered instructions join them."""
    if stragglers is not None:
        stragglers.collect(grid)
    start = time.monotonic()
    deadline = None if timeout_s is None else start + timeout_s
    window = len(outgoing) if window is None else max(1, window)
    pending: dict[str, K] = {}
    next_out, received, said, last_reply = 0, 0, start, 0.0
    while True:
        if next_out < len(outgoing) and len(pending) < window:
            batch = outgoing[next_out : next_out + window - len(pending)]
            ids = list(grid.push_messages([message for _, message in batch]))
            pending.update(zip(ids, (key for key, _ in batch), strict=True))
            next_out += len(batch)
        ids = list(pending)
        got = 0
        for first in range(0, len(ids), PULL_BATCH):
            replies = list(grid.pull_messages(ids[first : first + PULL_BATCH]))
            while replies:  # each reply is let go once taken
                reply = replies.pop()
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is not None:
                    got += 1
                    take(key, reply)
            reply = None
        received += got
        now = time.monotonic()
        if got:
            last_reply = now - start
        if not pending and next_out == len(outgoing):
            return Exchanged([], last_reply)
        if deadline is not None and now >= deadline:
            missing = list(pending.values()) + [key for key, _ in outgoing[next_out:]]
            log.warning(
                "%s: %d of %d replies after %.0f s; giving up on the other %d",
                label,
                received,
                len(outgoing),
                now - start,
                len(missing),
            )
            if stragglers is not None:
                stragglers.add(list(pending), label)
            return Exchanged(missing, last_reply, list(pending))
        if now - said >= every_s:
            left = "" if deadline is None else f", waiting at most {deadline - now:.0f} s more"
            log.info("%s: %d of %d replies after %.0f s%s", label, received, len(outgoing), now - start, left)
            said = now
        if not got:
            time.sleep(min(POLL_MAX_S, max(POLL_MIN_S, 0.005 * math.ceil(len(pending) / PULL_BATCH))))
