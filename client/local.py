"""What a site does with one message: the local engine (`fedecho.train`), run on the site's data.

`site_train` rebuilds the model the run file names, loads the global tensors it received, trains
for the round's local epochs or steps with the round's learning rate, and returns its update
(local - received) for the exchanged tensors only. `site_evaluate` scores the received model on
the site's validation split. Both count the videos (and patients) behind what they would send against the
site's policy, and reserve a DP round's privacy cost, from the data index before any video is decoded.
The local steps run through `fedecho.train.job.TrainingJob`, over the site's `devices` (data-parallel, the run
file's batch being the global batch) or in this process on one. Nothing here knows about Flower: `client.app`
wraps it in messages.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fedecho.client.site import Site
from fedecho.data import EchoVideoDataset
from fedecho.fl.config import FedRunConfig, round_seed
from fedecho.fl.exchange import FrozenStore, exchanged_keys, frozen_keys
from fedecho.fl.methods import SiteCarry, control_change, control_keys, run_key, scaffold_correct
from fedecho.fl.protocol import MissingFrozen, build_model
from fedecho.models import EchoVisionFM
from fedecho.models.checkpoint import load_state
from fedecho.privacy.dp_policy import kept_units, plan_round
from fedecho.train import Trainer, TrainingJob, evaluate, make_datasets, pick_device, pretrain_loss


def load_received(
    model: EchoVisionFM, cfg: FedRunConfig, phase: str, received: dict[str, torch.Tensor], site: Site, frozen: str
) -> None:
    """Put the received tensors (and, for frozen fine-tuning, the site's copy of the encoder) in place."""
    freeze = cfg.phase(phase).freeze_encoder
    fkeys = frozen_keys(model, phase, freeze)
    store = FrozenStore(site.state / "frozen")
    if fkeys and all(k in received for k in fkeys):
        store.put({k: received[k] for k in fkeys})
    elif fkeys:
        held = store.get(frozen)
        if held is None:
            raise MissingFrozen(f"site {site.name} does not hold the frozen tensors {frozen[:12]}")
        received = {**received, **held}
    load_state(model, received, "the global model", strict=False)


def site_datasets(
    cfg: FedRunConfig, model: EchoVisionFM, phase: str, site: Site, seed: int
) -> dict[str, EchoVideoDataset]:
    local = cfg.local.with_data(cache=str(site.cache), **({"labels": site.labels} if site.labels else {}))
    tasks = tuple(cfg.phase("finetune").tasks) if phase == "finetune" else ()
    return make_datasets(local, model, tasks, site.data, seed, site.partition)


@dataclass
class RoundMethods:
    """What the federated method adds to the site's local steps, set up on every rank before the first: the
    optimiser's kept moments, SCAFFOLD's drift correction (`corrections`: c - c_i per tensor), FedProx's proximal
    term (`mu`, towards the received tensors `anchors`)."""

    lr: float
    optimizer_state: dict[Any, Any] = field(default_factory=dict)
    corrections: dict[str, torch.Tensor] = field(default_factory=dict)
    mu: float = 0.0
    anchors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, trainer: Trainer) -> None:
        if self.optimizer_state:  # the moments only: this round's learning rate stays
            state = trainer.optimizer.state_dict()
            state["state"] = self.optimizer_state
            trainer.optimizer.load_state_dict(state)
        params = dict(trainer.model.named_parameters())
        if self.corrections:
            pairs = [(params[k], c.to(trainer.device)) for k, c in self.corrections.items()]
            trainer.after_step = lambda: scaffold_correct(pairs, self.lr)
        if self.mu > 0:
            anchors = [
                (params[k], v.to(trainer.device)) for k, v in self.anchors.items()
                if k in params and params[k].requires_grad
            ]  # fmt: skip
            mu = self.mu
            trainer.regularizer = lambda: 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in anchors)  # type: ignore[return-value]


class TrainResult(NamedTuple):
    update: dict[str, torch.Tensor]  # local - received, for the exchanged tensors
    metrics: dict[str, float]
    control: dict[str, torch.Tensor] | None = None  # SCAFFOLD: the change of the site's control variate


