"""The server's side of the statistics queries (`fedecho.fl.statistics` says what is asked and why).

`phase_start` asks every connected site for its regression targets' sums before the first fine-tuning round
(`[finetune].target_stats`) and fixes the pooled mean and spread in the global model's heads; a resumed phase
reads them back from its checkpoint instead. `after_aggregation` keeps those statistics exactly what was sent
(an averaging strategy may move a constant by a rounding step) and, with `[finetune].refit`, refits the
regression heads' last layer by federated ridge regression after the last round or after every round.

Every reply is checked like an update before anything of it is used: the site's name from the node Flower
authenticated, its metrics, its video count against the site's cap, each array's name, dtype (float64), shape
and finiteness, each count a whole number from 1 to the videos claimed, Phi^T Phi symmetric. A bad reply is
rejected (an `update-rejected` event and the site's result, nothing of it used); every reply is recorded as the
site's result of kind `query` (round 0 for the target statistics), with the bytes moved. Too few replies:
the target statistics pause the run after the round's retries (fine-tuning without them would learn other
units), a refit is skipped with a `refit-skipped` event and the heads keep their trained weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedecho.fl.config import round_seed
from fedecho.fl.exchange import UpdateError, claimed_examples
from fedecho.fl.statistics import (
    HEAD_STATS,
    QUERY,
    TARGET_STATS,
    combine_targets,
    head_keys,
    head_shapes,
    regression_tasks,
    ridge_solve,
    target_centre,
    target_keys,
    target_shapes,
    uncentre_moment,
)
from fedecho.models import EchoVisionFM
from fedecho.models.heads import is_stat_key, last_linear
from fedecho.server.transport import RoundFailed, TooFewReplies
from fedecho.server.update_checks import SiteReply

if TYPE_CHECKING:
    from fedecho.server.rounds import FederatedRun
    from fedecho.server.transport import DeadlineGrid


def phase_start(run: FederatedRun, grid: DeadlineGrid, phase: str, model: EchoVisionFM) -> None:
    """Before a phase's first round (no checkpoint yet): the federation's target statistics into the heads."""
    pcfg = run.cfg.phase(phase)
    if phase != "finetune" or not pcfg.target_stats:
        return
    tasks = regression_tasks(pcfg.tasks)
    what = f"{phase} target statistics"
    accepted: list[SiteReply] = []

    def attempt() -> None:
        nonlocal accepted
        accepted, results = query(run, grid, phase, 0, TARGET_STATS, None, target_shapes(tasks))
        if len(accepted) < run.quorum:
            raise TooFewReplies(f"{what}: {len(accepted)} of {len(results)} sites answered, {run.quorum} needed",
                                retry=any(r.status == "failed" for r in results))  # fmt: skip

    run.with_retries(grid, what, attempt)
    replies = [{k: v.numpy() for k, v in r.update.items()} for r in accepted if r.update is not None]
    try:
        stats = combine_targets(replies, tasks)
    except ValueError as e:
        raise RoundFailed(f"{what}: {e}") from None
    for t, (mean, std) in stats.items():
        model.heads.set_stats(t, mean, std)
    videos = sum(int(r.update[target_keys(tasks[0])[0]]) for r in accepted if r.update is not None)
    summary = "; ".join(f"{t} mean {m:.5g}, spread {s:.5g}" for t, (m, s) in stats.items())
    run.note(
        "target-stats",
        f"{summary} (encoded targets of {videos} training units at {len(accepted)} sites: "
        f"{', '.join(r.site for r in accepted)})",
    )


def after_aggregation(
    run: FederatedRun,
    grid: DeadlineGrid,
    phase: str,
    server_round: int,
    model: EchoVisionFM,
    sent: dict[str, torch.Tensor],
) -> None:
    """After a round's aggregation (before its evaluation and checkpoint): the target statistics back to what was
    sent (`sent`: the round's fp32 master), then the ridge refit when `[finetune].refit` asks for one now."""
    with torch.no_grad():
        buffers = dict(model.named_buffers())
        for k, v in sent.items():
            if is_stat_key(k) and k in buffers:
                buffers[k].copy_(v)
    pcfg = run.cfg.phase(phase)
    if phase != "finetune" or pcfg.refit == "off" or (pcfg.refit == "end" and server_round != pcfg.rounds):
        return
    refit(run, grid, phase, server_round, model)


def refit(run: FederatedRun, grid: DeadlineGrid, phase: str, server_round: int, model: EchoVisionFM) -> bool:
    """Set every regression head's last layer to the federated ridge solution; False (and a `refit-skipped`
    event) when too few sites answered or the pooled system has no solution."""
    pcfg = run.cfg.phase(phase)
    tasks = regression_tasks(pcfg.tasks)
    heads = {t: model.heads[t] for t in tasks}
    dims = {t: (last_linear(h).in_features, last_linear(h).out_features) for t, h in heads.items()}
    accepted, results = query(run, grid, phase, server_round, HEAD_STATS, model, head_shapes(dims))
    where = f"{phase} round {server_round}"
    if len(accepted) < run.quorum:
        run.note(
            "refit-skipped",
            f"{where}: {len(accepted)} of {len(results)} sites answered the head statistics query, {run.quorum} "
            "needed; the heads keep their trained last layer",
        )
        return False
    solutions = {}
    units = 0.0
    for t in heads:
        count_key, gram_key, moment_key = head_keys(t)
        parts = [r.update for r in accepted if r.update is not None]
        count = sum(float(p[count_key]) for p in parts)
        gram = sum(p[gram_key].numpy() for p in parts)
        moment = sum(p[moment_key].numpy() for p in parts)
        stats = model.heads.stats(t)
        assert stats is not None  # a regression head
        shift, scale = (s.detach().double().cpu().numpy() for s in stats)
        moment = uncentre_moment(gram, moment, target_centre(t, shift, scale))  # type: ignore[arg-type]
        try:
            solutions[t] = ridge_solve(gram, moment, count, pcfg.ridge)  # type: ignore[arg-type]
        except ValueError as e:
            run.note("refit-skipped", f"{where}: {t}: {e}; the heads keep their trained last layer")
            return False
        units = count
    with torch.no_grad():
        for t, w in solutions.items():
            last = last_linear(heads[t])
            last.weight.copy_(torch.from_numpy(w[:-1].T.copy()))
            last.bias.copy_(torch.from_numpy(w[-1].copy()))
    run.note(
        "refit",
        f"{where}: {', '.join(tasks)} heads' last layer refitted by ridge regression (ridge {pcfg.ridge:g}) on "
        f"{units:.0f} training units at {len(accepted)} sites: {', '.join(r.site for r in accepted)}",
    )
    return True


def query(
    run: FederatedRun,
    grid: DeadlineGrid,
    phase: str,
    server_round: int,
    question: str,
    model: EchoVisionFM | None,
    expected: dict[str, tuple[int, ...]],
) -> tuple[list[SiteReply], list[SiteReply]]:
    """Ask every connected site (statistics are the federation's, not a round's sample); returns (the accepted
    replies in site order, all results). `model`: the global model the sites compute on (head statistics)."""
    out = run.outgoing(model, phase) if model is not None else None
    config = ConfigRecord(
        {
            "run-toml": run.cfg.text,
            "phase": phase,
            "seed": round_seed(run.cfg.run.seed, phase, server_round, question),
            "wire-dtype": run.wire,
            "frozen-sha256": out.frozen_digest if out is not None else "",
            "run-id": run.run_id,
            "server-round": server_round,
            QUERY: question,
        }
    )
    messages = []
    for node in sorted(grid.get_node_ids()):
        content = RecordDict({"config": config})
        if out is not None:  # the frozen encoder goes only where it is missing, as with training
            content["arrays"] = out.with_frozen if out.frozen_digest and node not in run.holding_frozen else out.down
        messages.append(Message(content, node, MessageType.QUERY))
    results = [check_query_reply(run, msg, reply, expected) for msg, reply in grid.exchange(messages, run.quorum)]
    run.checks.one_reply_per_site(results, "query")
    for r in results:
        run.record_site(phase, server_round, "query", r)
        if r.status == "ok" and out is not None and out.frozen_digest:
            run.holding_frozen.add(r.node_id)
    return sorted((r for r in results if r.status == "ok"), key=lambda r: r.site), results


def check_query_reply(
    run: FederatedRun, msg: Message, reply: Message | None, expected: dict[str, tuple[int, ...]]
) -> SiteReply:
    """A site's statistics reply, accepted (its arrays as float64 tensors in `update`) or not: whatever is wrong
    with it makes it a rejection naming the reason, and nothing of it is used."""

    def read(site: str, content: RecordDict, metrics: dict[str, float]) -> SiteReply:
        videos = claimed_examples(metrics, run.settings.examples_cap(site))
        values = statistics_arrays(content["arrays"], expected, videos)
        return SiteReply(site, 0, "ok", metrics, update={k: torch.from_numpy(v) for k, v in values.items()})

    return run.checks.reply(msg, reply, "query", read)


def statistics_arrays(record: ArrayRecord, expected: dict[str, tuple[int, ...]], videos: int) -> dict[str, np.ndarray]:
    """The reply's arrays, checked: exactly the expected names, float64, the expected shapes, finite; each count a
    whole number from 1 to the videos the reply claims; each Phi^T Phi symmetric. Raises UpdateError."""
    names = set(record.keys())
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:4])}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:4])}"] if extra else []
        )
        raise UpdateError("statistics names differ from the query's: " + "; ".join(parts))
    out: dict[str, np.ndarray] = {}
    for k, shape in expected.items():
        array = record[k]
        if array.dtype != "float64":
            raise UpdateError(f"statistic {k}: dtype {array.dtype}, expected float64")
        value = np.array(array.numpy(), dtype=np.float64, copy=True)
        if value.shape != shape:
            raise UpdateError(f"statistic {k}: shape {value.shape}, expected {shape}")
        if not np.isfinite(value).all():
            raise UpdateError(f"statistic {k}: holds NaN or infinite values")
        if k.endswith("/count") and not (float(value).is_integer() and 1 <= float(value) <= videos):
            raise UpdateError(f"statistic {k}: {float(value):g} is not a whole number from 1 to the {videos} videos")
        if k.endswith("/gram") and not np.allclose(value, value.T, rtol=1e-9, atol=0.0):
            raise UpdateError(f"statistic {k}: not symmetric")
        out[k] = value
    return out


__all__ = ["after_aggregation", "check_query_reply", "phase_start", "query", "refit", "statistics_arrays"]
