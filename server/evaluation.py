"""Scoring a round's global model: at the sites on their validation splits, and on the server's own held-out set.

`federated_evaluate` asks the strategy's sample of sites to score the new global model; each reply is checked
(`fedecho.server.update_checks.UpdateChecks.evaluate_reply`) and recorded as the site's result of kind `evaluate`,
and the accepted ones are averaged weighted by their videos (`weighted_means`: fedecho's means, not the strategy's
`aggregate_evaluate`, so that a metric undefined at a site is left out instead of counted). `server_evaluate` scores
the model on the test split of the server's own data, when it has some (`--eval-data`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, MessageType
from flwr.serverapp.strategy import Strategy

from fedecho.fl.config import FedRunConfig, round_seed
from fedecho.fl.strategies import seed_sampling
from fedecho.models import EchoVisionFM
from fedecho.storage.store import SITES_SUFFIX
from fedecho.train import evaluate, make_datasets, pretrain_loss

if TYPE_CHECKING:
    from fedecho.server.rounds import FederatedRun, ServerSettings
    from fedecho.server.transport import DeadlineGrid


def federated_evaluate(
    run: FederatedRun,
    grid: DeadlineGrid,
    phase: str,
    server_round: int,
    model: EchoVisionFM,
    strategy: Strategy,
    train_config: ConfigRecord,
) -> dict[str, float]:
    """Each sampled site scores the new global model on its validation split; means weighted by videos."""
    out = run.outgoing(model, phase)
    seed_sampling(round_seed(run.cfg.run.seed, phase, server_round, "evaluate"))
    planned = list(strategy.configure_evaluate(server_round, out.fp32, ConfigRecord(dict(train_config)), grid))
    messages = run.address(planned, out, MessageType.EVALUATE)
    results = [run.checks.evaluate_reply(msg, reply) for msg, reply in grid.exchange(messages)]
    run.checks.one_reply_per_site(results, "evaluate")
    for r in results:
        run.record_site(phase, server_round, "evaluate", r)
        if r.status == "ok" and out.frozen_digest:
            run.holding_frozen.add(r.node_id)
    return weighted_means([r.metrics for r in results if r.status == "ok"])


def server_evaluate(cfg: FedRunConfig, settings: ServerSettings, phase: str, model: EchoVisionFM) -> dict[str, float]:
    """The global model on the server's own held-out set (its test split), when it has one."""
    data = settings.eval_data
    if data is None:
        return {}
    pcfg = cfg.phase(phase)
    tasks = tuple(pcfg.tasks) if phase == "finetune" else ()
    local = cfg.local
    if settings.eval_cache is not None:
        local = local.with_data(cache=str(settings.eval_cache))
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
