"""The server's checks of what the sites send back, and the Strategy wrapper that applies them before aggregation.

A site writes its own replies, so nothing in one is trusted. `UpdateChecks` judges each reply: the site it counts
for comes from the node Flower authenticated (`fedecho.server.identity`), not from the reply; a refusal or failure
is recorded as such; its metrics must be finite and its claimed example count whole and within the site's cap; an
update's names, shapes, dtype, values and norm must fit the round (`fedecho.fl.exchange.decode`). Whatever is wrong
with a reply, malformed content included, makes it a rejection naming the reason (an `update-rejected` event under
the site's name): no reply stops a run. Across a round's replies, two under one site name are both rejected, and an
update far larger than the round's others is (`fedecho.fl.exchange.adaptive_norm_bound`).

`CheckedUpdates` wraps the run's Flower strategy like Flower's DP wrappers do: its `aggregate_train` judges the
round's replies and hands the wrapped strategy only the accepted ones, each as the site's full fp32 weights (the
round's global tensors plus its update), in site order. The round loop reads the verdicts (`results`) to record
them; evaluation and statistics replies, which no Flower strategy aggregates, use `UpdateChecks` directly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedecho.fl.exchange import (
    UpdateError,
    adaptive_norm_bound,
    arrays_sha256,
    claimed_examples,
    decode,
    record_bytes,
    reply_metrics,
    update_norm,
)
from fedecho.fl.methods import CONTROL, ServerControl
from fedecho.fl.protocol import ERROR_REFUSED
from fedecho.fl.strategies import StrategyWrapper
from fedecho.privacy.dp_policy import PRIVACY_METRICS
from fedecho.server.identity import Identity, SiteNames
from fedecho.server.transport import Delivery, error_reason
from fedecho.storage import Store


@dataclass
class SiteReply:
    site: str
    node_id: int
    status: str  # ok | failed | rejected | refused
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    bytes_down: int = 0
    bytes_up: int = 0
    update: dict[str, torch.Tensor] | None = None
    sha256: str = ""  # of the reply's arrays as received (audit)
    norm: float = 0.0  # the update's L2 norm (for the round's adaptive bound)
    control: dict[str, torch.Tensor] | None = None  # SCAFFOLD: the change of the site's control variate


_SITE_ERROR = re.compile(r"^(?:refused by )?site (.+?): ")  # how a site's refusal or failure names it

NAME_MAX = 100  # characters of a site name a reply may give

Read = Callable[[str, RecordDict, dict[str, float]], SiteReply]


def claimed_name(reply: Message) -> tuple[str, str]:
    """(the site name a reply gives for itself, "" when none; a problem with it, "" when none): its info record,
    or a refusal's or failure's reason (an error carries no content). Never raises: the reply is judged afterwards."""
    try:
        if reply.has_content():
            name = reply.content["info"].get("site", "") if "info" in reply.content else ""
        elif reply.has_error() and (m := _SITE_ERROR.match(str(reply.error.reason))):
            name = m.group(1)
        else:
            name = ""
    except Exception as e:
        return "", f"its site name is unreadable ({type(e).__name__})"
    if not isinstance(name, str) or len(name) > NAME_MAX or not name.isprintable():
        return "", f"its site name is not a printable string of at most {NAME_MAX} characters"
    return name, ""


def stored_count(value: Any) -> int:
    """A stored example count: the value when it is a finite number, else 0 (the audit keeps the reason)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if math.isfinite(number) and abs(number) < 2**62 else 0


def rejection_reason(e: Exception) -> str:
    """A rejection's reason: an UpdateError's own words, anything unexpected with its type (at most 500 chars)."""
    text = str(e) if isinstance(e, UpdateError) else f"{type(e).__name__}: {e}"
    return text if len(text) <= 500 else text[:497] + "..."


