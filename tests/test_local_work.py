"""Real local work per round: SCAFFOLD's control variates, an outer (DiLoCo) optimiser, a site's optimiser
state kept between rounds; each update rule against a hand computation, then trained for real in the
simulation engine, resumed round-exactly, and misconfigured runs rejected naming the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from safetensors.torch import load_file

from builders import TINY_DATA, interrupted_run, tiny_run
from fedecho.fl.config import parse_run_config
from fedecho.fl.methods import ServerControl, SiteCarry, control_change, run_key, scaffold_correct
from fedecho.fl.strategies import OuterOptimizer, build_strategy, load_strategy_state, strategy_state
from fedecho.sim.run import simulate
from fedecho.storage import Store
from fedecho.train import ConfigError


@pytest.fixture
def identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a Flower process need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _reply(weights: dict[str, np.ndarray], examples: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )
    return Message(content, 1, MessageType.TRAIN)


@pytest.mark.usefixtures("identity")
def test_outer_nesterov_step_matches_a_hand_computation() -> None:
    strategy = build_strategy("fedavg", {}, fraction=1.0, min_sites=1, outer=(0.7, 0.9, True))
    assert isinstance(strategy, OuterOptimizer)
    x = np.array([1.0, -2.0], np.float32)
    m = np.zeros(2, np.float32)
    for server_round, (a, b) in enumerate([([0.0, 0.0], [2.0, -4.0]), ([1.0, 1.0], [0.5, -1.5])], start=1):
        strategy._current = ArrayRecord({"w": Array(x)})  # what configure_train records as the round's start
        out, _ = strategy.aggregate_train(
            server_round, [_reply({"w": np.array(a, np.float32)}, 1.0), _reply({"w": np.array(b, np.float32)}, 3.0)]
        )
        assert out is not None
        mean = (1.0 * np.array(a) + 3.0 * np.array(b)) / 4.0  # FedAvg: weighted by examples
        g = x - mean  # the pseudo-gradient
        m = 0.9 * m + g
        expected = x - 0.7 * (g + 0.9 * m)  # Nesterov
        np.testing.assert_allclose(out["w"].numpy(), expected, rtol=1e-6)
        x = expected.astype(np.float32)
    # the momentum is the strategy's state: it survives a checkpoint
    again = build_strategy("fedavg", {}, fraction=1.0, min_sites=1, outer=(0.7, 0.9, True))
    load_strategy_state(again, strategy_state(strategy))
    np.testing.assert_allclose(again.outer_momentum["w"], m, rtol=1e-6)  # type: ignore[attr-defined]


@pytest.mark.usefixtures("identity")
def test_outer_with_lr_one_and_no_momentum_is_the_inner_strategy() -> None:
    strategy = build_strategy("fedavg", {}, fraction=1.0, min_sites=1, outer=(1.0, 0.0, True))
    x = np.array([3.0], np.float32)
    strategy._current = ArrayRecord({"w": Array(x)})  # type: ignore[attr-defined]
    out, _ = strategy.aggregate_train(1, [_reply({"w": np.array([1.0], np.float32)}, 1.0)])
    np.testing.assert_allclose(out["w"].numpy(), [1.0])  # type: ignore[index]


def test_scaffold_site_control_becomes_its_mean_gradient() -> None:
    """Plain SGD with SCAFFOLD's correction: y = x - lr * sum_k (g_k + c - c_i), so the site's new control
    variate c_i + (c_i+ - c_i) is exactly the mean of its local gradients (the method's defining property)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    a = torch.randn(5, 3)
    target = torch.randn(5)
    c, c_i, lr, steps = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.1, 0.4, -0.3]), 0.05, 4
    opt = torch.optim.SGD([w], lr=lr)
    start = {"w": w.detach().clone()}
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((a @ w - target) ** 2).mean()
        loss.backward()
        grads.append(w.grad.detach().clone())  # type: ignore[union-attr]
        opt.step()
        scaffold_correct([(w, c - c_i)], lr)
    change = control_change(start, {"w": w.detach()}, {"w": c}, steps, lr)
    torch.testing.assert_close(c_i + change["w"], torch.stack(grads).mean(0), rtol=1e-5, atol=1e-6)
    # and the hand-computed trajectory
    y = start["w"].clone()
    for g in grads:
        y = y - lr * (g + c - c_i)
    torch.testing.assert_close(w.detach(), y)


def test_server_control_is_the_weighted_mean_change_times_the_share_of_sites() -> None:
    control = ServerControl({"w": torch.Size([2])})
    changes = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    control.update(changes, [1.0, 3.0], sites=4)  # 2 of 4 sites replied
    torch.testing.assert_close(control.c["w"], 0.5 * torch.tensor([0.25, 3.0]))
    again = ServerControl({"w": torch.Size([2])})
    again.load(control.state())
    torch.testing.assert_close(again.c["w"], control.c["w"])


