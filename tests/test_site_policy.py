"""Site policy and audit: the [policy] table and its protective defaults (minimum videos and patients behind
anything that leaves the site, a local-step bound), refusals before any video is read, both audit logs
(append-only, joined by the update's hash), the start row with the settings in force, `fedecho audit`, the data
check before a site joins, and a simulated run where one site refuses and the other trains."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from typer.testing import CliRunner

from builders import TINY_DATA, tiny_run
from fedecho._toml import ConfigError
from fedecho.cli import app as cli
from fedecho.client.app import build_client_app
from fedecho.client.audit import SiteLog, audit_start
from fedecho.client.config import check_data, load_site_config, settings_in_force
from fedecho.client.policy import DEFAULT_POLICY, Request, SitePolicy, parse_policy
from fedecho.client.site import Site
from fedecho.fl.config import parse_run_config
from fedecho.fl.exchange import encode
from fedecho.fl.protocol import ERROR_FAILED, ERROR_REFUSED
from fedecho.privacy.dp_policy import PrivacyPolicy
from fedecho.privacy.ledger import PrivacyLedger
from fedecho.sim.run import simulate
from fedecho.storage import Store

runner = CliRunner()

SITE_TOML = """
[site]
name = "h1"
data = "data"
cache = "cache"
state = "state"
"""


def _request(**kw: object) -> Request:
    base: dict[str, object] = dict(
        kind="train", phase="pretrain", model="echo_vit_tiny", tasks=(), steps=1, epochs=1, batch_size=2
    )
    return Request(**{**base, **kw})  # type: ignore[arg-type]


def test_policy_table_is_parsed_and_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        SITE_TOML + '[policy]\nphases = ["finetune"]\ntasks = ["ef"]\nmodels = ["echo_vit_tiny"]\n'
        "max_local_steps = 50\n"
    )
    policy = load_site_config(path).policy
    assert policy == SitePolicy(("finetune",), ("ef",), ("echo_vit_tiny",), 50)
    path.write_text(SITE_TOML)
    assert load_site_config(path).policy == DEFAULT_POLICY
    for bad, field in [
        ('phases = ["train"]', "[policy].phases"),
        ("max_local_steps = -1", "[policy].max_local_steps"),
        ('tasks = "ef"', "[policy].tasks"),
        ("max_steps = 3", "unknown field(s) max_steps"),
    ]:
        path.write_text(SITE_TOML + "[policy]\n" + bad + "\n")
        with pytest.raises(ConfigError) as e:
            load_site_config(path)
        assert str(path) in str(e.value) and field in str(e.value), bad


@pytest.mark.parametrize(
    ("policy", "request_", "reason"),
    [
        (SitePolicy(phases=("finetune",)), _request(), "phase 'pretrain' is not allowed"),
        (SitePolicy(models=("echo_vit_small",)), _request(), "model 'echo_vit_tiny' is not allowed"),
        (SitePolicy(tasks=("ef",)), _request(phase="finetune", tasks=("ef", "view")), "task(s) view not allowed"),
        (SitePolicy(max_local_steps=4), _request(steps=5), "5 local steps per round"),
        (SitePolicy(max_local_steps=4), _request(steps=0, epochs=2), "2 epoch(s) x ceil(7 videos / batch 2)"),
    ],
)
def test_policy_refuses_requests_outside_it(policy: SitePolicy, request_: Request, reason: str) -> None:
    decision = policy.check(request_, lambda: 7)
    assert not decision.allowed and reason in decision.reason
    assert DEFAULT_POLICY.check(request_, lambda: 7).allowed


def test_policy_allows_within_bounds_and_spares_evaluation() -> None:
    assert SitePolicy(max_local_steps=8).check(_request(steps=0, epochs=2), lambda: 7).allowed  # 2 x 4 = 8
    # evaluation trains nothing: the step bound does not apply, the phase/model/task lists do
    strict = SitePolicy(max_local_steps=1)
    assert strict.check(_request(kind="evaluate", steps=9)).allowed
    assert not SitePolicy(phases=("finetune",)).check(_request(kind="evaluate")).allowed


def _message(run_toml: str, phase: str, kind: str) -> Message:
    config = ConfigRecord(
        {"run-toml": run_toml, "phase": phase, "lr": 1e-3, "seed": 1, "wire-dtype": "float32", "frozen-sha256": "",
         "run-id": 5, "server-round": 2}
    )  # fmt: skip
    return Message(RecordDict({"arrays": encode({}, "float32"), "config": config}), 0, kind)


@pytest.mark.parametrize(
    ("policy", "run_toml", "phase", "reason"),
    [
        (SitePolicy(phases=("finetune",)), tiny_run(), "pretrain", "phase 'pretrain'"),
        (SitePolicy(tasks=("view",)), tiny_run(), "finetune", "task(s) ef"),
        (SitePolicy(models=("echo_vit_small",)), tiny_run(), "pretrain", "model 'echo_vit_tiny'"),
        (SitePolicy(max_local_steps=2), tiny_run().replace("steps = 1", "steps = 3"), "pretrain", "3 local steps"),
    ],
)
def test_client_app_refuses_before_touching_data(
    policy: SitePolicy, run_toml: str, phase: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)

    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("the site's data was touched")

    monkeypatch.setattr("fedecho.client.app.site_train", touched)
    monkeypatch.setattr("fedecho.client.mods.manifest_sha256", touched)
    monkeypatch.setattr("fedecho.client.site.train_video_count", touched)
    site = Site("h1", tmp_path / "no-data", tmp_path / "cache", tmp_path / "state", policy=policy)
    app = build_client_app(lambda context: site)
    reply = app(_message(run_toml, phase, MessageType.TRAIN), Context(1, 1, {}, RecordDict(), {}))
    assert reply.has_error() and reply.error.code == ERROR_REFUSED
    assert "refused by site h1: policy:" in reply.error.reason and reason in reply.error.reason
    assert not (tmp_path / "cache").exists()
    with SiteLog(site.state) as log:
        (row,) = log.rows()
    assert (row.decision, row.run_id, row.round, row.phase, row.message_type) == ("refused", 5, 2, phase, "train")
    assert reason in row.reason and row.manifest_sha256 is None and row.update_sha256 is None


def test_audit_logs_are_append_only_and_shown(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(SITE_TOML)
    site = load_site_config(path)
    with SiteLog(site.state) as log:
        log.record(message_type="train", decision="allowed", flower_run_id=77, run_id=1, round=1, phase="pretrain",
                   manifest_sha256="m" * 64, update_sha256="u" * 64, update_bytes=10)  # fmt: skip
        log.record(message_type="train", decision="refused", reason="policy: no", run_id=2, round=1, phase="finetune")
    (tmp_path / "server").mkdir()
    store = Store(f"sqlite:///{tmp_path / 'server' / 'fedecho.db'}")
    run = store.create_run("r", "")
    store.add_audit(run, "pretrain", 1, "train", "h1", status="accepted", bytes_down=5, bytes_up=3, sha256="u" * 64)
    store.add_audit(run, "pretrain", 1, "train", "h2", status="refused", reason="refused by site h2: policy: no")
    store.close()
    for db, table in ((site.state / "site.db", "site_audit"), (tmp_path / "server" / "fedecho.db", "audit")):
        con = sqlite3.connect(db)
        for sql in (f"UPDATE {table} SET reason = 'edited'", f"DELETE FROM {table}"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                con.execute(sql)
        con.close()
    res = runner.invoke(cli, ["audit", "--site", str(path)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "site h1" in res.output and "allowed" in res.output and "refused" in res.output
    res = runner.invoke(cli, ["audit", "--site", str(path), "--run", "2", "--json"])
    rows = json.loads(res.output)
    assert [(r["run_id"], r["decision"], r["reason"]) for r in rows] == [(2, "refused", "policy: no")]
    res = runner.invoke(cli, ["audit", "--state", str(tmp_path / "server"), "--site-name", "h2", "--json"])
    assert [(r["site"], r["status"]) for r in json.loads(res.output)] == [("h2", "refused")]
    res = runner.invoke(cli, ["audit", "--state", str(tmp_path / "server"), "--limit", "1"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "h2" in res.output and "accepted" not in res.output
    empty = tmp_path / "empty.toml"
    empty.write_text(SITE_TOML.replace('"state"', '"nothing-here"'))
    res = runner.invoke(cli, ["audit", "--site", str(empty)])
    assert res.exit_code == 2 and "no site database" in res.output


@pytest.mark.slow
def test_simulated_run_one_site_refuses_the_other_trains(federated_phantom: Path, tmp_path: Path) -> None:
    text = tiny_run(pretrain_rounds=1, finetune_rounds=0).replace("seed = 3\n", "seed = 3\nmin_sites = 1\n")
    cfg = parse_run_config(text, "tiny")
    run_id = simulate(
        cfg,
        federated_phantom,
        tmp_path / "state",
        policies={"site02": SitePolicy(models=("echo_vit_small",))},
        default_policy=TINY_DATA,
    )
    store = Store(f"sqlite:///{tmp_path / 'state' / 'fedecho.db'}")
    assert store.get_run(run_id).status == "finished"
    results = {(r.site, r.kind): r for r in store.site_results(run_id)}
    assert results["site01", "train"].status == "ok" and results["site01", "evaluate"].status == "ok"
    refused = results["site02", "train"]
    assert refused.status == "refused" and "model 'echo_vit_tiny' is not allowed" in refused.reason
    assert any(e.kind == "refused" and e.site == "site02" for e in store.events(run_id))
    audit = {(a.site, a.kind): a for a in store.audit(run_id)}
    assert audit["site01", "train"].status == "accepted" and audit["site02", "train"].status == "refused"
    assert audit["site01", "train"].bytes_up > 0 and audit["site02", "train"].sha256 == ""
    with SiteLog(tmp_path / "state" / "sites" / "site01") as log:
        ok = {r.message_type: r for r in log.rows(run_id)}
    assert ok["train"].decision == "allowed" and ok["train"].manifest_sha256
    assert ok["train"].update_sha256 == audit["site01", "train"].sha256  # both logs name the same update
    assert ok["train"].round == 1 and ok["train"].phase == "pretrain"
    with SiteLog(tmp_path / "state" / "sites" / "site02") as log:
        rows = log.rows(run_id)
    assert rows and all(r.decision == "refused" and r.manifest_sha256 is None for r in rows)
    assert parse_policy({}, Path("x")) == DEFAULT_POLICY


# ------------------------------------------------------------ the default policy


def test_a_policy_is_in_force_without_the_table_and_the_site_can_loosen_it(tmp_path: Path) -> None:
    assert (DEFAULT_POLICY.min_videos, DEFAULT_POLICY.min_patients, DEFAULT_POLICY.max_local_steps) == (10, 5, 1000)
    path = tmp_path / "site.toml"
    path.write_text(SITE_TOML)
    assert load_site_config(path).policy == DEFAULT_POLICY
    path.write_text(SITE_TOML + "[policy]\nmin_videos = 2\nmin_patients = 0\nmax_local_steps = 0\n")
    loose = load_site_config(path).policy
    assert (loose.min_videos, loose.min_patients, loose.max_local_steps) == (2, 0, 0)
    path.write_text(SITE_TOML + '[policy]\nphases = ["finetune"]\n')  # an absent field keeps its default
    assert load_site_config(path).policy.min_videos == 10
    for bad in ("min_videos = 0", "min_patients = -1"):
        path.write_text(SITE_TOML + f"[policy]\n{bad}\n")
        with pytest.raises(ConfigError, match=bad.split(" ")[0]):
            load_site_config(path)


def test_check_data_counts_videos_and_patients() -> None:
    policy = SitePolicy()  # 10 videos of 5 patients
    few = policy.check_data("the validation split", ["p1"])
    assert not few.allowed and "the validation split holds 1 video(s)" in few.reason and "min_videos" in few.reason
    one_patient = policy.check_data("the training set", ["p1"] * 12)
    assert (
        not one_patient.allowed
        and "videos of 1 patient(s)" in one_patient.reason
        and "min_patients" in one_patient.reason
    )
    assert policy.check_data("the training set", [f"p{i % 5}" for i in range(10)]).allowed
    # patients are counted only where every video has a patient id: otherwise only the videos
    assert policy.check_data("the training set", ["p1"] * 11 + [None]).allowed
    assert SitePolicy(min_patients=0).check_data("x", ["p1"] * 10).allowed


def _unreadable_site(federated_phantom: Path, tmp_path: Path) -> Path:
    """A copy of site01 whose file list is intact but whose videos cannot be decoded (any decode would fail)."""
    data = tmp_path / "data"
    shutil.copytree(federated_phantom / "site01", data)
    for video in (data / "Videos").glob("*.avi"):
        video.write_bytes(b"not a video")
    return data


def _ask(site: Site, phase: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    app = build_client_app(lambda context: site)
    return app(_message(tiny_run(), phase, kind), Context(1, 1, {}, RecordDict(), {}))


def _files(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if f.is_file()] if folder.exists() else []


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_too_few_videos_are_refused_before_any_video_is_read(
    kind: str, federated_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _unreadable_site(federated_phantom, tmp_path)
    site = Site("h1", data, tmp_path / "cache", tmp_path / "state")  # the default policy: 10 videos
    reply = _ask(site, "pretrain", kind, monkeypatch)
    assert reply.has_error() and reply.error.code == ERROR_REFUSED, reply.error.reason
    what = "the training set" if kind == MessageType.TRAIN else "the validation split"
    assert f"policy: {what} holds" in reply.error.reason and "min_videos" in reply.error.reason
    assert _files(tmp_path / "cache") == []  # no video hashed or decoded
    with SiteLog(site.state) as log:
        (row,) = log.rows()
    assert row.decision == "refused" and "min_videos" in row.reason


@pytest.mark.slow
def test_a_budget_refusal_comes_before_any_video_is_read(
    federated_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _unreadable_site(federated_phantom, tmp_path)
    spent = PrivacyPolicy(dp="required", min_noise_multiplier=1.0, epsilon_max=0.01)
    site = Site("h1", data, tmp_path / "cache", tmp_path / "state", policy=TINY_DATA, privacy=spent)
    reply = _ask(site, "pretrain", MessageType.TRAIN, monkeypatch)
    assert reply.has_error() and reply.error.code == ERROR_REFUSED and "privacy budget" in reply.error.reason
    assert _files(tmp_path / "cache") == [] and PrivacyLedger(site.state).entries() == []
    # the control: with the budget out of the way the same site reaches its videos, and they do not decode
    site.privacy = PrivacyPolicy()
    reply = _ask(site, "pretrain", MessageType.TRAIN, monkeypatch)
    assert reply.has_error() and reply.error.code == ERROR_FAILED and "ValueError" in reply.error.reason


# ------------------------------------------------------------ starting a site


def _site_file(tmp_path: Path, data: Path | str, extra: str = "") -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SITE_TOML.replace('data = "data"', f'data = "{data}"') + extra)
    return path


def test_check_data_refuses_a_missing_empty_or_unknown_data_folder(tmp_path: Path, echonet_phantom: Path) -> None:
    cfg = load_site_config(_site_file(tmp_path, "nowhere"))
    with pytest.raises(ConfigError, match=r"site\.toml: \[site\]\.data = .*nowhere does not exist"):
        check_data(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty is empty"):
        check_data(load_site_config(_site_file(tmp_path, "empty")))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no videos here")
    with pytest.raises(ConfigError, match=r"holds no EchoNet-Dynamic FileList\.csv, CAMUS, TMED-2, DICOM files"):
        check_data(load_site_config(_site_file(tmp_path, "notes")))
    check_data(load_site_config(_site_file(tmp_path, echonet_phantom)))


def test_settings_in_force_state_privacy_policy_and_approval(
    tmp_path: Path, echonet_phantom: Path, dicom_phantom: Path
) -> None:
    lines = settings_in_force(load_site_config(_site_file(tmp_path, echonet_phantom)))
    text = "\n".join(lines)
    assert 'DP-SGD only when the run file asks for it (dp = "optional") (default)' in text
    assert "no cap on epsilon" in text and "at delta 1e-05 (default)" in text
    assert "privacy unit: one video (unit not set:" in text and "have no patient id" in text
    assert "(no [policy] table: the defaults)" in text and "at most 1000 local steps per round (default)" in text
    assert "at least 10 videos (default) behind every update and every metric, of at least 5 patients" in text
    assert "code approval: only the fedecho" in text and "no other bundle approved" in text
    site02 = dicom_phantom / "site02"
    cfg = load_site_config(
        _site_file(tmp_path, site02, "[privacy]\nepsilon_max = 8.0\n[policy]\nmin_videos = 2\nmin_patients = 0\n")
    )
    with SiteLog(cfg.state) as log:
        log.approve("a" * 64, "reviewed")
    text = "\n".join(settings_in_force(cfg))
    assert "at most epsilon 8 over all runs, at delta" in text
    assert "privacy unit: one patient (unit not set: every one of the" in text
    assert "at least 2 videos behind every update and every metric, patients not counted" in text
    assert "and 1 approved bundle(s): aaaaaaaaaaaa" in text
    cfg = load_site_config(_site_file(tmp_path, site02, '[privacy]\nunit = "video"\n'))
    assert 'privacy unit: one video (the site\'s choice ([privacy] unit = "video"))' in settings_in_force(cfg)


def test_the_start_row_records_the_settings_in_force(tmp_path: Path, echonet_phantom: Path) -> None:
    path = _site_file(tmp_path, echonet_phantom)
    cfg = load_site_config(path)
    settings = settings_in_force(cfg)
    audit_start(cfg, settings)
    with SiteLog(cfg.state) as log:
        (row,) = log.rows()
    assert (row.message_type, row.decision) == ("start", "started")
    assert row.reason.splitlines() == settings and row.manifest_sha256
    res = runner.invoke(cli, ["audit", "--site", str(path)], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "started" in res.output and "privacy unit" in res.output, res.output
