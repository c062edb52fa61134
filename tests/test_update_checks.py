"""A site cannot take the federation over: the server names each reply's site from the node Flower
authenticated, bounds update norms by the round's own updates, checks claimed example counts and metrics, and
turns whatever else is wrong with a reply into a rejection while the round goes on with the others.

The round-level tests drive `FederatedRun` with a small in-process Grid: the Ray simulation cannot test the
site names, since Flower draws its virtual nodes' ids inside it, where no registry can name them
(tests/test_misbehaving_site.py runs the same attacks on real processes, and the simulation test below the
numerical ones)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tamper
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import load_file

from builders import TINY_DATA, tiny_run
from fedecho.fl.config import parse_run_config
from fedecho.fl.exchange import UpdateError, adaptive_norm_bound, claimed_examples, decode, encode, reply_metrics
from fedecho.server.app import settings_from_run_config
from fedecho.server.config import DEFAULT_MAX_EXAMPLES, load_server_config
from fedecho.server.identity import RegistryNames, SiteNames
from fedecho.server.rounds import FederatedRun, ServerSettings
from fedecho.server.submit import app_config
from fedecho.storage import Store
from fedecho.train import ConfigError

# ------------------------------------------------------------------ the checks


def test_adaptive_bound_is_factor_times_the_lower_median_of_nonzero_norms() -> None:
    assert adaptive_norm_bound([0.1, 0.1 * 1e6], 10.0) == pytest.approx(1.0)  # two sites: the inflated one cannot
    assert adaptive_norm_bound([3.0, 1.0, 2.0, 1e9], 10.0) == pytest.approx(20.0)  # lower median of four
    assert adaptive_norm_bound([0.0, 0.0, 2.0], 10.0) == pytest.approx(20.0)  # zero updates are left out
    assert adaptive_norm_bound([5.0], 10.0) == pytest.approx(50.0)  # alone: its own reference
    assert adaptive_norm_bound([0.0], 10.0) is None and adaptive_norm_bound([1.0, 2.0], 0.0) is None


@pytest.mark.parametrize(
    ("count", "reason"),
    [
        (1e9, "num-examples 1000000000 exceeds what this site may claim (100)"),
        (math.nan, "num-examples nan is not a whole number"),
        (math.inf, "num-examples inf is not a whole number"),
        (3.5, "num-examples 3.5 is not a whole number"),
        (0.0, "num-examples 0 is below 1"),
        (-4.0, "num-examples -4 is below 1"),
    ],
)
def test_claimed_example_counts_are_whole_and_capped(count: float, reason: str) -> None:
    with pytest.raises(UpdateError) as e:
        claimed_examples({"num-examples": count}, cap=100)
    assert str(e.value) == reason
    assert claimed_examples({"num-examples": 100.0}, cap=100) == 100
    assert claimed_examples({"num-examples": 0.0}, cap=100, minimum=0) == 0  # an evaluation without videos


def test_metrics_must_be_finite_numbers() -> None:
    assert reply_metrics(MetricRecord({"num-examples": 3, "loss": 0.5})) == {"num-examples": 3.0, "loss": 0.5}
    with pytest.raises(UpdateError, match="metric 'loss' is not finite: inf"):
        reply_metrics(MetricRecord({"num-examples": 3, "loss": math.inf}))
    with pytest.raises(UpdateError, match="metric 'loss' is not a number"):
        reply_metrics(MetricRecord({"loss": [0.5, 0.25]}))
    assert math.isnan(reply_metrics(MetricRecord({"num-examples": 3, "r2": math.nan}), undefined=True)["r2"])
    for undefined in ({"num-examples": math.nan}, {"num-examples": 3, "r2": -math.inf}):  # not even in evaluation
        with pytest.raises(UpdateError, match="is not finite"):
            reply_metrics(MetricRecord(undefined), undefined=True)
    with pytest.raises(UpdateError, match="metric 'num-examples' is not a number: 'many'"):
        reply_metrics(ConfigRecord({"num-examples": "many"}))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["-1.0", "nan"])
def test_norm_factor_must_not_be_negative(value: str) -> None:
    assert parse_run_config(tiny_run(), "x").run.norm_factor == 10.0  # on by default
    text = tiny_run().replace('wire_dtype = "float32"', f'wire_dtype = "float32"\nnorm_factor = {value}')
    with pytest.raises(ConfigError, match=r"x: \[run\].norm_factor must be >= 0"):
        parse_run_config(text, "x")


def test_server_caps_claimed_examples_and_carries_the_caps_to_the_server_app(tmp_path: Path) -> None:
    shipped = load_server_config("configs/server.toml")
    assert shipped.max_examples == DEFAULT_MAX_EXAMPLES and not shipped.max_examples_per_site
    assert set(app_config(shipped, "")) == {
        "fedecho-run-toml", "fedecho-state", "fedecho-resume", "fedecho-round-timeout", "fedecho-min-sites",
        "fedecho-eval-data", "fedecho-store", "fedecho-quorum", "fedecho-site-wait", "fedecho-round-retries",
    }  # defaults: no examples caps travel  # fmt: skip
    path = tmp_path / "server.toml"
    base = '[server]\naddress = "127.0.0.1:9093"\n'
    path.write_text(base + "max_examples = 500\n[server.max_examples_per_site]\nalpha = 9000\n")
    cfg = load_server_config(path)
    assert (cfg.examples_cap("alpha"), cfg.examples_cap("bravo")) == (9000, 500)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=app_config(cfg, "x"))
    _, settings, _ = settings_from_run_config(context)
    assert (settings.examples_cap("alpha"), settings.examples_cap("bravo")) == (9000, 500)
    assert isinstance(settings.site_names, RegistryNames) and settings.site_names.state == cfg.state
    for body, message in [
        ('max_examples = "lots"\n', "[server].max_examples must be an integer"),
        ("max_examples = 0\n", "[server].max_examples must be at least 1"),
        ('[server.max_examples_per_site]\nalpha = "9k"\n', "[server.max_examples_per_site].alpha must be an integer"),
        ("[server.max_examples_per_site]\nalpha = 2.5\n", "[server.max_examples_per_site].alpha must be an integer"),
        ("[server.max_examples_per_site]\nalpha = 0\n", "[server.max_examples_per_site].alpha must be at least 1"),
        ("max_examples_per_site = 3\n", "[server].max_examples_per_site must be a table"),
    ]:
        path.write_text(base + body)
        with pytest.raises(ConfigError) as e:
            load_server_config(path)
        assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_registry_names_a_reply_by_its_node(tmp_path: Path) -> None:
    names = RegistryNames(state=tmp_path)
    assert names.identify(101, "alpha").name == "alpha" and not names.trusted  # no registry: the reply's name
    registry = {"alpha": {"node_id": "101", "public_key": "k1"}, "bravo": {"node_id": "", "public_key": "k2"}}
    (tmp_path / "sites.json").write_text(json.dumps(registry))
    assert names.identify(101, "alpha").name == "alpha" and names.trusted  # read again for an unknown node
    assert names.identify(101, "bravo").problem == "node 101 is registered as site 'alpha'; its reply names 'bravo'"
    assert names.identify(101, "bravo").name == "alpha"
    unbound = f"node 102 is not a registered site ({tmp_path / 'sites.json'} has no node id for bravo)"
    assert names.identify(102, "bravo").problem == unbound
    registry["bravo"]["node_id"] = "102"  # registered while the run goes on
    (tmp_path / "sites.json").write_text(json.dumps(registry))
    assert names.identify(102, "bravo").name == "bravo" and not names.identify(102, "bravo").problem
    assert names.identify(7, "").name == "node-7"
    (tmp_path / "superlink.pid").write_text(json.dumps({"pid": 1, "insecure": True}))
    assert names.identify(101, "bravo").name == "bravo"  # --insecure: node ids are not authenticated


# ---------------------------------------------------------- rounds in process

REGISTRY = {"alpha": 101, "bravo": 102, "mallory": 103}
EXAMPLES = {"alpha": 7, "bravo": 5, "mallory": 6, "dave": 4}


class LocalGrid(Grid):
    """Flower's Grid for nodes answered in this process: `answer(message, node)` gives each reply."""

    def __init__(self, nodes: dict[int, str], misbehave: str = "") -> None:
        self.nodes, self.misbehave = nodes, misbehave
        self.replies: dict[str, Message] = {}

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            mid = f"m{len(self.replies)}"
            m.metadata.__dict__["_message_id"] = mid
            self.replies[mid] = self.answer(m, m.metadata.dst_node_id)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def answer(self, msg: Message, node: int) -> Message:
        site = self.nodes[node]
        seed = int.from_bytes(hashlib.sha256(site.encode()).digest()[:4], "little")
        if msg.metadata.message_type == "train":
            gen = torch.Generator().manual_seed(seed)
            received = decode(msg.content["arrays"], "float32")
            update = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in received.items()}
            content = RecordDict({"arrays": encode(update, "float32"), "metrics": MetricRecord(
                {"num-examples": float(EXAMPLES[site]), "train_loss": 1.0 + seed % 7})})  # fmt: skip
        else:
            content = RecordDict({"metrics": MetricRecord({"num-examples": 3.0, "val_loss": 0.5 + seed % 5})})
        content["info"] = ConfigRecord({"site": site})
        reply = Message(content, reply_to=msg)
        attack = self.misbehave if site in ("mallory", "dave") else ""
        if attack and not (attack in ("scale", "corrupt") and "arrays" not in content):
            tamper.tamper(reply, attack)
        return reply


