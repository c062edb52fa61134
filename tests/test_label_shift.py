"""Label shift of the regression heads: federated target statistics and the federated ridge refit of the heads'
last layer (`fedecho.fl.statistics`), at the site (policy, audit, DP) and at the server (checks, pooling, resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file

from builders import TINY_DATA, tiny_run
from fedecho.client.audit import SiteLog
from fedecho.client.policy import SitePolicy
from fedecho.client.site import Site
from fedecho.client.statistics import site_query
from fedecho.data import EchoVideoDataset, open_source
from fedecho.data.clips import ClipSampler
from fedecho.fl.config import parse_run_config
from fedecho.fl.protocol import build_model
from fedecho.fl.statistics import (
    HEAD_STATS,
    TARGET_STATS,
    head_keys,
    head_sums,
    ridge_solve,
    target_centre,
    target_keys,
    target_shapes,
    uncentre_moment,
)
from fedecho.models import create_model, get_task, load_checkpoint, save_checkpoint
from fedecho.models.heads import last_linear
from fedecho.privacy.dp_policy import PrivacyPolicy, PrivacyRefused
from fedecho.privacy.ledger import PrivacyLedger
from fedecho.server.rounds import FederatedRun, RoundFailed, ServerSettings
from fedecho.sim.run import simulate
from fedecho.storage import Store

TASKS = ["ef", "esv"]
RIDGE = 0.05


def _run_text(rounds: int = 2, refit: str = "end") -> str:
    text = tiny_run(pretrain_rounds=0, finetune_rounds=rounds)
    extra = f'tasks = ["ef", "esv"]\ntarget_stats = true\nrefit = "{refit}"\nridge = {RIDGE}'
    return text.replace('tasks = ["ef"]', extra)


# ------------------------------------------------------------------ the model side


def test_target_statistics_de_standardise_the_head_and_old_checkpoints_load(tmp_path: Path) -> None:
    model = create_model("echo_vit_tiny", decoder=False, num_frames=8, tasks=["ef", "ef_class"])
    heads, task = model.heads, get_task("ef")
    assert heads.stats("ef_class") is None  # classification heads have none
    out, target = torch.tensor([[0.7], [0.4]]), torch.tensor([60.0, 35.0])
    assert torch.equal(task.loss(out, target, heads.stats("ef")), task.loss(out, target))  # the identity: as before
    heads.set_stats("ef", 0.5, 0.1)
    assert float(last_linear(heads["ef"]).bias.detach()) == 0.0  # starts at the mean
    z = torch.randn(2, last_linear(heads["ef"]).in_features)
    # the last layer starts tiny (VideoMAE's head init): the output is the mean to within its scale x 1e-3
    torch.testing.assert_close(heads(z)["ef"], torch.full((2, 1), 0.5), rtol=0, atol=1e-3)
    # the loss is in standardised units: the plain MSE divided by the spread squared
    torch.testing.assert_close(task.loss(out, target, heads.stats("ef")), task.loss(out, target) / 0.01)
    # saved with the model; a checkpoint written before the statistics existed loads as the identity
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert float(load_checkpoint(path).heads.ef_target_scale) == pytest.approx(0.1)
    old = {k: v for k, v in load_file(str(path)).items() if not k.endswith(("target_shift", "target_scale"))}
    assert len(old) == len(model.state_dict()) - 2
    save_file(old, str(path))
    loaded = load_checkpoint(path).heads
    assert float(loaded.ef_target_shift) == 0.0 and float(loaded.ef_target_scale) == 1.0


def test_federated_ridge_equals_the_pooled_closed_form() -> None:
    rng = np.random.default_rng(0)
    d, ridge = 6, 0.3
    sites = [(rng.normal(size=(n, d)), rng.normal(size=(n, 1)) + 2.0) for n in (5, 9, 3)]
    shift, scale = np.array([0.4]), np.array([0.2])
    centre = target_centre("ef", shift, scale)
    parts = [head_sums(x, u - centre, np.ones(len(x))) for x, u in sites]
    count = sum(p[0] for p in parts)
    gram, moment = sum(p[1] for p in parts), sum(p[2] for p in parts)
    w = ridge_solve(gram, uncentre_moment(gram, moment, centre), count, ridge)
    # pooled: least squares on the concatenated features, the penalty as extra rows (no penalty on the bias)
    x = np.concatenate([s[0] for s in sites])
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    u = np.concatenate([s[1] for s in sites])
    energy = np.mean(np.sum(x[:, :-1] ** 2, axis=0))  # the penalty is relative: ridge x the features' mean square
    rows = np.sqrt(ridge * energy) * np.eye(d + 1)[:-1]
    pooled = np.linalg.lstsq(np.concatenate([x, rows]), np.concatenate([u, np.zeros((d, 1))]), rcond=None)[0]
    np.testing.assert_allclose(w, pooled, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ the site side


def _site(phantom: Path, state: Path, **kw: object) -> Site:
    return Site("site01", phantom / "site01", state / "cache", state / "site01", **{"policy": TINY_DATA, **kw})  # type: ignore[arg-type]


def _options(question: str) -> dict[str, object]:
    return {"seed": 1, "query": question, "run-id": 4, "server-round": 2, "frozen-sha256": ""}


def test_dp_statistics_are_noisy_and_spend_the_site_budget(federated_phantom: Path, tmp_path: Path) -> None:
    cfg = parse_run_config(_run_text())
    model = build_model(cfg, "finetune")
    received = {k: v.float() for k, v in model.state_dict().items()}
    exact, _ = site_query(cfg, "finetune", {}, _site(federated_phantom, tmp_path / "a"), _options(TARGET_STATS))
    private = PrivacyPolicy(dp="required", min_noise_multiplier=2.0, epsilon_max=0.0, unit="video")
    site = _site(federated_phantom, tmp_path / "b", privacy=private)
    noisy, metrics = site_query(cfg, "finetune", {}, site, _options(TARGET_STATS))
    count, total, _ = target_keys("ef")
    assert float(noisy[count].numpy()) == float(exact[count].numpy())  # the count leaves exactly
    assert float(noisy[total].numpy()) != float(exact[total].numpy())
    first = metrics["epsilon"]
    assert first > 0 and metrics["dp_sample_rate"] == 1.0 and metrics["dp_steps"] == 1.0
    with PrivacyLedger(site.state) as ledger:
        (entry,) = ledger.entries()
        assert (entry.noise_multiplier, entry.sample_rate, entry.steps, entry.status) == (2.0, 1.0, 1, "spent")
        assert ledger.epsilon(1e-5) == pytest.approx(first)
    heads, metrics = site_query(cfg, "finetune", received, site, _options(HEAD_STATS))
    plain, _ = site_query(cfg, "finetune", received, _site(federated_phantom, tmp_path / "a"), _options(HEAD_STATS))
    gram = heads[head_keys("ef")[1]].numpy()
    np.testing.assert_array_equal(gram, gram.T)  # the noise keeps Phi^T Phi symmetric
    assert not np.allclose(gram, plain[head_keys("ef")[1]].numpy())
    assert metrics["epsilon"] > first  # a second release composes in the ledger
    # over budget: refused before any video is decoded, nothing reserved
    fresh = _site(federated_phantom, tmp_path / "c", privacy=PrivacyPolicy(
        dp="required", min_noise_multiplier=0.5, epsilon_max=0.5, unit="video"))  # fmt: skip
    with pytest.raises(PrivacyRefused, match="releasing the target-stats"):
        site_query(cfg, "finetune", {}, fresh, _options(TARGET_STATS))
    assert not fresh.cache.exists() or not any(p.is_file() for p in fresh.cache.rglob("*"))
    assert PrivacyLedger(fresh.state).entries() == []


# ------------------------------------------------------------------ the server side


def _query_reply(arrays: dict[str, np.ndarray], examples: float = 4.0) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": examples}),
            "info": ConfigRecord({"site": "site07"}),
        }
    )
    return Message(content, 0, MessageType.QUERY)


def test_malformed_statistics_replies_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fedecho.server.statistics import check_query_reply

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    run = FederatedRun(parse_run_config(_run_text()), ServerSettings(tmp_path, f"sqlite:///{tmp_path}/s.db"))
    expected = target_shapes(["ef"])
    sent = Message(RecordDict({"config": ConfigRecord({"query": TARGET_STATS})}), 7, MessageType.QUERY)
    good = {k: np.array(v, dtype=np.float64) for k, v in zip(target_keys("ef"), (4.0, 0.3, 0.1), strict=True)}
    count, total, _ = target_keys("ef")
    cases = {
        "NaN": {**good, total: np.array(np.nan)},
        "from 1 to the 2 videos": {**good, count: np.array(4.0)},  # the reply claims 2 videos below
        "not a whole number": {**good, count: np.array(2.5)},
        "dtype float32": {**good, total: np.array(0.3, dtype=np.float32)},
        "shape (2,)": {**good, total: np.zeros(2)},
        "unexpected": {**good, "target-stats/ef/extra": np.array(1.0)},
    }
    for reason, arrays in cases.items():
        result = check_query_reply(run, sent, _query_reply(arrays, 2.0 if "2 videos" in reason else 4.0), expected)
        assert result.status == "rejected" and result.update is None, reason
    ok = check_query_reply(run, sent, _query_reply(good), expected)
    assert ok.status == "ok" and ok.update is not None and ok.site == "site07"
    events = [e.message for e in run.store.events(run.run_id) if e.kind == "update-rejected"]
    assert len(events) == len(cases) and all(m.startswith("query reply: ") for m in events)
    for reason in cases:
        assert any(reason in m for m in events), reason


# ------------------------------------------------------------------ whole simulated runs


def _training_videos(cfg, folder: Path, model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    """Every training video of a site as `evaluate` sees it (all its test clips): the mean input of each regression
    head's last layer, and the encoded targets; computed here, apart from the site's code."""
    mc = model.cfg
    sampler = ClipSampler(mc.num_frames, cfg.local.data.period or None)
    data = EchoVideoDataset(open_source(folder), "train", targets=TASKS, sampler=sampler, size=mc.img_size,
                            test_time=True, max_clips=cfg.local.data.max_test_clips or None)  # fmt: skip
    data.prepare(progress=False)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        last_linear(model.heads[t]).register_forward_hook(lambda _m, i, _o, t=t: seen.__setitem__(t, i[0]))
        for t in TASKS
    ]
    feats: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    ys: dict[str, list[float]] = {t: [] for t in TASKS}
    model.eval()
    with torch.no_grad():
        for i in range(len(data)):
            clips, info = data[i]
            model(clips, info["frame_index"])
            for t in TASKS:
                feats[t].append(seen[t].double().mean(dim=0).numpy())
                ys[t].append(float(get_task(t).encode(info[t])))
    for h in hooks:
        h.remove()
    return {t: np.stack(v) for t, v in feats.items()}, {t: np.array(v) for t, v in ys.items()}


@pytest.mark.slow
def test_simulated_run_refits_the_heads_to_the_pooled_ridge_and_resumes(
    federated_phantom: Path, tmp_path: Path
) -> None:
    cfg = parse_run_config(_run_text(rounds=2), "tiny")

    def stop_after_round_1(phase: str, server_round: int, summary: dict[str, object]) -> None:
        if server_round == 1:
            raise RoundFailed("stopped by the test after round 1")

    with pytest.raises(RoundFailed):
        simulate(cfg, federated_phantom, tmp_path, on_round=stop_after_round_1, default_policy=TINY_DATA)
    store = Store(f"sqlite:///{tmp_path / 'fedecho.db'}")
    (run,) = store.list_runs()
    assert run.status == "paused"
    resumed = simulate(cfg, federated_phantom, tmp_path, resume=run.id, default_policy=TINY_DATA)
    assert resumed == run.id and store.get_run(run.id).status == "finished"
    events = store.events(run.id)
    assert [e.kind for e in events if e.kind in ("target-stats", "refit", "refit-skipped")] == ["target-stats", "refit"]
    queries = [(r.round, r.site, r.status) for r in store.site_results(run.id) if r.kind == "query"]
    assert sorted(queries) == [(0, "site01", "ok"), (0, "site02", "ok"), (2, "site01", "ok"), (2, "site02", "ok")]
    # the final checkpoint: target statistics and heads as pooled data would give them
    final = load_checkpoint(store.checkpoints(run.id)[0].path)
    per_site = [_training_videos(cfg, federated_phantom / s, final) for s in ("site01", "site02")]
    for t in TASKS:
        y = np.concatenate([ys[t] for _, ys in per_site])
        shift, scale = (float(s) for s in final.heads.stats(t))
        assert shift == pytest.approx(y.mean(), rel=1e-6) and scale == pytest.approx(y.std(), rel=1e-5)
        x = np.concatenate([f[t] for f, _ in per_site])
        x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        u = (y - shift) / scale
        energy = np.mean(np.sum(x[:, :-1] ** 2, axis=0))  # n x the features' mean square
        penalty = RIDGE * energy * np.diag([1.0] * (x.shape[1] - 1) + [0.0])
        w = np.linalg.solve(x.T @ x + penalty, x.T @ u)
        last = last_linear(final.heads[t])
        np.testing.assert_allclose(last.weight.detach().double().numpy()[0], w[:-1], rtol=1e-5, atol=1e-6)
        assert float(last.bias.detach()) == pytest.approx(w[-1], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_site_with_too_few_videos_refuses_the_query_and_the_run_pauses(
    federated_phantom: Path, tmp_path: Path
) -> None:
    cfg = parse_run_config(_run_text(rounds=1), "tiny")
    strict = {"site01": SitePolicy(min_videos=5, min_patients=1)}  # site01 holds 4 training videos
    with pytest.raises(RoundFailed, match="target statistics"):
        simulate(cfg, federated_phantom, tmp_path, policies=strict, default_policy=TINY_DATA)
    store = Store(f"sqlite:///{tmp_path / 'fedecho.db'}")
    (run,) = store.list_runs()
    assert run.status == "paused"
    (refused,) = [r for r in store.site_results(run.id) if r.status == "refused"]
    assert (refused.site, refused.kind, refused.round) == ("site01", "query", 0) and "min_videos" in refused.reason
    assert any(e.kind == "refused" and e.site == "site01" for e in store.events(run.id))
    rows = SiteLog(tmp_path / "sites" / "site01", create=False).rows()
    assert [(r.message_type, r.decision) for r in rows] == [("query.target-stats", "refused")]
    assert "4 video(s)" in rows[0].reason
    answered = SiteLog(tmp_path / "sites" / "site02", create=False).rows()
    assert [(r.message_type, r.decision) for r in answered] == [("query.target-stats", "allowed")]
    assert answered[0].update_sha256  # the digest of the statistics the site sent
