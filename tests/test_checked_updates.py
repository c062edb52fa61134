"""The server's update checks as a Flower Strategy wrapper (`fedecho.server.update_checks.CheckedUpdates`): a
malformed reply never reaches the wrapped strategy, the accepted ones reach it as the sites' full fp32 weights, and
too few accepted replies leave the wrapped strategy unasked, as Flower's own strategies answer too few replies."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedecho.fl.exchange import encode
from fedecho.server.identity import SiteNames
from fedecho.server.transport import Delivery
from fedecho.server.update_checks import CheckedUpdates, UpdateChecks
from fedecho.storage import Store


@pytest.fixture()
def identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    yield


class Seen(FedAvg):
    """Flower's FedAvg, keeping what it was asked to aggregate."""

    def __init__(self) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
        self.seen: list[Message] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, ...]:
        self.seen = list(replies)
        return super().aggregate_train(server_round, self.seen)  # type: ignore[return-value]


def _reply(site: str, update: torch.Tensor, examples: float) -> Message:
    content = RecordDict(
        {
            "arrays": encode({"w": update}, "float32"),
            "metrics": MetricRecord({"num-examples": examples, "train_loss": 0.5}),
            "info": ConfigRecord({"site": site}),
        }
    )
    return Message(content, 0, MessageType.TRAIN)


def _round(tmp_path: Path, quorum: int) -> tuple[CheckedUpdates, Seen, Store]:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    run_id = store.create_run("t", "", mode="simulation")
    checks = UpdateChecks(store, run_id, SiteNames(), lambda site: 100, wire="float32", max_update_norm=1e3,
                          norm_factor=10.0)  # fmt: skip
    inner = Seen()
    checked = CheckedUpdates(inner, checks, quorum)
    master = ArrayRecord({"w": encode({"w": torch.ones(3)}, "float32")["w"]})
    checked.configure_train(1, master, ConfigRecord({}), _NoGrid())
    return checked, inner, store


class _NoGrid:
    """configure_train's grid: FedAvg samples from its node ids."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _sent(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), node, MessageType.TRAIN)


def test_rejected_replies_never_reach_the_wrapped_strategy(identity: None, tmp_path: Path) -> None:
    checked, inner, store = _round(tmp_path, quorum=1)
    good = _reply("alpha", torch.full((3,), 0.5), 4.0)
    bad = _reply("mallory", torch.full((3,), float("nan")), 4.0)
    checked.expect([Delivery(_sent(1), good), Delivery(_sent(2), bad), Delivery(_sent(3), None)])
    arrays, _ = checked.aggregate_train(1, [good, bad])
    assert arrays is not None and torch.equal(torch.from_numpy(arrays["w"].numpy()), torch.full((3,), 1.5))
    assert len(inner.seen) == 1  # alpha's weights alone: the global 1.0 plus its update 0.5
    assert [(r.site, r.status) for r in checked.results] == [("alpha", "ok"), ("mallory", "rejected"),
                                                              ("node-3", "failed")]  # fmt: skip
    assert checked.results[2].reason == "no reply before the deadline"
    (event,) = [e for e in store.events(checked.checks.run_id) if e.kind == "update-rejected"]
    assert event.site == "mallory" and "NaN" in event.message


def test_too_few_accepted_replies_leave_the_strategy_unasked(identity: None, tmp_path: Path) -> None:
    checked, inner, _ = _round(tmp_path, quorum=2)
    good = _reply("alpha", torch.full((3,), 0.5), 4.0)
    checked.expect([Delivery(_sent(1), good), Delivery(_sent(2), None)])
    assert checked.aggregate_train(1, [good]) == (None, None)
    assert inner.seen == [] and [r.status for r in checked.results] == ["ok", "failed"]
    with pytest.raises(ValueError, match="does not expect"):
        checked.aggregate_train(1, [_reply("bravo", torch.zeros(3), 1.0)])