class UpdateChecks:
    """Judges a run's replies: each becomes a `SiteReply` (ok, failed, refused or rejected with the reason).
    Rejections and refusals are events in `store` under run `run_id`; an accepted site is upserted there."""

    def __init__(
        self,
        store: Store,
        run_id: int,
        names: SiteNames,
        examples_cap: Callable[[str], int],
        *,
        wire: str,
        max_update_norm: float,
        norm_factor: float,
    ) -> None:
        self.store, self.run_id, self.names, self.examples_cap = store, run_id, names, examples_cap
        self.wire, self.max_update_norm, self.norm_factor = wire, max_update_norm, norm_factor

    def identify(self, node: int, reply: Message | None) -> Identity:
        """The site a reply comes from, by the node its message was sent to: Flower stores a reply only from that
        node (the SuperLink checks the reply's source against the message's destination), and with node
        authentication only the holder of that node's registered key acts as it (`fedecho.server.identity`)."""
        claimed, problem = claimed_name(reply) if reply is not None else ("", "")
        who = self.names.identify(node, claimed)
        return Identity(who.name, who.problem or problem)

    def reject(self, r: SiteReply, reason: str, kind: str = "train") -> SiteReply:
        """Mark a reply rejected (nothing of it is aggregated or averaged) and log an update-rejected event."""
        r.status, r.reason, r.update, r.metrics = "rejected", reason, None, {}
        self.store.add_event(
            self.run_id, "update-rejected", reason if kind == "train" else f"{kind} reply: {reason}", site=r.site
        )
        return r

    # ------------------------------------------------------------ one reply
    def reply(self, msg: Message, reply: Message | None, kind: str, read: Read) -> SiteReply:
        """What every reply that carries arrays goes through (training updates, statistics): no reply, an error
        (a refusal or a failure), the site it counts for, its arrays and metrics present; then `read` checks and
        decodes the content. Anything wrong makes it a rejection naming the reason, recorded under `kind`."""
        node = msg.metadata.dst_node_id
        down = record_bytes(msg.content)
        if reply is None:
            name = self.identify(node, None).name
            return SiteReply(name, node, "failed", reason="no reply before the deadline", bytes_down=down)
        site, up, sha = f"node-{node}", 0, ""
        try:
            who = self.identify(node, reply)
            site = who.name
            if reply.has_error():
                status = "refused" if reply.error.code == ERROR_REFUSED else "failed"
                if status == "refused":
                    self.store.add_event(self.run_id, "refused", str(reply.error.reason), site=site)
                return SiteReply(site, node, status, reason=error_reason(reply), bytes_down=down)
            content = reply.content
            arrays = content.get("arrays")
            if isinstance(arrays, ArrayRecord):
                up, sha = record_bytes(content), arrays_sha256(arrays)
            if who.problem:
                raise UpdateError(who.problem)
            if arrays is None or "metrics" not in content:
                raise UpdateError("the reply lacks its arrays or metrics")
            if not isinstance(arrays, ArrayRecord):
                raise UpdateError(f"the reply's arrays are a {type(arrays).__name__}, not an ArrayRecord")
            result = read(site, content, reply_metrics(content["metrics"]))
        except Exception as e:
            r = SiteReply(site, node, "ok", bytes_down=down, bytes_up=up, sha256=sha)
            return self.reject(r, rejection_reason(e), kind)
        self.store.upsert_site(site, node_id=node)
        result.node_id, result.bytes_down, result.bytes_up, result.sha256 = node, down, up, sha
        return result

    def train_reply(
        self,
        msg: Message,
        reply: Message | None,
        expected: dict[str, torch.Size],
        control: ServerControl | None = None,
    ) -> SiteReply:
        """A site's training reply, accepted (status ok, its update decoded) or not. `control`: SCAFFOLD's server
        control variate in phases that use it (the reply must carry the change of the site's)."""

        def read(site: str, content: RecordDict, metrics: dict[str, float]) -> SiteReply:
            claimed_examples(metrics, self.examples_cap(site))
            update = decode(content["arrays"], self.wire, expected, self.max_update_norm)
            change = None
            if control is not None:
                record = content.get(CONTROL)
                if not isinstance(record, ArrayRecord):
                    raise UpdateError("the reply lacks its control variate change (the phase uses SCAFFOLD)")
                change = decode(record, self.wire, {k: v.shape for k, v in control.c.items()})
            return SiteReply(site, 0, "ok", metrics, update=update, norm=update_norm(update), control=change)

        return self.reply(msg, reply, "train", read)

    def evaluate_reply(self, msg: Message, reply: Message | None) -> SiteReply:
        """A site's evaluation reply: ok, failed, or rejected (a bad count or metric, a borrowed name, anything
        malformed) and then left out of the weighted means. A count of 0 is allowed (no validation videos), and
        so is a NaN score (undefined at that site, e.g. R2 of one video), which the means leave out."""
        node = msg.metadata.dst_node_id
        down = record_bytes(msg.content)
        if reply is None:
            name = self.identify(node, None).name
            return SiteReply(name, node, "failed", reason="no reply before the deadline", bytes_down=down)
        site = f"node-{node}"
        try:
            who = self.identify(node, reply)
            site = who.name
            if reply.has_error():
                status = "refused" if reply.error.code == ERROR_REFUSED else "failed"
                return SiteReply(site, node, status, reason=error_reason(reply), bytes_down=down)
            if who.problem:
                raise UpdateError(who.problem)
            if "metrics" not in reply.content:
                raise UpdateError("the reply lacks its metrics")
            metrics = reply_metrics(reply.content["metrics"], undefined=True)  # NaN: a score undefined at the site
            claimed_examples(metrics, self.examples_cap(site), minimum=0)
        except Exception as e:
            return self.reject(SiteReply(site, node, "ok", bytes_down=down), rejection_reason(e), "evaluate")
        return SiteReply(site, node, "ok", metrics, bytes_down=down)

    # ------------------------------------------------------- a round's replies
    def one_reply_per_site(self, results: list[SiteReply], kind: str = "train") -> None:
        """Two replies of one round under one site name (possible only where names come from the replies): which
        one is the site's is unknown, so each is recorded under its node (`node-<id>`) and rejected."""
        nodes: dict[str, list[SiteReply]] = {}
        for r in results:
            nodes.setdefault(r.site, []).append(r)
        for name, group in nodes.items():
            if len(group) < 2:
                continue
            ids = ", ".join(str(r.node_id) for r in group)
            for r in group:
                r.site = f"node-{r.node_id}"
                if r.status == "ok":
                    self.reject(r, f"nodes {ids} all reply as site {name!r}", kind)

    def norms(self, results: list[SiteReply]) -> None:
        """Reject an update whose norm exceeds [run].norm_factor x the lower median of this round's valid
        updates' norms (`fedecho.fl.exchange.adaptive_norm_bound` says why the lower median, and its limit)."""
        ok = [r for r in results if r.status == "ok"]
        factor = self.norm_factor
        bound = adaptive_norm_bound([r.norm for r in ok], factor)
        if bound is None:
            return
        for r in ok:
            if r.norm > bound:
                self.reject(
                    r, f"update norm {r.norm:.4g} exceeds {factor:g} x the round's reference norm {bound / factor:.4g}"
                )