@pytest.fixture()
def identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    yield


def _federate(state: Path, nodes: dict[int, str], misbehave: str = "") -> tuple[Store, int]:
    """One pre-training round of the tiny model on `nodes`, sites named by the registry REGISTRY."""
    state.mkdir(parents=True)
    (state / "sites.json").write_text(json.dumps({k: {"node_id": str(v)} for k, v in REGISTRY.items()}))
    text = tiny_run(pretrain_rounds=1, finetune_rounds=0).replace("[run]", "[run]\nmin_sites = 1")
    settings = ServerSettings(state=state, store_url=f"sqlite:///{state}/s.db", site_names=RegistryNames(state=state))
    run = FederatedRun(parse_run_config(text, "x"), settings)
    run.execute(LocalGrid(nodes, misbehave))
    return run.store, run.run_id


def _final(store: Store, run_id: int) -> dict[str, torch.Tensor]:
    return load_file(store.checkpoints(run_id)[0].path)


HONEST = {101: "alpha", 102: "bravo"}


@pytest.mark.parametrize(
    ("attack", "node", "recorded", "reason"),
    [
        ("scale", 103, "mallory", "update norm {} exceeds 10 x the round's reference norm"),
        ("count:1e9", 103, "mallory", "num-examples 1000000000 exceeds what this site may claim (100000)"),
        ("count:nan", 103, "mallory", "metric 'num-examples' is not finite: nan"),
        ("count:inf", 103, "mallory", "metric 'num-examples' is not finite: inf"),
        ("count:2.5", 103, "mallory", "num-examples 2.5 is not a whole number"),
        ("metric:train_loss:inf", 103, "mallory", "metric 'train_loss' is not finite: inf"),
        ("name:alpha", 103, "mallory", "node 103 is registered as site 'mallory'; its reply names 'alpha'"),
        ("", 104, "node-104", "node 104 is not a registered site"),
        ("garbage", 103, "mallory", "the reply's arrays are a ConfigRecord, not an ArrayRecord"),
        ("corrupt", 103, "mallory", "ValueError: "),  # anything unexpected: a rejection naming the exception
    ],
)
@pytest.mark.slow
def test_each_attack_is_rejected_and_the_model_is_the_honest_sites_aggregate(
    identity: None, tmp_path: Path, attack: str, node: int, recorded: str, reason: str
) -> None:
    ref_store, ref_run = _federate(tmp_path / "honest", HONEST)
    nodes = {**HONEST, node: "mallory" if node == 103 else "dave"}
    store, run_id = _federate(tmp_path / "attacked", nodes, attack)
    assert store.get_run(run_id).status == "finished"
    results = {(r.kind, r.site): r for r in store.site_results(run_id)}
    assert {k for k, r in results.items() if r.status == "ok"} >= {("train", "alpha"), ("train", "bravo")}
    bad = results["train", recorded]
    head = reason.split("{}")[0]
    assert bad.status == "rejected" and bad.reason.startswith(head) and reason.split("{}")[-1] in bad.reason
    (audit,) = [a for a in store.audit(run_id) if a.kind == "train" and a.node_id == node]
    assert (audit.site, audit.status, audit.reason) == (recorded, "rejected", bad.reason)
    assert any(e.kind == "update-rejected" and e.site == recorded and e.message == bad.reason
               for e in store.events(run_id))  # fmt: skip
    assert not [a for a in store.audit(run_id) if a.site == "alpha" and a.status != "accepted"]
    final, ref = _final(store, run_id), _final(ref_store, ref_run)
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref)
    if attack not in ("scale", "corrupt", ""):  # the same attack on an evaluation reply leaves it out of the means
        assert results["evaluate", recorded].status == "rejected"
        assert store.rounds(run_id)[0].evaluate == ref_store.rounds(ref_run)[0].evaluate


