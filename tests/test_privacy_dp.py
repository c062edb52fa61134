"""Differential privacy at the site: DP-SGD steps (Opacus), the site's privacy ledger, budget refusals,
and DP in simulated federated runs (per-site epsilon in the store, a site refused once its budget is spent,
Flower's central-DP wrapper)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from builders import TINY_DATA, TinyVideos, tiny_run
from fedecho.cli import app as cli
from fedecho.client.config import load_site_config
from fedecho.client.local import site_train
from fedecho.client.site import Site
from fedecho.data import open_source
from fedecho.fl.config import parse_run_config
from fedecho.fl.strategies import build_strategy, load_strategy_state, strategy_state
from fedecho.models import create_model
from fedecho.privacy.dp_policy import (
    DPPlan,
    PrivacyPolicy,
    PrivacyRefused,
    kept_units,
    plan_round,
    privacy_units,
    unit_in_force,
)
from fedecho.privacy.ledger import PrivacyLedger, epsilon_of
from fedecho.report import run_tables
from fedecho.sim.run import simulate
from fedecho.storage import Store
from fedecho.train import ConfigError, Trainer
from fedecho.train.config import PhaseSection
from fedecho.train.dp import PrivateTraining, check_private_model

# ------------------------------------------------------------------ DP-SGD steps


def _trainer() -> Trainer:
    torch.manual_seed(0)
    model = create_model("echo_vit_tiny", decoder=False, num_frames=8, tasks=["ef"], stf_norm="group", head="mlp")
    cfg = PhaseSection(batch_size=3, lr=1e-3, warmup_epochs=0, tasks=["ef"], weight_decay=0.0)
    return Trainer(model, "finetune", cfg, steps_per_epoch=1, device=torch.device("cpu"))


def _plan(noise: float, clip: float, units: tuple[tuple[int, ...], ...], unit: str = "video") -> DPPlan:
    return DPPlan(noise, clip, 1.0, 1, len(units), units, unit, 1e-5)  # type: ignore[arg-type]


def _one_step(trainer: Trainer, plan: DPPlan) -> dict[str, torch.Tensor]:
    """One DP-SGD step; returns what the optimiser saw: per-sample grads, clipped sum, and the final grad."""
    seen: dict[str, torch.Tensor] = {}
    with PrivateTraining(trainer, plan) as private:

        def look(opt) -> None:  # type: ignore[no-untyped-def]
            seen["samples"] = torch.cat([g.flatten(1) for g in opt.grad_samples], dim=1)
            seen["summed"] = torch.cat([p.summed_grad.flatten() for p in opt.params])
            seen["grad"] = torch.cat([p.grad.flatten() for p in opt.params])

        private.optimizer.attach_step_hook(look)
        result = trainer.train_epoch(private.loader(TinyVideos()))
    assert result.steps == 1
    return seen


@pytest.mark.slow
def test_dp_step_clips_each_sample_and_adds_noise() -> None:
    ds = TinyVideos()
    # Opacus' per-sample gradients on this model (GroupNorm STF-Net, attention) add up to the ordinary gradient.
    reference = _trainer()
    video = torch.stack([v for v, _ in ds.items])
    info = {"frame_index": torch.arange(8).expand(3, -1), "ef": torch.stack([i["ef"] for _, i in ds.items])}
    reference.loss(video, info, torch.Generator()).backward()
    params = [p for g in reference.optimizer.param_groups for p in g["params"] if p.requires_grad]
    mean_grad = torch.cat([p.grad.flatten() for p in params])

    clip = 1e-3  # far below every per-sample norm: every sample is clipped
    seen = _one_step(_trainer(), _plan(0.0, clip, ((0,), (1,), (2,))))
    samples = seen["samples"]
    torch.testing.assert_close(samples.mean(0), mean_grad, rtol=1e-3, atol=1e-6)
    norms = samples.norm(dim=1)
    assert (norms > clip).all()
    clipped = samples * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-4)).all()
    torch.testing.assert_close(seen["summed"], clipped.sum(0), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(seen["grad"], seen["summed"] / 3)  # no noise: the clipped mean

    noisy = _one_step(_trainer(), _plan(1.0, clip, ((0,), (1,), (2,))))
    noise = noisy["grad"] * 3 - noisy["summed"]
    assert noise.std().item() == pytest.approx(1.0 * clip, rel=0.05)  # N(0, (sigma C)^2) on every coordinate


def test_patient_grouping_clips_per_patient() -> None:
    clip = 1e-3
    per_video = _one_step(_trainer(), _plan(0.0, clip, ((0,), (1,), (2,))))["samples"]
    seen = _one_step(_trainer(), _plan(0.0, clip, ((0, 1), (2,)), unit="patient"))
    samples = seen["samples"]
    assert samples.shape[0] == 2  # videos 0 and 1 are one patient: one gradient (their mean), clipped once
    torch.testing.assert_close(samples[0], per_video[:2].mean(0), rtol=1e-3, atol=1e-7)
    clipped = samples * (clip / (samples.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None]
    torch.testing.assert_close(seen["summed"], clipped.sum(0), rtol=1e-4, atol=1e-9)
    assert privacy_units(["p1", "p1", "p2"], True) == ((0, 1), (2,))
    with pytest.raises(PrivacyRefused, match="no patient id"):
        privacy_units(["p1", None], True)


def test_batchnorm_models_are_refused_and_run_files_checked() -> None:
    with pytest.raises(PrivacyRefused, match='stf_norm = "group"'):
        check_private_model(create_model("echo_vit_tiny", decoder=False, tasks=["ef"], head="mlp"))
    check_private_model(create_model("echo_vit_tiny", decoder=False, tasks=["ef"], head="mlp", stf_norm="group"))
    with pytest.raises(ConfigError, match=r"x: \[model\].stf_norm"):
        parse_run_config(tiny_run() + "\n[dp]\nenabled = true\n", "x")
    cfg = parse_run_config(
        tiny_run().replace("num_frames = 8", 'num_frames = 8\nstf_norm = "group"') + "\n[dp]\nenabled = true\n"
    )
    assert cfg.dp.enabled and cfg.dp.noise_multiplier == 1.0
    # the site's floor on the noise wins over a run asking for less
    plan = plan_round(PrivacyPolicy(min_noise_multiplier=1.5), cfg.dp, [None] * 10, 2, 0, 1)
    assert plan is not None and plan.noise_multiplier == 1.5 and plan.sample_rate == 0.2 and plan.steps == 5
    assert plan_round(PrivacyPolicy(), parse_run_config(tiny_run()).dp, [None] * 10, 2, 1, 1) is None


def test_site_privacy_table_errors_name_file_and_field(tmp_path: Path) -> None:
    base = '[site]\nname = "s"\ndata = "d"\ncache = "c"\nstate = "st"\n'
    f = tmp_path / "site.toml"
    f.write_text(base + '[privacy]\ndp = "required"\nmin_noise_multiplier = 1.0\nepsilon_max = 3\ndelta = 1e-6\n')
    p = load_site_config(f).privacy
    assert p.dp == "required" and p.epsilon_max == 3.0 and p.delta == 1e-6
    f.write_text(base + '[privacy]\nunit = "video"\n')
    assert load_site_config(f).privacy.unit == "video"
    for bad, field in (("dp = \"maybe\"", "dp"), ("delta = 2.0", "delta"), ("epsilon = 1", "epsilon"),
                       ('dp = "required"', "min_noise_multiplier"), ('unit = "study"', "unit"),
                       ("unti = \"video\"", "unti (did you mean 'unit'?)"),
                       ("group_by_patient = true", 'group_by_patient is replaced by unit = "patient"')):  # fmt: skip
        f.write_text(base + f"[privacy]\n{bad}\n")
        with pytest.raises(ConfigError, match=str(f)) as e:
            load_site_config(f)
        assert "[privacy]" in str(e.value) and field in str(e.value)


# ------------------------------------------------------------------ the privacy unit

REQUIRED = PrivacyPolicy(dp="required", min_noise_multiplier=1.0)


def test_the_unit_is_the_patient_wherever_every_training_video_has_a_patient_id() -> None:
    run_dp = parse_run_config(tiny_run()).dp  # the run asks for nothing: the site requires DP
    ids = ["p1", "p1", "p2", "p3"]
    plan = plan_round(REQUIRED, run_dp, ids, 2, 1, 1)
    assert plan is not None and plan.unit == "patient" and plan.units == ((0, 1), (2,), (3,))
    assert plan.sample_rate == pytest.approx(2 / 3)  # patients are sampled, not videos
    assert unit_in_force(REQUIRED, ids) == (
        "patient",
        "unit not set: every one of the 4 training videos has a patient id",
    )
    some = ["p1", None, "p2"]
    plan = plan_round(REQUIRED, run_dp, some, 2, 1, 1)
    assert plan is not None and plan.unit == "video" and len(plan.units) == 3
    assert unit_in_force(REQUIRED, some)[1] == "unit not set: 1 of 3 training videos have no patient id"
    chosen = PrivacyPolicy(dp="required", min_noise_multiplier=1.0, unit="video")
    plan = plan_round(chosen, run_dp, ids, 2, 1, 1)
    assert plan is not None and plan.unit == "video" and unit_in_force(chosen, ids)[1].startswith("the site's choice")
    with pytest.raises(PrivacyRefused, match=r'unit = "patient" but 1 of 3 training videos have no patient id'):
        plan_round(PrivacyPolicy(dp="required", min_noise_multiplier=1.0, unit="patient"), run_dp, some, 2, 1, 1)


def test_videos_that_do_not_decode_leave_the_reserved_mechanism_unchanged() -> None:
    plan = DPPlan(1.0, 1.0, 0.5, 4, 2, ((0, 1), (2,), (3,)), "patient", 1e-5)
    kept = kept_units(plan, [0, 2, 3])  # video 1 did not decode: indices shift, its patient keeps video 0
    assert kept.units == ((0,), (1,), (2,))
    assert (kept.noise_multiplier, kept.sample_rate, kept.steps, kept.batch_size) == (1.0, 0.5, 4, 2)
    assert kept_units(plan, [1, 3]).units == ((0,), (1,))  # patient 2's only video gone: the unit goes


def test_a_dicom_site_trains_per_patient_and_says_so(dicom_phantom: Path, tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        f'[site]\nname = "s2"\ndata = "{dicom_phantom / "site02"}"\ncache = "cache"\nstate = "state"\n'
        "[policy]\nmin_videos = 1\nmin_patients = 1\n"
        '[privacy]\ndp = "required"\nmin_noise_multiplier = 1.0\n'
    )
    cfg = load_site_config(path)
    site = Site("s2", cfg.data, cfg.cache, cfg.state, policy=cfg.policy, privacy=cfg.privacy)
    model = create_model("echo_vit_tiny", decoder=True, num_frames=8)
    received = {k: v.float() for k, v in model.state_dict().items()}
    options = {"seed": 1, "lr": 1e-3, "server-round": 1, "run-id": 3}
    _, metrics, _ = site_train(parse_run_config(tiny_run()), "pretrain", received, site, options)
    assert metrics["dp_per_patient"] == 1.0 and metrics["epsilon"] > 0
    (entry,) = PrivacyLedger(cfg.state).entries()
    assert entry.unit == "patient"
    runner = CliRunner()
    res = runner.invoke(cli, ["audit", "--site", str(path), "--ledger"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "patient" in res.output and "per patient" in res.output, res.output
    res = runner.invoke(cli, ["audit", "--site", str(path), "--ledger", "--json"])
    assert [(r["unit"], r["status"]) for r in json.loads(res.output)] == [("patient", "spent")]
    # the run report's per-site table names the unit each site's epsilon protects
    store = Store(f"sqlite:///{tmp_path / 'fedecho.db'}")
    run = store.create_run("r", "")
    store.add_site_result(run, "pretrain", 1, "s2", "train", status="ok", metrics=metrics, num_examples=1,
                          bytes_down=0, bytes_up=0)  # fmt: skip
    store.add_site_result(run, "pretrain", 1, "s3", "train", status="ok", metrics={**metrics, "dp_per_patient": 0.0},
                          num_examples=1, bytes_down=0, bytes_up=0)  # fmt: skip
    (table,) = [t for t in run_tables(store, run) if t.title == "per-site results"]
    col = table.header.index("privacy unit")
    assert [row[col] for row in table.rows] == ["patient", "video"]


# ------------------------------------------------------------------ the ledger


@pytest.mark.slow
def test_ledger_composes_across_restarts_like_opacus(tmp_path: Path) -> None:
    rounds = [(1.1, 0.2, 5), (1.1, 0.2, 5), (0.8, 0.5, 3)]
    with PrivacyLedger(tmp_path) as ledger:
        for r, (n, q, s) in enumerate(rounds[:2], 1):
            entry, _ = ledger.reserve(run="a", phase="pretrain", round=r, noise_multiplier=n, sample_rate=q, steps=s,
                                      delta=1e-5, epsilon_max=0)  # fmt: skip
            ledger.spend(entry)
    with PrivacyLedger(tmp_path) as ledger:  # a restarted site process
        _, eps = ledger.reserve(run="b", phase="finetune", round=1, noise_multiplier=0.8, sample_rate=0.5, steps=3,
                                delta=1e-5, epsilon_max=0)  # fmt: skip
        assert [e.status for e in ledger.entries()] == ["spent", "spent", "reserved"]
        reference = RDPAccountant()
        for n, q, s in rounds:
            for _ in range(s):
                reference.step(noise_multiplier=n, sample_rate=q)
        assert eps == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
        assert ledger.epsilon(1e-5) == pytest.approx(eps, rel=1e-12)
        # over budget: refused, nothing written
        with pytest.raises(PrivacyRefused, match="above its epsilon_max"):
            ledger.reserve(run="b", phase="finetune", round=2, noise_multiplier=0.8, sample_rate=0.5, steps=3,
                           delta=1e-5, epsilon_max=eps + 0.01)  # fmt: skip
        assert len(ledger.entries()) == 3


def _site_round(phantom: Path, state: Path, privacy: PrivacyPolicy, run_text: str) -> tuple[dict, dict]:  # type: ignore[type-arg]
    cfg = parse_run_config(run_text)
    site = Site("site01", phantom / "site01", state / "cache", state / "site01", policy=TINY_DATA, privacy=privacy)
    options = {"seed": 1, "lr": 1e-3, "server-round": 1, "run-id": 7}
    model = create_model("echo_vit_tiny", decoder=True, num_frames=8)
    received = {k: v.float() for k, v in model.state_dict().items()}
    update, metrics, _ = site_train(cfg, "pretrain", received, site, options)
    return update, metrics


@pytest.mark.slow
def test_site_refuses_before_training_and_a_crash_keeps_the_reservation(
    federated_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    required = PrivacyPolicy(dp="required", min_noise_multiplier=1.0, epsilon_max=0.01)
    calls: list[int] = []
    original = Trainer.train_epoch

    def counting(self, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_epoch", counting)
    with pytest.raises(PrivacyRefused, match=r"epsilon_max 0\.01"):
        _site_round(federated_phantom, tmp_path, required, tiny_run())
    assert not calls and PrivacyLedger(tmp_path / "site01").entries() == []
    # refused before any video was read: no file hashed, no frame decoded into the cache
    assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]

    # a round that fits: trained with DP, epsilon reported, ledger row spent
    ok = PrivacyPolicy(dp="required", min_noise_multiplier=1.0, epsilon_max=1e3)
    _, metrics = _site_round(federated_phantom, tmp_path, ok, tiny_run())
    assert calls and metrics["epsilon"] > 0 and metrics["delta"] == 1e-5 and metrics["dp_noise_multiplier"] == 1.0
    assert metrics["dp_per_patient"] == 0.0  # the EchoNet layout has no patient ids: the unit is the video
    entries = PrivacyLedger(tmp_path / "site01").entries()
    assert [(e.status, e.run, e.round) for e in entries] == [("spent", "tiny (run 7)", 1)]
    assert metrics["epsilon"] == pytest.approx(epsilon_of([entries[0].mechanism], 1e-5))

    def crash(self, *a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("power cut")

    monkeypatch.setattr(Trainer, "train_epoch", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _site_round(federated_phantom, tmp_path, ok, tiny_run())
    ledger = PrivacyLedger(tmp_path / "site01")
    assert [e.status for e in ledger.entries()] == ["spent", "reserved"]
    assert ledger.epsilon(1e-5) > metrics["epsilon"]  # the crashed round counts


# ------------------------------------------------------------- simulated runs


def _train_videos(site: Path) -> int:
    return sum(r.split == "train" for r in open_source(site).scan().records)


@pytest.mark.slow
def test_simulated_dp_run_reports_epsilon_and_refuses_a_spent_site(federated_phantom: Path, tmp_path: Path) -> None:
    text = tiny_run(pretrain_rounds=2, finetune_rounds=1).replace(
        "num_frames = 8", 'num_frames = 8\nstf_norm = "group"'
    )
    text = text.replace('wire_dtype = "float32"', 'wire_dtype = "float32"\nmin_sites = 1')
    text += "\n[dp]\nenabled = true\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n"
    cfg = parse_run_config(text, "dp run")
    q = 2 / _train_videos(federated_phantom / "site02")
    one, two = epsilon_of([(1.0, q, 1)], 1e-5), epsilon_of([(1.0, q, 2)], 1e-5)
    privacy = {"site02": PrivacyPolicy(epsilon_max=(one + two) / 2)}
    run_id = simulate(cfg, federated_phantom, tmp_path / "state", privacy=privacy, default_policy=TINY_DATA)
    store = Store(f"sqlite:///{tmp_path / 'state' / 'fedecho.db'}")
    assert store.get_run(run_id).status == "finished"
    train = {(r.phase, r.round, r.site): r for r in store.site_results(run_id) if r.kind == "train"}
    assert train[("pretrain", 1, "site02")].status == "ok"
    assert train[("pretrain", 1, "site02")].metrics["epsilon"] == pytest.approx(one, rel=1e-9)
    refused = train[("pretrain", 2, "site02")]
    assert refused.status == "refused" and "epsilon_max" in refused.reason
    assert train[("finetune", 1, "site02")].status == "refused"
    eps = [train[(p, r, "site01")].metrics["epsilon"] for p, r in (("pretrain", 1), ("pretrain", 2), ("finetune", 1))]
    assert all(r.status == "ok" for k, r in train.items() if k[2] == "site01") and eps[0] < eps[1] < eps[2]
    assert all("epsilon" not in r.train for r in store.rounds(run_id))  # per site only, never averaged
    assert any(e.kind == "refused" and e.site == "site02" for e in store.events(run_id))


@pytest.mark.slow
def test_central_dp_wraps_the_strategy(federated_phantom: Path, tmp_path: Path) -> None:
    params = {"central_dp": "adaptive", "noise_multiplier": 0.5, "num_sampled_clients": 2, "eta": 0.01}
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        build_strategy("fedadam", params, fraction=1.0, min_sites=2)
    params["clipped_count_stddev"] = 1.0
    adaptive = build_strategy("fedadam", params, fraction=1.0, min_sites=2)
    adaptive.clipping_norm = 0.37  # type: ignore[attr-defined]
    adaptive.strategy.m_t = {"w": torch.ones(2).numpy()}  # type: ignore[attr-defined]
    fresh = build_strategy("fedadam", params, fraction=1.0, min_sites=2)
    load_strategy_state(fresh, strategy_state(adaptive))  # resume keeps the wrapper's and the inner state
    assert fresh.clipping_norm == pytest.approx(0.37) and "w" in fresh.strategy.m_t  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"\[strategy\]\.noise_multiplier is required"):
        parse_run_config(tiny_run().replace('name = "fedavg"', 'name = "fedavg"\ncentral_dp = "fixed"'))
    text = tiny_run(pretrain_rounds=1, finetune_rounds=0).replace(
        'name = "fedavg"', 'name = "fedavg"\ncentral_dp = "fixed"\nnoise_multiplier = 0.1\nclipping_norm = 5.0\n'
        "num_sampled_clients = 2"
    )  # fmt: skip
    run_id = simulate(parse_run_config(text), federated_phantom, tmp_path / "state", default_policy=TINY_DATA)
    store = Store(f"sqlite:///{tmp_path / 'state' / 'fedecho.db'}")
    assert store.get_run(run_id).status == "finished" and len(store.rounds(run_id)) == 1
