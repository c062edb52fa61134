"""Federation: run files, strategies, the wire format, update checks, and whole runs in Flower's
simulation engine (Ray) with the real store, checkpoints and resume."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM
from safetensors.torch import load_file

from builders import TINY_DATA, interrupted_run, tiny_run
from fedecho.fl.config import parse_run_config, round_lr
from fedecho.fl.exchange import SCALE_PREFIX, UpdateError, decode, encode, exchanged_keys, frozen_keys, wire_round
from fedecho.fl.strategies import (
    build_strategy,
    load_strategy_state,
    schedule_server_lr,
    server_peak_lr,
    strategy_state,
)
from fedecho.models import create_model
from fedecho.server.rounds import FederatedRun, ServerSettings
from fedecho.sim.compare import centralized_recipe, compare_runs
from fedecho.sim.run import simulate
from fedecho.storage import Store
from fedecho.train import ConfigError

# ------------------------------------------------------------------ run files


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('[strategy]\nname = "fedavg"', '[strategy]\nname = "fedbest"'), "[strategy].name 'fedbest'"),
        (('[strategy]\nname = "fedavg"', '[strategy]\nname = "fedprox"\nmu = 0.1'), "[strategy].mu"),
        (('wire_dtype = "float32"', 'wire_dtype = "int4"'), "[run].wire_dtype"),
        (
            (
                "steps = 1\nbatch_size = 2\nlr = 1e-3\n\n[finetune]",
                "warmup_epochs = 1\nsteps = 1\nbatch_size = 2\nlr = 1e-3\n\n[finetune]",
            ),
            "[pretrain].warmup_epochs",
        ),
        (('[model]\nname = "echo_vit_tiny"', '[model]\nname = "echo_vit_huge"'), "[model]"),
        (("rounds = 2", 'rounds = "two"'), "[pretrain].rounds must be an integer"),
        (("[run]", "[runn]"), "unknown section [runn] (did you mean [run]?)"),
        (("steps = 1\nbatch_size = 2", 'optimizer = "adam"\nsteps = 1\nbatch_size = 2'), "[pretrain].optimizer"),
        (('[strategy]\nname = "fedavg"', '[strategy]\nname = "fedadam"'), "[model].stf_norm"),
    ],
)
def test_malformed_run_file_names_the_field(edit: tuple[str, str], message: str) -> None:
    text = tiny_run()
    assert edit[0] in text
    with pytest.raises(ConfigError) as e:
        parse_run_config(text.replace(edit[0], edit[1], 1), "configs/x.toml")
    assert message in str(e.value) and "configs/x.toml" in str(e.value)


def test_run_file_and_schedule() -> None:
    cfg = parse_run_config(tiny_run(strategy="fedprox", pretrain_rounds=3) + "", "x")
    assert cfg.phases == ["pretrain", "finetune"] and cfg.strategy_name == "fedprox"
    p = cfg.phase("pretrain")
    p.warmup_rounds, p.min_lr = 1, 1e-5
    lrs = [round_lr(p, r) for r in range(1, 4)]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] >= p.min_lr  # warm-up, then cosine decay
    assert parse_run_config(Path("configs/quickstart.toml").read_text()).phases == ["pretrain", "finetune"]


def test_server_optimizer_follows_the_schedule_and_its_baseline_is_adam() -> None:
    """FedAdam's eta is the peak of the phase's warm-up and cosine; one local SGD step under it is Adam
    on the union of the sites' batches, so compare's pooled and local arms train AdamW at eta."""
    text = tiny_run(strategy="fedadam", finetune_rounds=4, freeze=False)
    text = text.replace("num_frames = 8", 'num_frames = 8\nstf_norm = "group"')
    text = text.replace('[strategy]\nname = "fedadam"', '[strategy]\nname = "fedadam"\neta = 0.01\nbeta_2 = 0.999')
    text = text.replace("lr = 1e-3\ntasks", 'optimizer = "sgd"\nlr = 1.0\nmin_lr = 0.001\nwarmup_rounds = 1\ntasks')
    cfg = parse_run_config(text, "x")
    pcfg = cfg.phase("finetune")
    strategy = build_strategy(cfg.strategy_name, cfg.strategy_params, fraction=1.0, min_sites=2)
    peak = server_peak_lr(strategy)
    etas = []
    for r in range(1, 5):
        schedule_server_lr(strategy, peak, round_lr(pcfg, r) / pcfg.lr)
        etas.append(strategy.eta)  # type: ignore[attr-defined]
    assert peak == 0.01 and etas[0] < etas[1] == pytest.approx(0.01) and etas[1] > etas[2] > etas[3] > 0
    recipe = centralized_recipe(cfg, "finetune")
    assert (recipe.optimizer, recipe.lr, recipe.betas) == ("adamw", 0.01, [0.9, 0.999])
    assert recipe.min_lr == pytest.approx(1e-5)
    assert centralized_recipe(cfg, "pretrain") is cfg.phase("pretrain")  # AdamW locally: the phase's own
    avg = build_strategy("fedavg", {}, fraction=1.0, min_sites=2)
    schedule_server_lr(avg, server_peak_lr(avg), 0.5)  # averaging has no server step to schedule
    assert server_peak_lr(avg) is None


# ----------------------------------------------------------------- exchange


def test_frozen_fine_tuning_exchanges_only_trainable_tensors() -> None:
    model = create_model("echo_vit_tiny", decoder=False, tasks=["ef"])
    trained = exchanged_keys(model, "finetune", freeze_encoder=True)
    assert trained and not any(k.startswith("encoder.") for k in trained)
    assert all(k.startswith("encoder.") for k in frozen_keys(model, "finetune", True))
    assert any(k.startswith("encoder.") for k in exchanged_keys(model, "finetune", freeze_encoder=False))
    assert not any("num_batches_tracked" in k for k in trained)


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_wire_precision_halves_bytes_and_round_trips(wire: str) -> None:
    state = {"a.weight": torch.randn(64, 32) * 0.02, "b.bias": torch.randn(7)}
    full, half = encode(state, "float32"), encode(state, wire)
    assert half.count_bytes() < 0.6 * full.count_bytes()
    back = decode(half, wire, {k: v.shape for k, v in state.items()})
    tol = 1e-3 if wire == "float16" else 8e-3
    for k, v in state.items():
        assert back[k].dtype == torch.float32
        torch.testing.assert_close(back[k], v, rtol=tol, atol=1e-6)


def test_int8_wire_round_trips_within_half_a_step_and_quarters_bytes() -> None:
    torch.manual_seed(0)
    state = {
        "a.weight": torch.randn(64, 3, 4, 4) * 0.02,
        "b.bias": torch.randn(7),
        "c.scalar": torch.tensor(0.3),
        "d.zero": torch.zeros(5, 2),
    }
    rec = encode(state, "int8")
    assert all(rec[SCALE_PREFIX + k].shape == ((64,) if k == "a.weight" else (5,) if k == "d.zero" else (1,))
               for k in state)  # fmt: skip
    back = decode(rec, "int8", {k: v.shape for k, v in state.items()})
    assert back.keys() == state.keys()
    rounded = wire_round(state, "int8")  # what the server hashes for the frozen encoder: the site's decode, bit for bit
    for k, v in state.items():
        rows = v.reshape(1, -1) if v.dim() < 2 else v.reshape(v.shape[0], -1)
        step = torch.from_numpy(rec[SCALE_PREFIX + k].numpy()).reshape(-1, 1)
        err = (back[k] - v).abs().reshape(rows.shape)
        assert back[k].dtype == torch.float32 and back[k].shape == v.shape
        assert (err <= step / 2 * (1 + 1e-5) + 1e-12).all(), k
        assert torch.equal(rounded[k], back[k])
    assert torch.equal(back["d.zero"], state["d.zero"])
    big = {"w": torch.randn(512, 1024)}
    ratio = encode(big, "int8").count_bytes() / encode(big, "float32").count_bytes()
    assert 0.24 < ratio < 0.26


def test_int8_stochastic_rounding_is_unbiased_and_seeded() -> None:
    x = {"w": torch.tensor([[0.30, -0.71, 0.05, 1.0], [0.013, -0.002, 0.0007, -0.02]])}
    draws = torch.stack([decode(encode(x, "int8", seed=s), "int8")["w"] for s in range(4000)])
    step = draws.new_tensor([1.0 / 127, 0.02 / 127]).reshape(2, 1)
    assert ((draws - x["w"]).abs() < step * (1 + 1e-5)).all()  # one of the two neighbouring steps
    # mean of 4000 draws: the standard error is at most step / (2 sqrt(4000)) ~ step / 126
    assert ((draws.mean(0) - x["w"]).abs() < step / 25).all()
    nearest = decode(encode(x, "int8"), "int8")["w"]
    assert not torch.equal(draws[0], nearest) or not torch.equal(draws[1], nearest)
    a, b = encode(x, "int8", seed=7), encode(x, "int8", seed=7)
    assert np.array_equal(a["w"].numpy(), b["w"].numpy())


def test_malformed_int8_records_are_rejected_with_the_tensor_named() -> None:
    from flwr.app import Array

    shapes = {"enc.w": torch.Size([4, 3]), "enc.b": torch.Size([4])}
    good = encode({"enc.w": torch.randn(4, 3), "enc.b": torch.randn(4)}, "int8", seed=1)
    assert decode(good, "int8", shapes).keys() == shapes.keys()

    def edited(name: str, array: Array | None) -> ArrayRecord:
        rec = ArrayRecord()
        for k in good:
            if k != name:
                rec[k] = good[k]
        if array is not None:
            rec[name] = array
        return rec

    cases = {
        "missing": (edited(SCALE_PREFIX + "enc.w", None), r"tensor enc\.w: its int8 scales .* missing"),
        "shape": (
            edited(SCALE_PREFIX + "enc.w", Array(np.ones(3, np.float32))),
            r"tensor enc\.w: int8 scales of shape",
        ),
        "nan": (
            edited(SCALE_PREFIX + "enc.b", Array(np.array([np.nan], np.float32))),
            r"tensor enc\.b: int8 scales hold NaN",
        ),
        "dtype": (
            edited(SCALE_PREFIX + "enc.b", Array(np.ones(1, np.float16))),
            r"tensor enc\.b: int8 scales of dtype",
        ),
        "not int8": (
            edited("enc.w", Array(np.ones((4, 3), np.float32))),
            r"tensor enc\.w: dtype float32, expected int8",
        ),
        "orphan": (edited(SCALE_PREFIX + "enc.x", Array(np.ones(1, np.float32))), r"tensor enc\.x: int8 scales"),
    }
    for rec, message in cases.values():
        with pytest.raises(UpdateError, match=message):
            decode(rec, "int8", shapes)
        with pytest.raises(UpdateError, match=message):  # a site decoding the downlink checks the same
            decode(rec, "int8")
    with pytest.raises(UpdateError, match=r"tensor enc\.w: int8 scales .* on a float16 wire"):
        decode(good, "float16")
    with pytest.raises(UpdateError, match="tensor w: int8 scales hold NaN"):  # a NaN update cannot hide in a scale
        decode(encode({"w": torch.full((4, 4), float("nan"))}, "int8", seed=0), "int8", {"w": torch.Size([4, 4])})


def test_bad_updates_are_rejected_with_the_tensor_named() -> None:
    shapes = {"w": torch.Size([4, 4])}
    with pytest.raises(UpdateError, match="tensor w: holds NaN"):
        decode(encode({"w": torch.full((4, 4), float("nan"))}, "float32"), "float32", shapes)
    with pytest.raises(UpdateError, match=r"tensor w: shape \(4, 5\)"):
        decode(encode({"w": torch.zeros(4, 5)}, "float32"), "float32", shapes)
    with pytest.raises(UpdateError, match="missing w"):
        decode(encode({"v": torch.zeros(4, 4)}, "float32"), "float32", shapes)
    with pytest.raises(UpdateError, match="dtype float32, expected float16"):
        decode(encode({"w": torch.zeros(4, 4)}, "float32"), "float16", shapes)
    with pytest.raises(UpdateError, match="exceeds the bound"):
        decode(encode({"w": torch.ones(4, 4) * 1e6}, "float32"), "float32", shapes, max_norm=100.0)
    ok = decode(encode({"w": torch.ones(4, 4)}, "float32"), "float32", shapes, max_norm=100.0)
    assert float(ok["w"].sum()) == 16.0


def test_server_rejects_malformed_replies_before_aggregation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = parse_run_config(tiny_run(), "x")
    cfg.run.max_update_norm = 1e3
    run = FederatedRun(cfg, ServerSettings(state=tmp_path, store_url=f"sqlite:///{tmp_path}/s.db"))
    expected = {"w": torch.Size([3, 3])}
    sent = Message(RecordDict({"arrays": encode({"w": torch.zeros(3, 3)}, "float32")}), 7, MessageType.TRAIN)

    def reply(update: torch.Tensor, examples: float = 4.0) -> Message:
        content = RecordDict(
            {
                "arrays": encode({"w": update}, "float32"),
                "metrics": MetricRecord({"num-examples": examples, "train_loss": 0.5}),
                "info": ConfigRecord({"site": "site09"}),
            }
        )
        return Message(content, 0, MessageType.TRAIN)

    cases = {
        "nan": reply(torch.full((3, 3), float("nan"))),
        "shape": reply(torch.zeros(2, 3)),
        "scaled": reply(torch.ones(3, 3) * 1e6),
        "empty": reply(torch.zeros(3, 3), examples=0),
    }
    for name, msg in cases.items():
        result = run.check_train_reply(sent, msg, expected)
        assert result.status == "rejected" and result.update is None, name
        assert result.site == "site09"
    good = run.check_train_reply(sent, reply(torch.ones(3, 3) * 0.01), expected)
    assert good.status == "ok" and good.update is not None and good.bytes_up > 0
    events = [e for e in run.store.events(run.run_id) if e.kind == "update-rejected"]
    assert len(events) == 4 and any("NaN" in e.message for e in events)


# ---------------------------------------------------------------- strategies


def test_strategy_state_round_trip() -> None:
    adam = build_strategy("fedadam", {"eta": 0.01}, fraction=1.0, min_sites=2)
    assert isinstance(adam, FedAdam) and adam.min_available_nodes == 2
    adam.m_t = {"w": np.ones(3, np.float32)}
    adam.v_t = {"w": np.full(3, 2.0, np.float32)}
    fresh = build_strategy("fedadam", {"eta": 0.01}, fraction=1.0, min_sites=2)
    load_strategy_state(fresh, strategy_state(adam))
    np.testing.assert_array_equal(fresh.v_t["w"], adam.v_t["w"])  # type: ignore[attr-defined]
    avgm = build_strategy("fedavgm", {"server_momentum": 0.9}, fraction=1.0, min_sites=2)
    assert isinstance(avgm, FedAvgM)
    avgm.momentum_vector = [np.zeros(2), np.ones(3)]
    other = build_strategy("fedavgm", {"server_momentum": 0.9}, fraction=1.0, min_sites=2)
    load_strategy_state(other, strategy_state(avgm))
    assert [a.shape for a in other.momentum_vector] == [(2,), (3,)]  # type: ignore[union-attr]


# ------------------------------------------------------- whole simulated runs


def _final_model(store: Store, run_id: int) -> dict[str, torch.Tensor]:
    return load_file(store.checkpoints(run_id)[0].path)


@dataclass
class SimulatedRun:
    """One simulated run (with --compare) that the tests below each read a part of."""

    store: Store
    run_id: int
    state: Path
    outsider: subprocess.CompletedProcess
    pwned: Path
    ray_left: list[str]
    compare: dict[str, dict[str, dict[str, float]]]


@pytest.fixture(scope="module")
def simulated(federated_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> SimulatedRun:
    """Two sites, 2 pre-training and 1 fine-tuning rounds in float16 on the wire; the server also scores each
    round's global model on a held-out set of its own; during the first round an outsider tries the run's Ray."""
    tmp = tmp_path_factory.mktemp("simulated")
    cfg = parse_run_config(tiny_run(wire="float16"), "tiny")
    outsider: list[subprocess.CompletedProcess] = []

    def attack(phase: str, server_round: int, summary: dict) -> None:
        if not outsider:
            outsider.append(_outsider_submits_to_ray(tmp / "pwned"))

    run_id = simulate(
        cfg, federated_phantom, tmp / "state", eval_data=federated_phantom / "site02", default_policy=TINY_DATA,
        on_round=attack,
    )  # fmt: skip
    ray_left = _ray_processes()
    store = Store(f"sqlite:///{tmp / 'state' / 'fedecho.db'}")
    compare = compare_runs(cfg, federated_phantom, tmp / "state", run_id)
    return SimulatedRun(store, run_id, tmp / "state", outsider[0], tmp / "pwned", ray_left, compare)


@pytest.mark.slow
def test_an_outsider_cannot_run_code_in_the_simulations_ray(simulated: SimulatedRun) -> None:
    """Someone else on the network who knows the simulation's Ray address cannot run code in it."""
    assert "REFUSED" in simulated.outsider.stdout and "CONNECTED" not in simulated.outsider.stdout
    assert not simulated.pwned.exists()


