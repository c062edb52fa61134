"""Proof that nothing identifying leaves a site.

A real deployment on loopback (SuperLink with TLS and node authentication, two SuperNodes) runs one
pre-training and one fine-tuning round of echo_vit_tiny on phantom DICOM cines whose headers carry fake
patient data and whose pixels carry burned-in names, IDs and dates. site01 trains on its archive
registered with `fedecho data add`; site02 trains straight on its raw DICOM archive (record keys are
archive paths, p<subject>/s<study>, and patient groups are MRNs: all of it must stay at the site).
The coordinator traces every message (`trace_messages = true`). Then no identifying string may appear
in any message, metric or error reason, any file under the server's state folder (SuperLink database,
fedecho store, logs, submissions, checkpoints, the trace), any store row, or the CLI's output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import make_deployment, write_server_toml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from builders import identifying_strings, tiny_run
from fedecho.cli import app
from fedecho.server.config import load_server_config
from fedecho.server.submit import app_config
from fedecho.server.trace import MessageTrace
from fedecho.storage import Store
from fedecho.storage.store import store_url
from fedecho.synth import synthesize

# Files that carry float tensors (model weights, array bytes): there a short string such as a 4-letter
# given name or a 6-digit number occurs by chance in megabytes of essentially random bytes, so only
# strings of 8+ characters are looked for (full names, MRNs, dates, UIDs, paths: no chance match).
TENSOR_SUFFIXES = (".safetensors", ".pb")
MIN_IN_TENSORS = 8


class Needles:
    """The identifying strings, lower-cased (the search is case-insensitive) and encoded as UTF-8 and Latin-1."""

    def __init__(self, strings: Iterable[str]) -> None:
        # Numbers shorter than 8 digits occur by chance in hashes, timestamps and metrics; the phantom's only
        # such identifier, the 6-digit Study ID, is the tail of the 8-digit study number, looked for in full.
        self.strings = sorted({s for s in strings if len(s) >= 4 and not (s.isdigit() and len(s) < 8)})
        self.patterns = {
            s: {s.lower().encode(enc) for enc in ("utf-8", "latin-1")} for s in self.strings
        }  # fmt: skip

    def found(self, blob: bytes | str, *, tensors: bool = False) -> list[str]:
        """The strings that occur in blob (for tensor-bearing blobs only those of MIN_IN_TENSORS+ characters)."""
        hay = (blob.encode("utf-8") if isinstance(blob, str) else blob).lower()
        return [
            s for s, pats in self.patterns.items()
            if (not tensors or len(s) >= MIN_IN_TENSORS) and any(p in hay for p in pats)
        ]  # fmt: skip


@dataclass
class Proof:
    archive: Path
    site01_data: Path
    state: Path
    trace: Path
    cli_output: str
    cli_returncode: int
    needles: Needles
    node_ids: dict[str, int]


def _wide_env() -> dict[str, str]:
    """One thread, and a console wide enough that rich never wraps (a wrapped string would slip through)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000", "FEDECHO_THREADS": "1"}