def test_two_replies_under_one_name_are_both_rejected_without_a_registry(identity: None, tmp_path: Path) -> None:
    """Without a registry names come from the replies: a borrowed one cannot be told from the owner's."""
    text = tiny_run(pretrain_rounds=1, finetune_rounds=0).replace("[run]", "[run]\nmin_sites = 1")
    settings = ServerSettings(state=tmp_path, store_url=f"sqlite:///{tmp_path}/s.db", site_names=SiteNames())
    run = FederatedRun(parse_run_config(text, "x"), settings)
    run.execute(LocalGrid({101: "alpha", 102: "bravo", 103: "mallory"}, "name:alpha"))
    train = {r.site: r for r in run.store.site_results(run.run_id) if r.kind == "train"}
    assert train["bravo"].status == "ok"
    for node in ("node-101", "node-103"):
        assert train[node].status == "rejected" and train[node].reason == "nodes 101, 103 all reply as site 'alpha'"


# ------------------------------------------------------------ the simulation

SIM_PLAN = (
    "train:1=scale,train:2=count:1e9,train:3=count:nan,train:4=count:inf,train:5=count:3.5,"
    "train:6=metric:train_loss:inf,evaluate:2=count:nan,evaluate:4=garbage"
)


@pytest.mark.slow
def test_simulated_site_tampering_after_honest_training_changes_nothing(
    federated_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """site02 trains honestly, then tampers with each reply (one attack per round): every reply of its is
    rejected with the reason, the run finishes, and every kept global model equals site01 training alone."""
    import fedecho.sim.run as sim

    text = tiny_run(pretrain_rounds=6, finetune_rounds=0, freeze=False).replace("[run]", "[run]\nmin_sites = 1")
    cfg = parse_run_config(text, "tiny")
    honest = sim.simulate(cfg, federated_phantom, tmp_path / "honest", sites=1, default_policy=TINY_DATA)
    real, plan = sim.build_client_app, tamper.parse_plan(SIM_PLAN)
    monkeypatch.setattr(sim, "build_client_app", lambda resolve: tamper.misbehaving(real(resolve), plan, "site02"))
    monkeypatch.setenv("PYTHONPATH", str(Path(tamper.__file__).parent))  # Ray's workers import tamper
    run_id = sim.simulate(cfg, federated_phantom, tmp_path / "attacked", default_policy=TINY_DATA)
    store = Store(f"sqlite:///{tmp_path / 'attacked' / 'fedecho.db'}")
    ref = Store(f"sqlite:///{tmp_path / 'honest' / 'fedecho.db'}")
    assert store.get_run(run_id).status == "finished"
    cap = sim.example_caps(cfg, ["site02"], [federated_phantom / "site02"])["site02"]
    expected = [
        "update norm ", f"num-examples 1000000000 exceeds what this site may claim ({cap})",
        "metric 'num-examples' is not finite: nan", "metric 'num-examples' is not finite: inf",
        "num-examples 3.5 is not a whole number", "metric 'train_loss' is not finite: inf",
    ]  # fmt: skip
    results = {(r.kind, r.round, r.site): r for r in store.site_results(run_id)}
    for n, reason in enumerate(expected, start=1):
        row = results["train", n, "site02"]
        assert row.status == "rejected" and row.reason.startswith(reason), (n, row.reason)
        assert results["train", n, "site01"].status == "ok"
    assert results["evaluate", 2, "site02"].reason == "metric 'num-examples' is not finite: nan"
    assert results["evaluate", 4, "site02"].reason == "metric 'num-examples' is not a number: 'many'"
    audit = [(a.round, a.status) for a in store.audit(run_id) if a.site == "site02" and a.kind == "train"]
    assert audit == [(n, "rejected") for n in range(1, 7)]
    mine = {(c.phase, c.round): load_file(c.path) for c in store.checkpoints(run_id)}
    theirs = {(c.phase, c.round): load_file(c.path) for c in ref.checkpoints(honest)}
    assert sorted(mine) == sorted(theirs) and len(mine) == 3
    for key, tensors in theirs.items():
        assert all(torch.equal(mine[key][k], tensors[k]) for k in tensors), key
    for n in (2, 4):  # a rejected evaluation is left out of the means: site01's alone
        assert store.rounds(run_id)[n - 1].evaluate == ref.rounds(honest)[n - 1].evaluate
