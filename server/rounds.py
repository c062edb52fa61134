"""fedecho's round loop: Flower's strategies aggregate, fedecho persists and resumes.

Flower's `Strategy.start` counts rounds from 1 and keeps everything in memory. `FederatedRun`
drives the same strategy objects (`configure_train`, `aggregate_train`) itself so that it can:
- send the exchanged tensors in the run's wire precision, and per site the frozen encoder when a
  site does not hold it yet;
- ride out site outages: a round goes on with the sites that answered once the run's quorum did; a site
  Flower reports offline (no heartbeat) is not waited for once the others are in; a round with too few
  replies is retried, and after that the run pauses (resumable, one line, no traceback). Every drop,
  rejoin, retry and pause is an event in the store under the site's name;
- check every update (names, shapes, dtype, finite values, norm) before aggregation, decode it to
  fp32 and add it to the fp32 master; check each reply's metrics and claimed example count, and name
  its site from the node Flower authenticated (`fedecho.server.identity`), not from the reply. No
  reply, however malformed, stops a run: whatever is wrong with it makes it a rejected reply, recorded
  under its site's name with the reason, and the round goes on with the others;
- checkpoint the global model and the strategy's state after every round and record the round,
  every site's result and the bytes moved in the store;
- resume a stopped run from its newest valid checkpoint, replaying exactly what an uninterrupted
  run would have done (seeds depend only on run, phase, round and site; replies are aggregated
  in site order).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedecho.fl.config import FedRunConfig, parse_run_config, round_lr, round_seed
from fedecho.fl.exchange import (
    UpdateError,
    adaptive_norm_bound,
    arrays_sha256,
    claimed_examples,
    decode,
    encode,
    exchanged_keys,
    frozen_keys,
    record_bytes,
    reply_metrics,
    state_hash,
    update_norm,
    wire_round,
)
from fedecho.fl.methods import CONTROL, ServerControl, control_keys
from fedecho.fl.protocol import ERROR_REFUSED, build_model
from fedecho.fl.strategies import (
    build_strategy,
    load_strategy_state,
    schedule_server_lr,
    seed_sampling,
    server_peak_lr,
    strategy_state,
)
from fedecho.models import EchoVisionFM
from fedecho.models.checkpoint import load_state
from fedecho.models.lora import to_lora_state
from fedecho.privacy.dp_policy import PRIVACY_METRICS
from fedecho.server.checkpoints import latest_valid, prune_checkpoints, write_checkpoint
from fedecho.server.config import DEFAULT_MAX_EXAMPLES
from fedecho.server.identity import Identity, SiteNames
from fedecho.server.statistics import after_aggregation, phase_start
from fedecho.server.trace import MessageTrace
from fedecho.storage import Store
from fedecho.storage.store import SITES_SUFFIX
from fedecho.train import evaluate, make_datasets, pretrain_loss
from fedecho.train.run import init_encoder

log = logging.getLogger("fedecho.server")


class RoundFailed(RuntimeError):
    """The run cannot go on now (too few sites, also after the round's retries): it pauses, and
    `fedecho server resume` continues it from its last checkpoint."""


class TooFewReplies(RuntimeError):
    """One attempt at a round ended with fewer accepted replies than the quorum. It is retried when a site failed
    (offline, no reply, an error): a refusal or a rejection would only come again."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass
class ServerSettings:
    """What the server decides, not the run file: where state lives, how long to wait, how many sites."""

    state: Path
    store_url: str
    round_timeout: float = 600.0
    min_sites: int = 2  # sites connected before the run's first round starts
    quorum: int = 1  # accepted replies a round needs to count (the run file's [run].min_sites overrides it)
    site_wait: float = 600.0  # seconds a round waits for enough connected sites before it is retried
    round_retries: int = 2  # attempts after the first at a round with too few replies; then the run pauses
    eval_data: Path | None = None
    eval_cache: Path | None = None
    mode: str = "deployment"
    poll_interval: float = 0.1  # seconds between pulls for replies (a cheap request to the SuperLink)
    # A site Flower reports unavailable (no heartbeat for 2 heartbeat intervals; the sites send one every few
    # seconds, `fedecho.client.runtime`) is asked again as soon as it is back online, for this long, and not
    # waited for at all once the other sites are in and the quorum is met:
    resend_for: float = 30.0
    node_check_interval: float = 1.0  # seconds between looks at which sites are online, while waiting
    trace_messages: bool = False  # write every message sent and received to STATE/trace/ (fedecho.server.trace)
    # Who a reply comes from: the deployment names sites from its registry of authenticated nodes
    # (fedecho.server.identity.RegistryNames); by default, as in the simulation, from the reply itself.
    site_names: SiteNames = field(default_factory=SiteNames)
    max_examples: int = DEFAULT_MAX_EXAMPLES  # the most examples a site may claim in one reply ...
    max_examples_per_site: dict[str, int] = field(default_factory=dict)  # ... unless it has its own cap here

    def examples_cap(self, site: str) -> int:
        """The most examples `site` may claim in one reply: FedAvg weights its update by the claim."""
        return self.max_examples_per_site.get(site, self.max_examples)


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


@dataclass
class Outgoing:
    master: dict[str, torch.Tensor]  # fp32 copies of the exchanged tensors
    fp32: ArrayRecord  # what the strategy sees (FedOpt keeps it as its current weights)
    down: ArrayRecord  # the same in the wire precision
    with_frozen: ArrayRecord  # down plus the frozen encoder (frozen-encoder fine-tuning)
    frozen_digest: str  # hash of the frozen tensors as a site holds them; "" when nothing is frozen


NAME_MAX = 100  # characters of a site name a reply may give


def _claimed_name(reply: Message) -> tuple[str, str]:
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


def _count(value: Any) -> int:
    """A stored example count: the value when it is a finite number, else 0 (the audit keeps the reason)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if math.isfinite(number) and abs(number) < 2**62 else 0


def _reason(e: Exception) -> str:
    """A rejection's reason: an UpdateError's own words, anything unexpected with its type (at most 500 chars)."""
    text = str(e) if isinstance(e, UpdateError) else f"{type(e).__name__}: {e}"
    return text if len(text) <= 500 else text[:497] + "..."


class FederatedRun:
    def __init__(
        self,
        cfg: FedRunConfig,
        settings: ServerSettings,
        resume: int = 0,
        on_round: Callable[[str, int, dict[str, Any]], None] | None = None,
    ):
        self.settings = settings
        self.store = Store(settings.store_url)
        self.checkpoints = settings.state / "checkpoints"
        self.already_finished = False
        if resume:
            row = self.store.get_run(resume)
            self.cfg = parse_run_config(row.config_toml, f"run {resume} in the store")
            self.run_id = resume
            if row.status == "finished":  # nothing to do: say so, change nothing
                self.already_finished = True
                return
            self.store.add_event(resume, "resume", f"run resumed (it was {row.status})")
        else:
            self.cfg = cfg
            self.run_id = self.store.create_run(cfg.run.name, cfg.text, mode=settings.mode)
            for p in cfg.phases:
                self.store.add_phase(self.run_id, p, cfg.phase(p).rounds)
        self.store.set_run_status(self.run_id, "running")
        self.quorum = self.cfg.run.min_sites or settings.quorum
        self.start_sites = max(settings.min_sites, self.quorum)  # connected before the run's first round
        self.rounds_done = 0  # rounds this process has completed (the first one waits for start_sites)
        self.online: set[int] | None = None  # the sites online at the last look
        self.dropped: set[int] = set()  # sites recorded as dropped and not yet back
        self.timeout = self.cfg.run.round_timeout or settings.round_timeout
        self.wire = self.cfg.run.wire_dtype
        self.site_names = settings.site_names
        self.holding_frozen: set[int] = set()
        self.server_peak_lr: float | None = None  # a server optimiser's configured eta (schedule_server_lr)
        self.control: ServerControl | None = None  # SCAFFOLD's server control variate, in phases that use it
        self.on_round = on_round
        self.final: dict[str, Path] = {}
        trace = settings.state / "trace" / f"run-{self.run_id:04d}"
        self.trace = MessageTrace(trace) if settings.trace_messages else None

    # ----------------------------------------------------------------- phases
    def execute(self, grid: Grid) -> int:
        if self.already_finished:
            return self.run_id
        try:
            previous: EchoVisionFM | None = None
            for phase in self.cfg.phases:
                previous = self.run_phase(grid, phase, previous)
                self.store.set_phase_status(self.run_id, phase, "finished")
        except RoundFailed as e:
            self.store.set_run_status(self.run_id, "paused", str(e))
            self.store.add_event(self.run_id, "paused", str(e))
            raise
        except BaseException as e:
            self.store.set_run_status(self.run_id, "failed", f"{type(e).__name__}: {e}")
            raise
        self.store.set_run_status(self.run_id, "finished")
        return self.run_id

    def initial_model(self, phase: str, previous: EchoVisionFM | None) -> EchoVisionFM:
        torch.manual_seed(round_seed(self.cfg.run.seed, phase, 0))
        model = build_model(self.cfg, phase)
        if phase == "finetune":
            if previous is not None:  # the pre-training phase's global encoder
                encoder = {k: v for k, v in previous.state_dict().items() if k.startswith("encoder.")}
                load_state(model, to_lora_state(encoder, model), "the pre-trained encoder", strict=False)
            elif self.cfg.phase("finetune").init:
                init_encoder(model, self.cfg.phase("finetune").init)
        return model

    def run_phase(self, grid: Grid, phase: str, previous: EchoVisionFM | None) -> EchoVisionFM:
        pcfg = self.cfg.phase(phase)
        self.store.set_phase_status(self.run_id, phase, "running")
        strategy = build_strategy(
            self.cfg.strategy_name, self.cfg.strategy_params, fraction=self.cfg.run.fraction, min_sites=self.quorum,
            outer=(pcfg.outer_lr, pcfg.outer_momentum, pcfg.outer_nesterov),
        )  # fmt: skip
        model = self.initial_model(phase, previous)
        self.server_peak_lr = server_peak_lr(strategy)
        self.control = None
        if pcfg.scaffold:
            params = dict(model.named_parameters())
            keys = control_keys(model, exchanged_keys(model, phase, pcfg.freeze_encoder))
            self.control = ServerControl({k: params[k].shape for k in keys})
        start = 1
        found = latest_valid(self.store, self.run_id, phase)
        if found is not None:
            ck, model, sstate = found
            load_strategy_state(strategy, sstate)
            if self.control is not None:
                self.control.load(sstate)
            start = ck.round + 1
            log.info("%s: continuing after round %d from %s", phase, ck.round, ck.model)
        self.holding_frozen.clear()
        if start == 1:  # [finetune].target_stats; a resumed phase has them in its checkpoint
            phase_start(self, grid, phase, model)
        for server_round in range(start, pcfg.rounds + 1):
            self.round_with_retries(grid, phase, server_round, model, strategy)
        return model

    # ------------------------------------------------------------ dropouts
    def round_with_retries(
        self, grid: Grid, phase: str, server_round: int, model: EchoVisionFM, strategy: Strategy
    ) -> None:
        """One round, attempted again (same seeds, so the same work) while too few sites replied, up to
        `round_retries` times; then the run pauses (RoundFailed). Each retry first waits for enough sites."""
        self.with_retries(grid, f"{phase} round {server_round}", lambda: self.one_round(grid, phase, server_round,
                                                                                     model, strategy))  # fmt: skip
        self.rounds_done += 1

    def with_retries(self, grid: Grid, what: str, attempt: Callable[[], None]) -> None:
        """Run `attempt` (a round, or a statistics query) until it stops raising TooFewReplies, up to
        `round_retries` more times, each after waiting for enough sites; then pause the run (RoundFailed). Only
        failures are retried: refusals and rejections would come back the same."""
        retries = self.settings.round_retries
        for i in range(retries + 1):
            self.wait_for_sites(grid, self.start_sites if self.rounds_done == 0 else self.quorum, what)
            try:
                attempt()
                return
            except TooFewReplies as e:
                if not e.retry:
                    raise RoundFailed(f"{e} (the others refused or were rejected)") from None
                if i == retries:
                    raise RoundFailed(f"{e}; paused after {retries + 1} attempts") from None
                self.note("round-retry", f"{e}; trying again ({i + 1} of {retries})")

    def wait_for_sites(self, grid: Grid, need: int, what: str) -> None:
        """Block until at least `need` sites are online, noting drops and rejoins; after `site_wait` seconds
        without them the run pauses. (Flower's own sampling would wait forever, logging every second.)"""
        deadline = time.time() + self.settings.site_wait
        online = self.observe_sites(grid)
        if len(online) >= need:
            return
        self.note("waiting", f"{what}: waiting for {need} sites to be online ({len(online)} are)")
        while time.time() < deadline:
            time.sleep(self.settings.node_check_interval)
            online = self.observe_sites(grid)
            if len(online) >= need:
                return
        raise RoundFailed(
            f"{what}: {len(online)} of the {need} sites needed were online for {self.settings.site_wait:.0f} s"
        )

    def observe_sites(self, grid: Grid) -> set[int]:
        """The sites online now (Flower: a heartbeat within its last 2 intervals); a site gone since the last look
        is recorded as dropped, and a dropped site seen again as rejoined, each once and under its name."""
        now = set(grid.get_node_ids())
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
        self.note("site-dropped", why, self.identify(node, None).name)

    def site_back(self, node: int, how: str) -> None:
        """Note a dropped site back online."""
        if node in self.dropped:
            self.dropped.discard(node)
            self.note("site-rejoined", how, self.identify(node, None).name)

    def note(self, kind: str, message: str, site: str | None = None) -> None:
        """An event in the store, a log line, and a line on stdout (`fedecho server run` streams it)."""
        self.store.add_event(self.run_id, kind, message, site=site)
        line = f"site {site} {message}" if site else message
        log.info("%s: %s", kind, line)
        print(f"{kind}: {line}", flush=True)

    # ------------------------------------------------------------------ round
    def one_round(self, grid: Grid, phase: str, server_round: int, model: EchoVisionFM, strategy: Strategy) -> None:
        pcfg = self.cfg.phase(phase)
        t0 = time.time()
        out = self.outgoing(model, phase)
        master, keys = out.master, list(out.master)
        config = ConfigRecord(
            {
                "run-toml": self.cfg.text,
                "phase": phase,
                "lr": round_lr(pcfg, server_round),
                "seed": round_seed(self.cfg.run.seed, phase, server_round),
                "wire-dtype": self.wire,
                "frozen-sha256": out.frozen_digest,
                "run-id": self.run_id,  # for the sites' audit logs
            }
        )
        seed_sampling(round_seed(self.cfg.run.seed, phase, server_round, "sampling"))
        schedule_server_lr(strategy, self.server_peak_lr, round_lr(pcfg, server_round) / pcfg.lr)
        planned = list(strategy.configure_train(server_round, out.fp32, config, grid))
        messages = self.address(planned, out, MessageType.TRAIN)
        if self.control is not None:  # SCAFFOLD: every site gets the server's control variate with the model
            control = encode(self.control.c, self.wire)
            for m in messages:
                m.content[CONTROL] = control
        connected = len(messages)
        replies = self.exchange(grid, messages, need=self.quorum)
        expected = {k: v.shape for k, v in master.items()}
        results = [self.check_train_reply(msg, reply, expected) for msg, reply in replies]
        self.one_reply_per_site(results)
        self.check_norms(results)  # after every reply's own checks: the bound comes from the valid ones
        if out.frozen_digest:
            self.holding_frozen.update(r.node_id for r in results if r.status == "ok")
        accepted = sorted((r for r in results if r.status == "ok"), key=lambda r: r.site)
        if len(accepted) < self.quorum:
            for r in results:
                self._record_site(phase, server_round, "train", r)
            raise TooFewReplies(
                f"{phase} round {server_round}: {len(accepted)} of {len(messages)} sites answered, "
                f"{self.quorum} needed",
                retry=any(r.status == "failed" for r in results),
            )
        # Each accepted update becomes the site's full weights (fp32 master + update) for the strategy.
        contents = []
        for r in accepted:
            assert r.update is not None
            weights = {k: (master[k] + r.update[k]).numpy() for k in keys}
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                    # a site's privacy (epsilon, delta, ...) is its own: stored per site, never averaged
                    "metrics": MetricRecord({k: v for k, v in r.metrics.items() if k not in PRIVACY_METRICS}),
                }
            )
            contents.append(Message(content, r.node_id, MessageType.TRAIN))
        new_arrays, train_metrics = strategy.aggregate_train(server_round, contents)
        if new_arrays is None:
            raise TooFewReplies(f"{phase} round {server_round}: the strategy returned no model", retry=False)
        new_state = {k: torch.from_numpy(np.array(new_arrays[k].numpy(), dtype=np.float32)) for k in keys}
        model.load_state_dict(new_state, strict=False)
        if self.control is not None:
            weights = [float(r.metrics.get("num-examples", 1.0)) for r in accepted]
            sites = max(connected, round(connected / self.cfg.run.fraction))  # the sites the round could have asked
            self.control.update([r.control for r in accepted if r.control is not None], weights, sites)
        for r in results:
            self._record_site(phase, server_round, "train", r)
        after_aggregation(self, grid, phase, server_round, model, master)  # target statistics kept; [finetune].refit
        evaluate_metrics: dict[str, float] = {}
        every = pcfg.eval_every
        if server_round == pcfg.rounds or (every and server_round % every == 0):
            evaluate_metrics = self.federated_evaluate(grid, phase, server_round, model, strategy, config)
        server_metrics = self.server_evaluate(phase, model)
        train = {
            k: float(v) for k, v in (train_metrics or {}).items() if isinstance(v, int | float) and math.isfinite(v)
        }  # the sites' metrics are finite, but a weighted sum of huge ones is not
        # The round first, then its checkpoint: a crash in between redoes the round on resume (the
        # round's row is replaced), never a checkpoint whose round the store does not know.
        self.store.add_round(
            self.run_id, phase, server_round, started=t0, finished=time.time(), sites_sampled=len(messages),
            sites_replied=len(accepted), train=train, evaluate=evaluate_metrics, server=server_metrics,
        )  # fmt: skip
        sstate = {**strategy_state(strategy), **(self.control.state() if self.control is not None else {})}
        write_checkpoint(self.store, self.checkpoints, self.run_id, phase, server_round, model, sstate)
        prune_checkpoints(self.store, self.checkpoints, self.run_id, phase, self.cfg.run.keep_checkpoints)
        summary = {"sites": f"{len(accepted)}/{len(messages)}", **train, **evaluate_metrics, **server_metrics}
        log.info("%s round %d/%d: %s", phase, server_round, pcfg.rounds, summary)
        if self.on_round:
            self.on_round(phase, server_round, summary)

    def check_train_reply(self, msg: Message, reply: Message | None, expected: dict[str, torch.Size]) -> SiteReply:
        """A site's training reply, accepted (status ok, its update decoded) or not. Whatever is wrong with the
        reply, malformed content included, makes it a rejection naming the reason: no reply stops the run."""

        def read(site: str, content: RecordDict, metrics: dict[str, float]) -> SiteReply:
            claimed_examples(metrics, self.settings.examples_cap(site))
            update = decode(content["arrays"], self.wire, expected, self.cfg.run.max_update_norm)
            change = None
            if self.control is not None:
                record = content.get(CONTROL)
                if not isinstance(record, ArrayRecord):
                    raise UpdateError("the reply lacks its control variate change (the phase uses SCAFFOLD)")
                change = decode(record, self.wire, {k: v.shape for k, v in self.control.c.items()})
            return SiteReply(site, 0, "ok", metrics, update=update, norm=update_norm(update), control=change)

        return self.check_reply(msg, reply, "train", read)

    def check_reply(
        self,
        msg: Message,
        reply: Message | None,
        kind: str,
        read: Callable[[str, RecordDict, dict[str, float]], SiteReply],
    ) -> SiteReply:
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
                return SiteReply(site, node, status, reason=_error_reason(reply), bytes_down=down)
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
            return self.reject(SiteReply(site, node, "ok", bytes_down=down, bytes_up=up, sha256=sha), _reason(e), kind)
        self.store.upsert_site(site, node_id=node)
        result.node_id, result.bytes_down, result.bytes_up, result.sha256 = node, down, up, sha
        return result

    def identify(self, node: int, reply: Message | None) -> Identity:
        """The site a reply comes from, by the node its message was sent to: Flower stores a reply only from that
        node (the SuperLink checks the reply's source against the message's destination), and with node
        authentication only the holder of that node's registered key acts as it (`fedecho.server.identity`)."""
        claimed, problem = _claimed_name(reply) if reply is not None else ("", "")
        who = self.site_names.identify(node, claimed)
        return Identity(who.name, who.problem or problem)

    def reject(self, r: SiteReply, reason: str, kind: str = "train") -> SiteReply:
        """Mark a reply rejected (nothing of it is aggregated or averaged) and log an update-rejected event."""
        r.status, r.reason, r.update, r.metrics = "rejected", reason, None, {}
        self.store.add_event(
            self.run_id, "update-rejected", reason if kind == "train" else f"{kind} reply: {reason}", site=r.site
        )
        return r

    def check_norms(self, results: list[SiteReply]) -> None:
        """Reject an update whose norm exceeds [run].norm_factor x the lower median of this round's valid
        updates' norms (`fedecho.fl.exchange.adaptive_norm_bound` says why the lower median, and its limit)."""
        ok = [r for r in results if r.status == "ok"]
        factor = self.cfg.run.norm_factor
        bound = adaptive_norm_bound([r.norm for r in ok], factor)
        if bound is None:
            return
        for r in ok:
            if r.norm > bound:
                self.reject(
                    r, f"update norm {r.norm:.4g} exceeds {factor:g} x the round's reference norm {bound / factor:.4g}"
                )

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

    def _record_site(self, phase: str, server_round: int, kind: str, r: SiteReply) -> None:
        self.store.add_site_result(
            self.run_id, phase, server_round, r.site, kind, status=r.status, metrics=r.metrics,
            num_examples=_count(r.metrics.get("num-examples", 0)), bytes_down=r.bytes_down, bytes_up=r.bytes_up,
            reason=r.reason,
        )  # fmt: skip
        self.store.add_audit(
            self.run_id, phase, server_round, kind, r.site, status="accepted" if r.status == "ok" else r.status,
            reason=r.reason, node_id=r.node_id, bytes_down=r.bytes_down, bytes_up=r.bytes_up, sha256=r.sha256,
        )  # fmt: skip

    # -------------------------------------------------------------- messaging
    def outgoing(self, model: EchoVisionFM, phase: str) -> Outgoing:
        """The global tensors of this phase as they go out: fp32 for the strategy, the wire precision
        for the sites, and once more with the frozen encoder for sites that do not hold it yet."""
        freeze = self.cfg.phase(phase).freeze_encoder
        state = model.state_dict()
        master = {k: state[k].detach().float().clone() for k in exchanged_keys(model, phase, freeze)}
        frozen = {k: state[k].detach().float() for k in frozen_keys(model, phase, freeze)}
        fp32 = ArrayRecord({k: Array(v.numpy()) for k, v in master.items()})
        down = encode(master, self.wire) if self.wire != "float32" else fp32
        if not frozen:
            return Outgoing(master, fp32, down, down, "")
        with_frozen = ArrayRecord()
        for name, array in [*down.items(), *encode(frozen, self.wire).items()]:
            with_frozen[name] = array
        return Outgoing(master, fp32, down, with_frozen, state_hash(wire_round(frozen, self.wire)))

    def address(self, planned: list[Message], out: Outgoing, message_type: str) -> list[Message]:
        """One message per site the strategy sampled, carrying the frozen encoder only where it is missing."""
        messages = []
        for m in planned:
            node = m.metadata.dst_node_id
            arrays = out.with_frozen if out.frozen_digest and node not in self.holding_frozen else out.down
            messages.append(Message(RecordDict({"arrays": arrays, "config": m.content["config"]}), node, message_type))
        return messages

    def exchange(self, grid: Grid, messages: list[Message], need: int = 1) -> list[tuple[Message, Message | None]]:
        """Send, then collect replies until all are in or the deadline passes.

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
        ids = list(grid.push_messages(messages))
        by_id = dict(zip(ids, messages, strict=True))
        if self.trace is not None:
            for m in messages:
                self.trace.record("sent", m)
        got: dict[str, Message] = {}
        deadline = time.time() + self.timeout
        pending = {i: (i, time.time()) for i in ids}  # message id now awaited -> (the first one's id, sent at)
        offline: dict[str, tuple[float, Message]] = {}  # first id -> (since when, Flower's unavailable reply)
        next_check = time.time() + self.settings.node_check_interval

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
                if _unavailable(reply):
                    node = by_id[first].metadata.dst_node_id
                    self.site_dropped(node, "stopped answering: Flower reports it offline (no heartbeat)")
                    offline[first] = (offline.get(first, (time.time(), reply))[0], reply)
                else:
                    got[first] = reply
            if time.time() >= next_check:
                next_check = time.time() + self.settings.node_check_interval
                activated = _activations(grid)
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
                    elif time.time() >= since + self.settings.resend_for or (not pending and answered >= need):
                        del offline[first]
                        got[first] = reply
            if pending or offline:
                time.sleep(self.settings.poll_interval)
        return [(by_id[i], got.get(i)) for i in ids]

    def federated_evaluate(
        self,
        grid: Grid,
        phase: str,
        server_round: int,
        model: EchoVisionFM,
        strategy: Strategy,
        train_config: ConfigRecord,
    ) -> dict[str, float]:
        """Each sampled site scores the new global model on its validation split; means weighted by videos."""
        out = self.outgoing(model, phase)
        seed_sampling(round_seed(self.cfg.run.seed, phase, server_round, "evaluate"))
        planned = list(strategy.configure_evaluate(server_round, out.fp32, ConfigRecord(dict(train_config)), grid))
        messages = self.address(planned, out, MessageType.EVALUATE)
        results = [self.check_evaluate_reply(msg, reply) for msg, reply in self.exchange(grid, messages)]
        self.one_reply_per_site(results, "evaluate")
        for r in results:
            self._record_site(phase, server_round, "evaluate", r)
            if r.status == "ok" and out.frozen_digest:
                self.holding_frozen.add(r.node_id)
        return weighted_means([r.metrics for r in results if r.status == "ok"])

    def check_evaluate_reply(self, msg: Message, reply: Message | None) -> SiteReply:
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
                return SiteReply(site, node, status, reason=_error_reason(reply), bytes_down=down)
            if who.problem:
                raise UpdateError(who.problem)
            if "metrics" not in reply.content:
                raise UpdateError("the reply lacks its metrics")
            metrics = reply_metrics(reply.content["metrics"], undefined=True)  # NaN: a score undefined at the site
            claimed_examples(metrics, self.settings.examples_cap(site), minimum=0)
        except Exception as e:
            return self.reject(SiteReply(site, node, "ok", bytes_down=down), _reason(e), "evaluate")
        return SiteReply(site, node, "ok", metrics, bytes_down=down)

    # ------------------------------------------------------- server's own set
    def server_evaluate(self, phase: str, model: EchoVisionFM) -> dict[str, float]:
        """The global model on the server's own held-out set (its test split), when it has one."""
        data = self.settings.eval_data
        if data is None:
            return {}
        pcfg = self.cfg.phase(phase)
        tasks = tuple(pcfg.tasks) if phase == "finetune" else ()
        local = self.cfg.local
        if self.settings.eval_cache is not None:
            local = local.with_data(cache=str(self.settings.eval_cache))
        sets = make_datasets(local, model, tasks, data, pcfg.seed)
        if phase == "pretrain":
            held = sets["val_clips"]
            held.prepare(progress=False)
            return {"server_loss": pretrain_loss(model, held, pcfg.batch_size, pcfg.seed)} if len(held) else {}
        held = sets["test"]
        held.prepare(progress=False)
        if not len(held):
            return {}
        metrics = evaluate(model, held, list(tasks))
        return {f"server_{k}": v for k, v in metrics.items() if k != "videos"}


