"""fedecho's round loop: Flower's strategies aggregate, fedecho persists and resumes.

Flower's `Strategy.start` counts rounds from 1 and keeps everything in memory. `FederatedRun`
drives the same strategy objects (`configure_train`, `aggregate_train`) itself so that it can:
- send the exchanged tensors in the run's wire precision, and per site the frozen encoder when a
  site does not hold it yet (`outgoing`, `address`);
- ride out site outages (`fedecho.server.transport.DeadlineGrid`, the Grid it drives): a round goes on
  with the sites that answered once the run's quorum did; a site Flower reports offline (no heartbeat)
  is not waited for once the others are in; a round with too few replies is retried, and after that the
  run pauses (resumable, one line, no traceback). Every drop, rejoin, retry and pause is an event in the
  store under the site's name;
- check every reply before aggregation (`fedecho.server.update_checks`: the strategy is wrapped in
  `CheckedUpdates`, which hands it only the accepted updates, as fp32 weights): no reply, however
  malformed, stops a run; whatever is wrong with it makes it a rejected reply, recorded under its site's
  name with the reason, and the round goes on with the others;
- score the new global model at the sites and on the server's own set (`fedecho.server.evaluation`);
- checkpoint the global model and the strategy's state after every round and record the round,
  every site's result and the bytes moved in the store;
- resume a stopped run from its newest valid checkpoint, replaying exactly what an uninterrupted
  run would have done (seeds depend only on run, phase, round and site; replies are aggregated
  in site order).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedecho.fl.config import FedRunConfig, parse_run_config, round_lr, round_seed
from fedecho.fl.exchange import encode, exchanged_keys, frozen_keys, state_hash, wire_round
from fedecho.fl.methods import CONTROL, ServerControl, control_keys
from fedecho.fl.protocol import build_model
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
from fedecho.server.checkpoints import latest_valid, prune_checkpoints, write_checkpoint
from fedecho.server.config import DEFAULT_MAX_EXAMPLES
from fedecho.server.evaluation import federated_evaluate, server_evaluate, weighted_means
from fedecho.server.identity import SiteNames
from fedecho.server.statistics import after_aggregation, phase_start
from fedecho.server.trace import MessageTrace
from fedecho.server.transport import OFFLINE_REASON, DeadlineGrid, RoundFailed, TooFewReplies
from fedecho.server.update_checks import CheckedUpdates, SiteReply, UpdateChecks, stored_count
from fedecho.storage import Store
from fedecho.train.run import init_encoder

log = logging.getLogger("fedecho.server")


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
class Outgoing:
    master: dict[str, torch.Tensor]  # fp32 copies of the exchanged tensors
    fp32: ArrayRecord  # what the strategy sees (FedOpt keeps it as its current weights)
    down: ArrayRecord  # the same in the wire precision
    with_frozen: ArrayRecord  # down plus the frozen encoder (frozen-encoder fine-tuning)
    frozen_digest: str  # hash of the frozen tensors as a site holds them; "" when nothing is frozen


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
        self.timeout = self.cfg.run.round_timeout or settings.round_timeout
        self.wire = self.cfg.run.wire_dtype
        self.site_names = settings.site_names
        self.checks = UpdateChecks(
            self.store, self.run_id, settings.site_names, settings.examples_cap, wire=self.wire,
            max_update_norm=self.cfg.run.max_update_norm, norm_factor=self.cfg.run.norm_factor,
        )  # fmt: skip
        self.holding_frozen: set[int] = set()
        self.server_peak_lr: float | None = None  # a server optimiser's configured eta (schedule_server_lr)
        self.control: ServerControl | None = None  # SCAFFOLD's server control variate, in phases that use it
        self.on_round = on_round
        self.final: dict[str, Path] = {}
        trace = settings.state / "trace" / f"run-{self.run_id:04d}"
        self.trace = MessageTrace(trace) if settings.trace_messages else None

    def transport(self, grid: Grid) -> DeadlineGrid:
        """`grid` with the run's deadlines, resends and site watch (`fedecho.server.transport`), its events noted
        under the sites' names."""
        if isinstance(grid, DeadlineGrid):
            return grid
        s = self.settings
        return DeadlineGrid(
            grid, timeout=self.timeout, note=self.note, name=lambda node: self.checks.identify(node, None).name,
            poll_interval=s.poll_interval, node_check_interval=s.node_check_interval, resend_for=s.resend_for,
            site_wait=s.site_wait, retries=s.round_retries, trace=self.trace,
        )  # fmt: skip

    # ----------------------------------------------------------------- phases
    def execute(self, grid: Grid) -> int:
        if self.already_finished:
            return self.run_id
        deadline_grid = self.transport(grid)
        try:
            previous: EchoVisionFM | None = None
            for phase in self.cfg.phases:
                previous = self.run_phase(deadline_grid, phase, previous)
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

    def run_phase(self, grid: DeadlineGrid, phase: str, previous: EchoVisionFM | None) -> EchoVisionFM:
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
        checked = CheckedUpdates(strategy, self.checks, self.quorum)
        checked.control = self.control
        self.holding_frozen.clear()
        if start == 1:  # [finetune].target_stats; a resumed phase has them in its checkpoint
            phase_start(self, grid, phase, model)
        for server_round in range(start, pcfg.rounds + 1):
            self.round_with_retries(grid, phase, server_round, model, checked)
        return model

    # ------------------------------------------------------------ dropouts
    def round_with_retries(
        self, grid: DeadlineGrid, phase: str, server_round: int, model: EchoVisionFM, strategy: CheckedUpdates
    ) -> None:
        """One round, attempted again (same seeds, so the same work) while too few sites replied, up to
        `round_retries` times; then the run pauses (RoundFailed). Each retry first waits for enough sites."""
        self.with_retries(grid, f"{phase} round {server_round}", lambda: self.one_round(grid, phase, server_round,
                                                                                     model, strategy))  # fmt: skip
        self.rounds_done += 1

    def with_retries(self, grid: DeadlineGrid, what: str, attempt: Callable[[], None]) -> None:
        """`attempt` (a round, or a statistics query) with the transport's retries (`DeadlineGrid.with_retries`),
        each after waiting for enough sites: the first round waits for the run's start_sites, later ones for its
        quorum."""
        grid.with_retries(what, attempt, self.start_sites if self.rounds_done == 0 else self.quorum)

    def note(self, kind: str, message: str, site: str | None = None) -> None:
        """An event in the store, a log line, and a line on stdout (`fedecho server run` streams it)."""
        self.store.add_event(self.run_id, kind, message, site=site)
        line = f"site {site} {message}" if site else message
        log.info("%s: %s", kind, line)
        print(f"{kind}: {line}", flush=True)

    # ------------------------------------------------------------------ round
    def one_round(
        self, grid: DeadlineGrid, phase: str, server_round: int, model: EchoVisionFM, strategy: CheckedUpdates
    ) -> None:
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
        schedule_server_lr(strategy.strategy, self.server_peak_lr, round_lr(pcfg, server_round) / pcfg.lr)
        planned = list(strategy.configure_train(server_round, out.fp32, config, grid))
        messages = self.address(planned, out, MessageType.TRAIN)
        if self.control is not None:  # SCAFFOLD: every site gets the server's control variate with the model
            control = encode(self.control.c, self.wire)
            for m in messages:
                m.content[CONTROL] = control
        connected = len(messages)
        deliveries = grid.exchange(messages, need=self.quorum)
        strategy.expect(deliveries)
        # The checks, then the wrapped strategy's aggregation of the accepted replies (`CheckedUpdates`).
        new_arrays, train_metrics = strategy.aggregate_train(
            server_round, [d.reply for d in deliveries if d.reply is not None]
        )
        results, accepted = strategy.results, strategy.accepted
        if out.frozen_digest:
            self.holding_frozen.update(r.node_id for r in results if r.status == "ok")
        if len(accepted) < self.quorum:
            for r in results:
                self.record_site(phase, server_round, "train", r)
            raise TooFewReplies(
                f"{phase} round {server_round}: {len(accepted)} of {len(messages)} sites answered, "
                f"{self.quorum} needed",
                retry=any(r.status == "failed" for r in results),
            )
        if new_arrays is None:
            raise TooFewReplies(f"{phase} round {server_round}: the strategy returned no model", retry=False)
        new_state = {k: torch.from_numpy(np.array(new_arrays[k].numpy(), dtype=np.float32)) for k in keys}
        model.load_state_dict(new_state, strict=False)
        if self.control is not None:
            weights = [float(r.metrics.get("num-examples", 1.0)) for r in accepted]
            sites = max(connected, round(connected / self.cfg.run.fraction))  # the sites the round could have asked
            self.control.update([r.control for r in accepted if r.control is not None], weights, sites)
        for r in results:
            self.record_site(phase, server_round, "train", r)
        after_aggregation(self, grid, phase, server_round, model, master)  # target statistics kept; [finetune].refit
        evaluate_metrics: dict[str, float] = {}
        every = pcfg.eval_every
        if server_round == pcfg.rounds or (every and server_round % every == 0):
            evaluate_metrics = federated_evaluate(self, grid, phase, server_round, model, strategy, config)
        server_metrics = server_evaluate(self.cfg, self.settings, phase, model)
        train = {
            k: float(v) for k, v in (train_metrics or {}).items() if isinstance(v, int | float) and math.isfinite(v)
        }  # the sites' metrics are finite, but a weighted sum of huge ones is not
        # The round first, then its checkpoint: a crash in between redoes the round on resume (the
        # round's row is replaced), never a checkpoint whose round the store does not know.
        self.store.add_round(
            self.run_id, phase, server_round, started=t0, finished=time.time(), sites_sampled=len(messages),
            sites_replied=len(accepted), train=train, evaluate=evaluate_metrics, server=server_metrics,
        )  # fmt: skip
        inner = strategy.strategy
        sstate = {**strategy_state(inner), **(self.control.state() if self.control is not None else {})}
        write_checkpoint(self.store, self.checkpoints, self.run_id, phase, server_round, model, sstate)
        prune_checkpoints(self.store, self.checkpoints, self.run_id, phase, self.cfg.run.keep_checkpoints)
        summary = {"sites": f"{len(accepted)}/{len(messages)}", **train, **evaluate_metrics, **server_metrics}
        log.info("%s round %d/%d: %s", phase, server_round, pcfg.rounds, summary)
        if self.on_round:
            self.on_round(phase, server_round, summary)

    def check_train_reply(self, msg: Message, reply: Message | None, expected: dict[str, torch.Size]) -> SiteReply:
        """A site's training reply on its own (`UpdateChecks.train_reply`), against this phase's control variate."""
        return self.checks.train_reply(msg, reply, expected, self.control)

    def record_site(self, phase: str, server_round: int, kind: str, r: SiteReply) -> None:
        """A reply's verdict as the site's result of the round and an audit row."""
        self.store.add_site_result(
            self.run_id, phase, server_round, r.site, kind, status=r.status, metrics=r.metrics,
            num_examples=stored_count(r.metrics.get("num-examples", 0)), bytes_down=r.bytes_down,
            bytes_up=r.bytes_up, reason=r.reason,
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


__all__ = [
    "OFFLINE_REASON", "FederatedRun", "Outgoing", "RoundFailed", "ServerSettings", "SiteReply", "TooFewReplies",
    "weighted_means",
]  # fmt: skip