@pytest.fixture(scope="module")
def proof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proof]:
    root = tmp_path_factory.mktemp("proof")
    archive = root / "archive"
    synthesize(archive, videos=8, sites=2, fmt="dicom", seed=11, max_frames=24, progress=False)
    needles = Needles(identifying_strings(archive / "site01") | identifying_strings(archive / "site02"))
    site01_data = root / "site01-registered"
    registered = CliRunner().invoke(
        app, ["data", "add", str(archive / "site01"), "--site-dir", str(site01_data)], env={"COLUMNS": "200"}
    )
    assert registered.exit_code == 0, registered.output
    dep = make_deployment(root / "fed", round_timeout=300.0, min_sites=2, trace_messages=True)
    try:
        dep.add_site("site01", site01_data)  # the de-identified site folder
        dep.add_site("site02", archive / "site02", labels=archive / "site02" / "labels.csv")  # the raw archive
        dep.start_all()
        run_toml = root / "tiny.toml"
        run_toml.write_text(tiny_run(pretrain_rounds=1, finetune_rounds=1))
        fedecho = Path(sys.executable).with_name("fedecho")
        cli = subprocess.run(
            [str(fedecho), "server", "run", "--config", str(run_toml), "--server", str(dep.server.path)],
            capture_output=True, text=True, env=_wide_env(), timeout=900, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        dep.close()  # before looking: logs flushed, SQLite checkpointed, nothing still writing
    yield Proof(
        archive=archive,
        site01_data=site01_data,
        state=dep.server.state,
        trace=dep.server.state / "trace",
        cli_output=cli.stdout + cli.stderr,
        cli_returncode=cli.returncode,
        needles=needles,
        node_ids=dict(dep.node_ids),
    )


def _messages(trace: Path) -> list[tuple[Path, Message]]:
    return [(p, message_from_proto(ProtoMessage.FromString(p.read_bytes()))) for p in sorted(trace.rglob("*.pb"))]


def _readable(msg: Message) -> str:
    """Everything in a message but its array bytes: metadata, error, config and metric records, array names."""
    parts = [repr(msg.metadata)]
    if msg.has_error():
        parts.append(f"{msg.error.code} {msg.error.reason}")
    if msg.has_content():
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                parts += [f"{name}.{k} {a.dtype} {a.shape} {a.stype}" for k, a in record.items()]
            else:
                parts += [f"{name}.{k} = {v!r}" for k, v in record.items()]
    return "\n".join(parts)


@pytest.mark.slow
def test_the_run_trained_on_both_sites(proof: Proof) -> None:
    """The proof means something only if both sites really trained and evaluated, site02 on raw DICOM."""
    assert proof.cli_returncode == 0, proof.cli_output
    assert "finished:completed" in proof.cli_output
    raw = next((proof.archive / "site02").rglob("*_0001.dcm")).read_bytes()
    assert len(proof.needles.found(raw[:4096])) >= 15  # what site02 trained on is full of identifiers
    with Store(store_url(proof.state)) as store:
        (run,) = store.list_runs()
        assert run.status == "finished"
        assert [(r.phase, r.round, r.sites_replied) for r in store.rounds(run.id)] == [
            ("pretrain", 1, 2), ("finetune", 1, 2)
        ]  # fmt: skip
        results = store.site_results(run.id)
        everything = {
            (p, k, s) for p in ("pretrain", "finetune") for k in ("train", "evaluate") for s in ("site01", "site02")
        }
        assert {(r.phase, r.kind, r.site, r.status) for r in results} == {(*e, "ok") for e in everything}
        assert all(r.num_examples > 0 for r in results if r.kind == "train")


@pytest.mark.slow
def test_no_identifier_in_any_message(proof: Proof) -> None:
    messages = _messages(proof.trace)
    # per round: train to 2 sites, 2 replies, evaluate to 2 sites, 2 replies; 2 rounds
    assert len(messages) == 16, [p.name for p, _ in messages]
    received = [m for p, m in messages if "-received-" in p.name]
    assert {m.metadata.src_node_id for m in received} == set(proof.node_ids.values())
    assert not [m.error.reason for m in received if m.has_error()]  # no site failed (an error reason would leave)
    assert all(m.content["info"]["site"] in ("site01", "site02") for m in received)
    for path, msg in messages:
        assert not proof.needles.found(_readable(msg)), f"{path.name}: {proof.needles.found(_readable(msg))}"
        if "-received-" in path.name:  # every byte a site sent (the sent ones are checked with every file)
            leaked = proof.needles.found(path.read_bytes(), tensors=True)
            assert not leaked, f"{path.name} (serialized, arrays included) holds {leaked}"
    for path in sorted(proof.trace.rglob("*.json")):
        assert not proof.needles.found(path.read_bytes()), path.name


def _sqlite_rows(path: Path) -> Iterator[tuple[str, tuple[object, ...]]]:
    """Every row of every table of a SQLite file (read-only)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                yield table, row
    finally:
        con.close()


@pytest.mark.slow
def test_no_identifier_in_any_file_the_server_wrote(proof: Proof) -> None:
    files = sorted(p for p in proof.state.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"superlink.db", "superlink.log", "pyproject.toml"} <= names, names
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".pb" for p in files)
    for path in files:
        blob = path.read_bytes()
        tensors = path.suffix in TENSOR_SUFFIXES or path.name.startswith("superlink.db")
        leaked = proof.needles.found(blob, tensors=tensors)
        assert not leaked, f"{path.relative_to(proof.state)} holds {leaked}"
        assert not proof.needles.found(str(path.relative_to(proof.state))), path
    # The SQLite files value by value: text in full, blobs (message objects, tensors) by the tensor rule.
    for db in (p for p in files if p.suffix == ".db"):
        for table, row in _sqlite_rows(db):
            for value in row:
                if isinstance(value, bytes):
                    leaked = proof.needles.found(value, tensors=True)
                else:
                    leaked = proof.needles.found(str(value))
                assert not leaked, f"{db.name} table {table} holds {leaked}"


@pytest.mark.slow
def test_no_identifier_in_any_store_row(proof: Proof) -> None:
    with Store(store_url(proof.state)) as store:
        (run,) = store.list_runs()
        rows: list[object] = [
            *store.list_runs(), *store.phases(run.id), *store.rounds(run.id), *store.site_results(run.id),
            *store.checkpoints(run.id), *store.events(), *store.audit(), *store.sites(),
        ]  # fmt: skip
    assert len(rows) > 10
    for row in rows:
        text = repr(row) + json.dumps(dataclasses.asdict(row), default=str)  # type: ignore[call-overload]
        assert not proof.needles.found(text), f"{type(row).__name__}: {proof.needles.found(text)}"
    reasons = [getattr(r, "reason", "") for r in rows]
    assert not [r for r in reasons if r], reasons  # no refusal, failure or rejection: nothing to explain


@pytest.mark.slow
def test_no_identifier_in_the_cli_output_or_the_superlink_log(proof: Proof) -> None:
    assert "round 1" in proof.cli_output  # the run's progress was streamed
    assert not proof.needles.found(proof.cli_output)
    log = (proof.state / "logs" / "superlink.log").read_text(errors="replace")
    assert "Created run" in log  # (the ServerApp's own log lines live in superlink.db, checked with every file)
    assert not proof.needles.found(log)


@pytest.mark.slow
def test_the_needles_find_what_they_look_for(tmp_path: Path) -> None:
    """The search is no weaker than it looks: header values, burned-in text and paths, in any case."""
    synthesize(tmp_path, videos=2, sites=1, fmt="dicom", seed=2, max_frames=12, progress=False)
    needles = Needles(identifying_strings(tmp_path))  # one site: the archive is the folder itself
    dcm = next(tmp_path.rglob("*_0001.dcm"))
    header = dcm.read_bytes()[:4096]
    assert len(needles.found(header)) >= 15  # the header's values, UIDs included
    name = next(s for s in needles.strings if ", " in s and s.replace(", ", "").isalpha())  # burned in: "FAMILY, GIVEN"
    assert needles.found(f"... {name.title()} ...") and needles.found(name.lower().encode("latin-1"))
    rel = dcm.relative_to(tmp_path).as_posix()
    subject = rel.split("/")[2]  # p<subject>
    assert subject in needles.found(f"cache key {rel}") and rel in needles.found(rel)
    assert not needles.found(b"\x00" * 64 + b"site01 train_loss 0.4231", tensors=True)


def test_message_trace_is_off_by_default_and_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_server_config(write_server_toml(tmp_path, 9093))
    assert not cfg.trace_messages and "fedecho-trace-messages" not in app_config(cfg, "")
    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    msg = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.arange(4, dtype=np.float32))}),
                "config": ConfigRecord({"phase": "pretrain"}),
                "metrics": MetricRecord({"train_loss": 0.5}),
            }
        ),
        7,
        MessageType.TRAIN,
    )
    trace = MessageTrace(tmp_path / "trace" / "run-0001")
    pb = trace.record("sent", msg)
    assert pb.name == "000001-sent-train-node7.pb"
    back = message_from_proto(ProtoMessage.FromString(pb.read_bytes()))
    assert np.array_equal(back.content["arrays"]["w"].numpy(), np.arange(4, dtype=np.float32))
    assert back.content["config"]["phase"] == "pretrain" and back.content["metrics"]["train_loss"] == 0.5
    summary = json.loads(pb.with_suffix(".json").read_text())
    assert summary["content"]["arrays"]["w"]["shape"] == [4] and summary["metadata"]["dst_node_id"] == 7
    assert MessageTrace(trace.folder).count == 1  # a resumed run numbers on
    assert re.fullmatch(r"\d{6}-sent-train-node7", pb.stem)