def weighted_means(replies: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the sites' replies, weighted by their `num-examples`, over only the sites where it is
    defined: a site whose value is NaN (e.g. AUROC of a validation split with one class) is left out of that
    metric's mean and of its weight, never counted as 0. `<metric>.sites` says how many sites each mean is over."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    sites: dict[str, int] = {}
    for metrics in replies:
        n = float(metrics.get("num-examples", 0))
        if not n > 0:
            continue
        for k, v in metrics.items():
            if k == "num-examples" or not math.isfinite(v):
                continue
            totals[k] = totals.get(k, 0.0) + n * v
            weights[k] = weights.get(k, 0.0) + n
            sites[k] = sites.get(k, 0) + 1
    out: dict[str, float] = {}
    for k, total in totals.items():
        mean = total / weights[k]
        if math.isfinite(mean):  # finite metrics can still overflow a sum
            out[k] = mean
            out[k + SITES_SUFFIX] = float(sites[k])
    return out


def _activations(grid: Grid) -> dict[int, float]:
    """node id -> when Flower last activated it (epoch seconds; 0 when unknown), for the sites online now."""
    out: dict[int, float] = {}
    for info in grid.get_nodes():
        when = 0.0
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            if info.last_activated_at:
                when = datetime.fromisoformat(info.last_activated_at).timestamp()
        out[int(info.node_id)] = when
    return out


OFFLINE_REASON = "offline: the site stopped sending heartbeats (crashed, stopped or cut off) and did not come back"


def _error_reason(reply: Message) -> str:
    """A failed reply's reason in the store: fedecho's words for Flower's "node unavailable", else the site's."""
    return OFFLINE_REASON if _unavailable(reply) else str(reply.error.reason)


def _unavailable(reply: Message) -> bool:
    """Flower's own answer for a SuperNode it considers offline (no heartbeat within 2 x its interval)."""
    return reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