@pytest.mark.slow
def test_every_round_is_recorded_with_its_metrics(simulated: SimulatedRun) -> None:
    store, run_id = simulated.store, simulated.run_id
    run = store.get_run(run_id)
    assert run.status == "finished" and run.mode == "simulation"
    assert [(r.phase, r.round, r.sites_replied) for r in store.rounds(run_id)] == [
        ("pretrain", 1, 2), ("pretrain", 2, 2), ("finetune", 1, 2)
    ]  # fmt: skip
    assert all(np.isfinite(r.train["train_loss"]) for r in store.rounds(run_id))
    assert "val_loss" in store.rounds(run_id, "pretrain")[0].evaluate
    assert "server_loss" in store.rounds(run_id, "pretrain")[0].server
    assert np.isfinite(store.rounds(run_id, "finetune")[0].server["server_ef_mae"])
    results = store.site_results(run_id)
    assert {r.site for r in results} == {"site01", "site02"} and all(r.status == "ok" for r in results)
    assert len(store.checkpoints(run_id)) == 3


@pytest.mark.slow
def test_frozen_fine_tuning_sends_back_only_fusion_and_heads(simulated: SimulatedRun) -> None:
    train = [r for r in simulated.store.site_results(simulated.run_id) if r.kind == "train"]
    pre = next(r for r in train if r.phase == "pretrain")
    fine = next(r for r in train if r.phase == "finetune")
    assert fine.bytes_up < pre.bytes_up and fine.bytes_down > fine.bytes_up