def site_train(
    cfg: FedRunConfig,
    phase: str,
    received: dict[str, torch.Tensor],
    site: Site,
    options: dict[str, Any],
    control: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train one round locally; returns the update for the exchanged tensors, metrics, and under SCAFFOLD
    (`control`: the server's control variate) the change of the site's own control variate.

    What a site carries from round to round (its control variate, its optimiser's state) is read from the
    state saved after the newest earlier round (`fedecho.fl.methods.SiteCarry`), so a replayed round repeats.

    Everything that can refuse the round comes before the first video is decoded: the site's policy on the
    training set (counted from the data index) and, under DP-SGD, the round's reservation in the privacy ledger."""
    t0 = time.time()
    model = build_model(cfg, phase)
    load_received(model, cfg, phase, received, site, str(options.get("frozen-sha256", "")))
    pcfg = cfg.phase(phase)
    seed = round_seed(int(options["seed"]), phase, 0, site.name)  # the round's seed, made this site's own
    torch.manual_seed(seed)
    sets = site_datasets(cfg, model, phase, site, seed)  # the data index only: nothing decoded yet
    train = sets["train"]
    if phase == "finetune" and cfg.local.data.label_fraction < 1:
        train.limit(cfg.local.data.label_fraction, pcfg.seed)
    site.enforce_data("the training set", train.records)
    plan = plan_round(site.privacy, cfg.dp, [r.group for r in train.records], pcfg.batch_size, pcfg.steps, pcfg.epochs)
    entry = None
    run = f"{cfg.run.name} (run {options.get('run-id', '?')})"
    server_round = int(options.get("server-round", 0))
    if plan is not None:  # DP-SGD: reserved in the site's ledger (or refused) before any video is decoded
        from fedecho.train.dp import reserve_round  # Opacus loads only where DP is used

        entry = reserve_round(
            model, plan, site.state, run=run, phase=phase, server_round=server_round,
            epsilon_max=site.privacy.epsilon_max,
        )  # fmt: skip
    planned = {r.key: i for i, r in enumerate(train.records)}
    train.prepare(progress=False)
    if not len(train):
        raise ValueError(f"site {site.name} has no usable training videos for {phase}")
    site.enforce_data("the training set (after dropping videos that do not decode)", train.records)
    if plan is not None:
        plan = kept_units(plan, [planned[r.key] for r in train.records])
    lr = float(options["lr"])
    # The round's learning rate comes from the server's schedule over rounds: constant within a round.
    round_cfg = dataclasses.replace(pcfg, lr=lr, min_lr=lr, warmup_epochs=0.0, seed=seed, epochs=max(1, pcfg.epochs))
    keys = exchanged_keys(model, phase, pcfg.freeze_encoder)
    carry = None
    carried: dict[str, Any] = {}
    if pcfg.scaffold or pcfg.keep_optimizer:
        carry = SiteCarry(site.state / "carry", run_key(options.get("run-id", "?"), cfg.text), phase)
        carried = carry.load(server_round)
    methods = RoundMethods(lr, carried.get("optimizer", {}) if pcfg.keep_optimizer else {})
    own: dict[str, torch.Tensor] = {}
    if pcfg.scaffold:
        if control is None:
            raise ValueError(f"site {site.name}: the phase uses SCAFFOLD but the message has no control variate")
        own = {k: carried.get("control", {}).get(k, torch.zeros_like(control[k])) for k in control_keys(model, keys)}
        methods.corrections = {k: control[k] - own[k] for k in own}
    methods.mu = float(options.get("proximal-mu", 0.0))
    if methods.mu > 0:
        methods.anchors = {k: received[k] for k in keys}
    dp_seed = 0
    if plan is not None:
        from fedecho.train.dp import secret_seed

        dp_seed = secret_seed()  # drawn here, the same on every device: never the run's seed
    job = TrainingJob(
        model, phase, round_cfg, train, seed, cfg.local.data.num_workers, site.device, steps=pcfg.steps,  # type: ignore[arg-type]
        plan=plan, dp_seed=dp_seed, setup=methods,
    )  # fmt: skip
    result = job.run(site.devices)
    private: dict[str, float] = {}
    if plan is not None and entry is not None:
        from fedecho.train.dp import spend_round

        private = spend_round(site.state, entry, plan)
    state = result.state
    update = {k: state[k].float() - received[k].float().cpu() for k in keys}
    change = None
    if pcfg.scaffold:
        assert control is not None
        end = {k: state[k].float() for k in own}
        change = control_change({k: received[k].float().cpu() for k in own}, end, control, result.updates, lr)
        own = {k: own[k] + change[k] for k in own}
    if carry is not None:
        carry.save(server_round, {"control": own, "optimizer": result.optimizer if pcfg.keep_optimizer else {}})
    metrics = {
        "num-examples": float(len(train)),
        "train_loss": result.loss,
        "steps": float(result.steps),
        "seconds": time.time() - t0,
        **private,
    }
    return TrainResult(update, metrics, change)


@torch.no_grad()
def site_evaluate(
    cfg: FedRunConfig, phase: str, received: dict[str, torch.Tensor], site: Site, options: dict[str, Any]
) -> dict[str, float]:
    """Score the received global model on the site's validation split."""
    model = build_model(cfg, phase)
    load_received(model, cfg, phase, received, site, str(options.get("frozen-sha256", "")))
    model.to(pick_device(site.device))
    pcfg = cfg.phase(phase)
    sets = site_datasets(cfg, model, phase, site, pcfg.seed)  # the data index only: nothing decoded yet
    val = sets["val_clips" if phase == "pretrain" else "val"]
    if not val.records:  # no validation split here: nothing is computed, nothing but the count leaves
        return {"num-examples": 0.0}
    site.enforce_data("the validation split", val.records)  # before any video is decoded
    val.prepare(progress=False)
    site.enforce_data("the validation split (after dropping videos that do not decode)", val.records)
    if phase == "pretrain":
        loss = pretrain_loss(model, val, pcfg.batch_size, pcfg.seed)
        return {"num-examples": float(len(val)), "val_loss": loss}
    metrics = evaluate(model, val, list(pcfg.tasks))
    return {"num-examples": float(len(val)), **{f"val_{k}": v for k, v in metrics.items() if k != "videos"}}