def test_site_carry_reads_the_round_before_and_a_replay_repeats(tmp_path: Path) -> None:
    carry = SiteCarry(tmp_path, run_key(4, "text"), "finetune")
    assert carry.load(1) == {}
    for r in (1, 2, 3, 4, 5):
        carry.save(r, {"control": {"w": torch.tensor([float(r)])}})
    assert float(carry.load(5)["control"]["w"]) == 4.0
    assert float(carry.load(9)["control"]["w"]) == 5.0
    # round 4 is replayed (the server resumed from round 3's checkpoint): it reads round 3 again, and the
    # stale round 5 of the first attempt is gone
    assert float(carry.load(4)["control"]["w"]) == 3.0
    carry.save(4, {"control": {"w": torch.tensor([40.0])}})
    assert float(carry.load(5)["control"]["w"]) == 40.0
    assert sorted(p.name for p in carry.folder.iterdir()) == ["round-00003.pt", "round-00004.pt"]
    assert run_key(4, "text") != run_key(4, "other text")  # a reused run id never inherits another run's state


def _methods_run(**phase: object) -> str:
    text = tiny_run(pretrain_rounds=0, finetune_rounds=3, freeze=False)
    extra = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in phase.items())
    return text.replace('tasks = ["ef"]\n', 'tasks = ["ef"]\noptimizer = "adamw"\n' + extra)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"outer_lr": -1}, "[finetune].outer_lr must be >= 0"),
        ({"outer_momentum": 0.9}, "[finetune].outer_momentum needs [finetune].outer_lr"),
        ({"outer_lr": 0.7, "outer_momentum": 1.0}, "[finetune].outer_momentum must be in [0, 1)"),
        ({"scaffold": 1}, "[finetune].scaffold must be true or false"),
        ({"scafold": True}, "scafold"),
        ({"refit": '"always"'}, "[finetune].refit must be one of"),
        ({"ridge": 0}, "[finetune].ridge must be > 0"),
        ({"ridge": 0.3}, "[finetune].ridge is the refit's penalty"),
        ({"outer_nesterov": False}, "[finetune].outer_nesterov needs [finetune].outer_lr"),
    ],
)
def test_bad_method_settings_name_the_field(edit: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_run_config(_methods_run(**edit), "run.toml")
    assert message in str(e.value)


def test_outer_optimizer_refuses_a_strategy_that_has_its_own() -> None:
    text = _methods_run(outer_lr=0.7).replace('name = "fedavg"', 'name = "fedadam"\neta = 1e-3\ntau = 1e-8')
    text = text.replace("num_frames = 8", 'num_frames = 8\nstf_norm = "group"')
    with pytest.raises(ConfigError, match=r"\[finetune\].outer_lr is an outer optimiser"):
        parse_run_config(text, "run.toml")


def test_label_shift_options_apply_to_fine_tuning_only() -> None:
    text = tiny_run().replace("[pretrain]\n", "[pretrain]\ntarget_stats = true\n")
    with pytest.raises(ConfigError, match=r"\[pretrain\].target_stats applies to fine-tuning only"):
        parse_run_config(text, "run.toml")


@pytest.mark.slow
def test_scaffold_and_outer_momentum_train_and_resume_round_exactly(federated_phantom: Path, tmp_path: Path) -> None:
    """Local AdamW with its moments kept at each site, SCAFFOLD's correction and an outer Nesterov step, on the
    int8 wire: a run stopped after round 2 and resumed equals the uninterrupted one, bit for bit."""
    text = _methods_run(scaffold=True, keep_optimizer=True, outer_lr=0.7, outer_momentum=0.9)
    text = text.replace('wire_dtype = "float32"', 'wire_dtype = "int8"')
    cfg = parse_run_config(text, "tiny")
    whole = simulate(cfg, federated_phantom, tmp_path / "a", default_policy=TINY_DATA)
    ref = Store(f"sqlite:///{tmp_path / 'a' / 'fedecho.db'}")
    assert ref.get_run(whole).status == "finished"
    train = [r for r in ref.site_results(whole) if r.kind == "train"]
    assert train and all(r.status == "ok" for r in train)
    # the control variate travels both ways beside the model: twice the bytes of the update alone, here two
    # int8 records (about a quarter of float32 each) against plain FedAvg's one float32 record
    plain = simulate(
        parse_run_config(_methods_run(), "tiny"), federated_phantom, tmp_path / "p", default_policy=TINY_DATA
    )
    plain_up = [r.bytes_up for r in Store(f"sqlite:///{tmp_path / 'p' / 'fedecho.db'}").site_results(plain)
                if r.kind == "train"]  # fmt: skip
    assert 0.45 < np.mean([r.bytes_up for r in train]) / np.mean(plain_up) < 0.6
    # each site keeps its own control variate and optimiser state, per round, under its state folder
    carried = sorted((tmp_path / "a" / "sites" / "site01" / "carry").rglob("round-*.pt"))
    assert [p.name for p in carried] == ["round-00001.pt", "round-00002.pt", "round-00003.pt"]
    saved = torch.load(carried[-1], weights_only=True)
    assert saved["control"] and saved["optimizer"]  # AdamW's moments
    # the server's control variate and outer momentum are in the checkpoint's strategy state
    ck = ref.checkpoints(whole)[0]
    sstate = load_file(ck.path.replace(".safetensors", ".strategy.safetensors"))
    assert any(k.startswith("control/") for k in sstate) and any(k.startswith("outer_momentum/") for k in sstate)

    # stopped after round 2 with its newest checkpoint lost: the server replays round 2 from round 1, the sites
    # their carried state too
    store, stopped = interrupted_run(cfg, federated_phantom, tmp_path / "b")
    simulate(cfg, federated_phantom, tmp_path / "b", resume=stopped.id, default_policy=TINY_DATA)
    ours = {c.round: load_file(c.path) for c in store.checkpoints(stopped.id)}
    theirs = {c.round: load_file(c.path) for c in ref.checkpoints(whole)}
    assert sorted(ours) == sorted(theirs) == [1, 2, 3]
    for r, model in theirs.items():
        for name, tensor in model.items():
            assert torch.equal(ours[r][name], tensor), (r, name)


@pytest.mark.usefixtures("identity")
def test_a_reply_without_a_good_control_variate_change_is_rejected(tmp_path: Path) -> None:
    """Under SCAFFOLD the server checks the control variate change like the update: missing, misshapen or not
    finite, the reply is rejected and nothing of it reaches the model or the server's control variate."""
    from fedecho.fl.exchange import encode
    from fedecho.fl.methods import CONTROL
    from fedecho.server.rounds import FederatedRun, ServerSettings

    run = FederatedRun(parse_run_config(_methods_run(scaffold=True), "x"), ServerSettings(
        state=tmp_path, store_url=f"sqlite:///{tmp_path}/s.db"))  # fmt: skip
    run.control = ServerControl({"w": torch.Size([3])})
    expected = {"w": torch.Size([3])}
    sent = Message(RecordDict({"arrays": encode({"w": torch.zeros(3)}, "float32")}), 7, MessageType.TRAIN)

    def reply(change: torch.Tensor | None) -> Message:
        content = RecordDict({
            "arrays": encode({"w": torch.full((3,), 0.01)}, "float32"),
            "metrics": MetricRecord({"num-examples": 4.0, "train_loss": 0.5}),
            "info": ConfigRecord({"site": "site09"}),
        })  # fmt: skip
        if change is not None:
            content[CONTROL] = encode({"w": change}, "float32")
        return Message(content, 0, MessageType.TRAIN)

    for bad in (None, torch.zeros(4), torch.tensor([0.0, float("inf"), 0.0])):
        result = run.check_train_reply(sent, reply(bad), expected)
        assert result.status == "rejected" and result.control is None and result.update is None
    assert "control variate" in run.store.events(run.run_id)[-3].message
    good = run.check_train_reply(sent, reply(torch.ones(3)), expected)
    assert good.status == "ok" and good.control is not None
    # its bytes count the control variate beside the update
    assert good.bytes_up == 2 * encode({"w": torch.ones(3)}, "float32").count_bytes()


@pytest.mark.slow
def test_the_first_local_step_moves_every_layer_and_starts_at_the_mean() -> None:
    """A fresh head predicts the population mean, yet the first step's gradient reaches every trained layer: a
    site with one local step per round sends an update of the same kind as a site with many (a zero-initialised
    last layer moved only the head, and the round's norm check then rejected its honest peers)."""
    from builders import TinyVideos
    from fedecho.models import create_model, get_task
    from fedecho.train import Trainer
    from fedecho.train.config import PhaseSection

    torch.manual_seed(0)
    model = create_model("echo_vit_tiny", decoder=False, num_frames=8, tasks=["ef"], stf_norm="group")
    video, info = TinyVideos()[0]
    with torch.no_grad():
        out = model.eval()(video[None], info["frame_index"][None])["ef"]
    assert float(out) == pytest.approx(get_task("ef").init_bias(), abs=1e-3)
    before = {k: v.clone() for k, v in model.named_parameters()}
    cfg = PhaseSection(epochs=1, batch_size=3, lr=1e-3, warmup_epochs=0, tasks=["ef"], weight_decay=0.0)
    trainer = Trainer(model, "finetune", cfg, steps_per_epoch=1, device=torch.device("cpu"))
    trainer.train_epoch(torch.utils.data.DataLoader(TinyVideos(), batch_size=3), max_steps=1)
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("fusion.") for k in moved)
    assert len(moved) > 0.9 * len(before), sorted(set(before) - moved)