@pytest.mark.slow
def test_fine_tuning_keeps_the_federated_encoder(simulated: SimulatedRun) -> None:
    store, run_id = simulated.store, simulated.run_id
    pre_last = load_file(next(c.path for c in store.checkpoints(run_id) if c.phase == "pretrain"))
    final = _final_model(store, run_id)
    torch.testing.assert_close(final["encoder.patch_embed.proj.weight"], pre_last["encoder.patch_embed.proj.weight"])


@pytest.mark.slow
def test_ray_is_gone_when_the_run_ends(simulated: SimulatedRun) -> None:
    assert not simulated.ray_left


@pytest.mark.slow
def test_compare_scores_every_arm_on_every_sites_test_split(simulated: SimulatedRun) -> None:
    """--compare: pooled and each site alone at equal compute, and the mean predictor, on every site's test split."""
    results = simulated.compare
    assert set(results) == {"federated", "pooled", "local: site01", "local: site02", "mean predictor"}
    for per_site in results.values():
        assert {"site01", "site02", "all sites"} <= set(per_site) and np.isfinite(per_site["all sites"]["ef_mae"])
    # "all sites" pools the test videos: its MAE is the videos-weighted mean of the sites', its R2 is not theirs
    fed = results["federated"]
    n = [fed[s]["videos"] for s in ("site01", "site02")]
    mae = sum(k * fed[s]["ef_mae"] for k, s in zip(n, ("site01", "site02"), strict=True)) / sum(n)
    assert fed["all sites"]["ef_mae"] == pytest.approx(mae) and fed["all sites"]["videos"] == sum(n)
    # the mean predictor predicts the pooled training mean: the floor a model has to clear, AUROC 0.5
    auroc = results["mean predictor"]["all sites"]["ef_lt50_auroc"]
    assert auroc == 0.5 or np.isnan(auroc)
    png = simulated.state / f"compare-run-{simulated.run_id:04d}" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _outsider_submits_to_ray(marker: Path) -> subprocess.CompletedProcess:
    """A process without the simulation's token connects to its Ray at the address Ray advertises on the
    network and submits a task that would write marker."""
    import ray

    address = ray.get_runtime_context().gcs_address
    code = f"""
import ray
try:
    ray.init(address={address!r}, logging_level="error")
    print("CONNECTED")
    @ray.remote(num_cpus=0)  # runs beside the virtual sites, which hold every CPU
    def pwn():
        open({str(marker)!r}, "w").write("ran")
    ray.get(pwn.remote(), timeout=30)
    print("RAN")
except Exception as e:
    print("REFUSED", type(e).__name__)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def _ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "ppid,pid,args"], capture_output=True, text=True).stdout
    mine = str(os.getpid())
    return [line for line in out.splitlines() if line.split()[0] == mine and ("raylet" in line or "gcs_server" in line)]


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(federated_phantom: Path, tmp_path: Path) -> None:
    text = tiny_run(strategy="fedadam", pretrain_rounds=3, finetune_rounds=0, freeze=False)
    cfg = parse_run_config(text, "tiny")
    whole = simulate(cfg, federated_phantom, tmp_path / "a", default_policy=TINY_DATA)

    store, stopped = interrupted_run(cfg, federated_phantom, tmp_path / "b")
    assert stopped.status == "paused" and [r.round for r in store.rounds(stopped.id)] == [1, 2]
    # round 2's checkpoint is corrupt: resume must notice and fall back to round 1
    resumed = simulate(cfg, federated_phantom, tmp_path / "b", resume=stopped.id, default_policy=TINY_DATA)
    assert resumed == stopped.id and store.get_run(stopped.id).status == "finished"
    assert [r.round for r in store.rounds(stopped.id)] == [1, 2, 3]
    assert any(e.kind == "checkpoint-invalid" for e in store.events(stopped.id))
    # round for round: every checkpoint of the resumed run equals the uninterrupted run's, bit for bit
    ref_store = Store(f"sqlite:///{tmp_path / 'a' / 'fedecho.db'}")
    ours = {(c.phase, c.round): load_file(c.path) for c in store.checkpoints(stopped.id)}
    theirs = {(c.phase, c.round): load_file(c.path) for c in ref_store.checkpoints(whole)}
    assert sorted(ours) == sorted(theirs) == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3)]
    for key, ref in theirs.items():
        assert ours[key].keys() == ref.keys()
        for name in ref:
            assert torch.equal(ours[key][name], ref[name]), (key, name)
