"""The round's transport: a Grid that sends a round's messages and comes back with the replies that came in time.

Flower's `Grid.send_and_receive` waits for every reply until one timeout, and Flower's sampling waits forever for
enough sites. A federated run needs more (`DeadlineGrid`, around the `PackingGrid` of `fedecho.server.app`):
- collect replies until all are in or the round's deadline passes; a site that restarted is sent its message
  again, a site Flower reports offline (no heartbeat) is sent it again once it is back, and is not waited for once
  the other sites are in and the quorum is met (`DeadlineGrid.exchange`);
- wait for enough sites before a round, noting every drop and rejoin under the site's name, and retry a round
  with too few replies before the run pauses (`DeadlineGrid.with_retries`).

What it notes goes through `note(kind, message, site)` (the run's events), sites named by `name(node)`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedecho.server.trace import MessageTrace


class RoundFailed(RuntimeError):
    """The run cannot go on now (too few sites, also after the round's retries): it pauses, and
    `fedecho server resume` continues it from its last checkpoint."""


class TooFewReplies(RuntimeError):
    """One attempt at a round ended with fewer accepted replies than the quorum. It is retried when a site failed
    (offline, no reply, an error): a refusal or a rejection would only come again."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


OFFLINE_REASON = "offline: the site stopped sending heartbeats (crashed, stopped or cut off) and did not come back"


class Delivery(NamedTuple):
    """One message of a round and what came back: the site's reply, Flower's "node unavailable" answer for a site
    that went offline and was not waited for any longer, or None when nothing came before the deadline."""

    sent: Message
    reply: Message | None

    @property
    def late(self) -> bool:
        return self.reply is None

    @property
    def offline(self) -> bool:
        return self.reply is not None and unavailable(self.reply)


Note = Callable[[str, str, "str | None"], None]


class GridWrapper(Grid):
    """A Flower Grid around another: every call goes to the wrapped grid (`grid`). Subclasses override what they
    add to (PackingGrid: the arrays packed on the wire; DeadlineGrid: a round's deadlines)."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class DeadlineGrid(GridWrapper):
    """Flower's Grid (here fedecho's PackingGrid) with a round's deadlines, resends and offline sites handled, and
    the sites' comings and goings noted. Every other call passes through to the wrapped grid."""

    def __init__(
        self,
        grid: Grid,
        *,
        timeout: float,
        note: Note,
        name: Callable[[int], str],
        poll_interval: float = 0.1,
        node_check_interval: float = 1.0,
        resend_for: float = 30.0,
        site_wait: float = 600.0,
        retries: int = 2,
        trace: MessageTrace | None = None,
    ) -> None:
        super().__init__(grid)
        self.timeout, self.poll_interval, self.node_check_interval = timeout, poll_interval, node_check_interval
        self.resend_for, self.site_wait, self.retries = resend_for, site_wait, retries
        self.note, self.name, self.trace = note, name, trace
        self.online: set[int] | None = None  # the sites online at the last look
        self.dropped: set[int] = set()  # sites recorded as dropped and not yet back

    # -------------------------------------------------------------- the Grid
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's call, with this grid's deadline, resends and offline handling: the replies that came."""
        return [d.reply for d in self.exchange(list(messages), timeout=timeout) if d.reply is not None]

    # ------------------------------------------------------------ a round's replies
    def exchange(self, messages: list[Message], need: int = 1, timeout: float | None = None) -> list[Delivery]:
        """Send, then collect replies until all are in or the deadline (`timeout`, else the run's) passes; one
        `Delivery` per message, in order.

        Every `node_check_interval` seconds it looks at the sites Flower lists online:
        - a site that was (re)activated after its message was sent restarted and lost that message: it is
          sent again at once (a crashed site restarted within seconds never went offline in Flower's eyes);
        - Flower answers "node unavailable" for a site whose heartbeats stopped (two missed intervals): the
          site is recorded as dropped, and its message is sent again as soon as it is online again (after a
          SuperLink restart every site is briefly stale although it has reconnected). Such a site is waited
          for at most `resend_for` seconds, and not at all once every other site has answered and `need` of
          them with content: a dead site then costs its detection, not the round timeout."""
        if not messages:
            return []
        grid = self.grid
        ids = list(grid.push_messages(messages))
        by_id = dict(zip(ids, messages, strict=True))
        if self.trace is not None:
            for m in messages:
                self.trace.record("sent", m)
        got: dict[str, Message] = {}
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        pending = {i: (i, time.time()) for i in ids}  # message id now awaited -> (the first one's id, sent at)
        offline: dict[str, tuple[float, Message]] = {}  # first id -> (since when, Flower's unavailable reply)
        next_check = time.time() + self.node_check_interval

        def send_again(first: str) -> None:
            m = by_id[first]
            again = Message(m.content, m.metadata.dst_node_id, m.metadata.message_type, group_id=m.metadata.group_id)
            (new_id,) = grid.push_messages([again])
            pending[new_id] = (first, time.time())
            if self.trace is not None:
                self.trace.record("sent", again)

        while (pending or offline) and time.time() < deadline:
            for reply in grid.pull_messages(list(pending)):
                first, _ = pending.pop(reply.metadata.reply_to_message_id, (None, 0.0))
                if first is None:
                    continue
                if self.trace is not None:
                    self.trace.record("received", reply)
                if unavailable(reply):
                    node = by_id[first].metadata.dst_node_id
                    self.site_dropped(node, "stopped answering: Flower reports it offline (no heartbeat)")
                    offline[first] = (offline.get(first, (time.time(), reply))[0], reply)
                else:
                    got[first] = reply
            if time.time() >= next_check:
                next_check = time.time() + self.node_check_interval
                activated = activations(grid)
                for mid, (first, sent) in list(pending.items()):
                    node = by_id[first].metadata.dst_node_id
                    if activated.get(node, 0.0) > sent:  # restarted since: the message it held is gone
                        del pending[mid]
                        self.site_dropped(node, "restarted: the message it was working on is lost")
                        self.site_back(node, "back online after a restart: its message was sent again")
                        send_again(first)
                answered = sum(1 for r in got.values() if r.has_content())
                for first, (since, reply) in list(offline.items()):
                    node = by_id[first].metadata.dst_node_id
                    if node in activated:  # back online: ask again
                        del offline[first]
                        self.site_back(node, "back online: its message was sent again")
                        send_again(first)
                    elif time.time() >= since + self.resend_for or (not pending and answered >= need):
                        del offline[first]
                        got[first] = reply
            if pending or offline:
                time.sleep(self.poll_interval)
        return [Delivery(by_id[i], got.get(i)) for i in ids]

    # ------------------------------------------------------------ the sites
    def with_retries(self, what: str, attempt: Callable[[], None], need: int) -> None:
        """Run `attempt` (a round, or a statistics query) until it stops raising TooFewReplies, up to `retries`
        more times, each after waiting for `need` sites; then pause the run (RoundFailed). Only failures are
        retried: refusals and rejections would come back the same."""
        for i in range(self.retries + 1):
            self.wait_for_sites(need, what)
            try:
                attempt()
                return
            except TooFewReplies as e:
                if not e.retry:
                    raise RoundFailed(f"{e} (the others refused or were rejected)") from None
                if i == self.retries:
                    raise RoundFailed(f"{e}; paused after {self.retries + 1} attempts") from None
                self.note("round-retry", f"{e}; trying again ({i + 1} of {self.retries})", None)

    def wait_for_sites(self, need: int, what: str) -> None:
        """Block until at least `need` sites are online, noting drops and rejoins; after `site_wait` seconds
        without them the run pauses. (Flower's own sampling would wait forever, logging every second.)"""
        deadline = time.time() + self.site_wait
        online = self.observe_sites()
        if len(online) >= need:
            return
        self.note("waiting", f"{what}: waiting for {need} sites to be online ({len(online)} are)", None)
        while time.time() < deadline:
            time.sleep(self.node_check_interval)
            online = self.observe_sites()
            if len(online) >= need:
                return
        raise RoundFailed(f"{what}: {len(online)} of the {need} sites needed were online for {self.site_wait:.0f} s")

    def observe_sites(self) -> set[int]:
        """The sites online now (Flower: a heartbeat within its last 2 intervals); a site gone since the last look
        is recorded as dropped, and a dropped site seen again as rejoined, each once and under its name."""
        now = set(self.grid.get_node_ids())
        if self.online is not None:
            for node in sorted(self.online - now):
                self.site_dropped(node, "no longer online (its heartbeats stopped)")
        for node in sorted(now & self.dropped):
            self.site_back(node, "back online")
        self.online = now
        return now

    def site_dropped(self, node: int, why: str) -> None:
        if node in self.dropped:
            return
        self.dropped.add(node)
        if self.online is not None:
            self.online.discard(node)
        self.note("site-dropped", why, self.name(node))

    def site_back(self, node: int, how: str) -> None:
        """Note a dropped site back online."""
        if node in self.dropped:
            self.dropped.discard(node)
            self.note("site-rejoined", how, self.name(node))


def activations(grid: Grid) -> dict[int, float]:
    """node id -> when Flower last activated it (epoch seconds; 0 when unknown), for the sites online now."""
    out: dict[int, float] = {}
    for info in grid.get_nodes():
        when = 0.0
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            if info.last_activated_at:
                when = datetime.fromisoformat(info.last_activated_at).timestamp()
        out[int(info.node_id)] = when
    return out


def error_reason(reply: Message) -> str:
    """A failed reply's reason in the store: fedecho's words for Flower's "node unavailable", else the site's."""
    return OFFLINE_REASON if unavailable(reply) else str(reply.error.reason)


def unavailable(reply: Message) -> bool:
    """Flower's own answer for a SuperNode it considers offline (no heartbeat within 2 x its interval)."""
    return reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