class CheckedUpdates(StrategyWrapper):
    """A Flower strategy wrapper that aggregates only the replies `UpdateChecks` accepts, as full fp32 weights.

    The sites send updates (their weights minus the round's global model, in the wire precision); the wrapped
    strategy averages weights. `configure_train` keeps the round's global tensors (what an update adds to and whose
    names and shapes it must have); `expect` takes the round's deliveries from the transport (each sent message
    with its reply, or None), because a verdict needs the message a reply answers (the node it was sent to, the
    bytes sent) and a message without a reply is the site's failure. `aggregate_train` judges every delivery (the
    verdicts, in message order, are `results`), and returns (None, None) without asking the wrapped strategy
    when fewer than `quorum` replies are accepted, as Flower's strategies do with too few replies."""

    def __init__(self, strategy: Strategy, checks: UpdateChecks, quorum: int) -> None:
        self.strategy, self.checks, self.quorum = strategy, checks, quorum
        self.control: ServerControl | None = None  # SCAFFOLD's server control variate, in phases that use it
        self.master: dict[str, torch.Tensor] = {}
        self.deliveries: list[Delivery] = []
        self.results: list[SiteReply] = []

    def __repr__(self) -> str:
        return f"CheckedUpdates({self.strategy!r})"

    @property
    def accepted(self) -> list[SiteReply]:
        """The round's accepted replies, in site order (the order they are aggregated in, for exact resumes)."""
        return sorted((r for r in self.results if r.status == "ok"), key=lambda r: r.site)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.master = {k: torch.from_numpy(np.array(a.numpy(), dtype=np.float32)) for k, a in arrays.items()}
        self.deliveries, self.results = [], []
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def expect(self, deliveries: list[Delivery]) -> None:
        """The round's messages as sent and what came back for each (`fedecho.server.transport.DeadlineGrid`)."""
        self.deliveries = list(deliveries)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        given = {id(r) for r in replies}
        known = {id(d.reply) for d in self.deliveries if d.reply is not None}
        if given - known:
            raise ValueError("CheckedUpdates.aggregate_train: a reply to a message it does not expect")
        expected = {k: v.shape for k, v in self.master.items()}
        self.results = [
            self.checks.train_reply(d.sent, d.reply if id(d.reply) in given else None, expected, self.control)
            for d in self.deliveries
        ]
        self.checks.one_reply_per_site(self.results)
        self.checks.norms(self.results)  # after every reply's own checks: the bound comes from the valid ones
        accepted = self.accepted
        if len(accepted) < self.quorum:
            return None, None
        contents = []
        for r in accepted:  # each accepted update becomes the site's full weights (fp32 master + update)
            assert r.update is not None
            weights = {k: (v + r.update[k]).numpy() for k, v in self.master.items()}
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                    # a site's privacy (epsilon, delta, ...) is its own: stored per site, never averaged
                    "metrics": MetricRecord({k: v for k, v in r.metrics.items() if k not in PRIVACY_METRICS}),
                }
            )
            contents.append(Message(content, r.node_id, MessageType.TRAIN))
        return self.strategy.aggregate_train(server_round, contents)
