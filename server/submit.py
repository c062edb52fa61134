"""Submit a fedecho run to the SuperLink: a generated Flower app folder, then `flwr run ... --stream`.

Flower runs an "app" (a FAB: pyproject.toml plus files). fedecho's code is the fedecho package installed at
the coordinator and at every site, so the generated app holds no code and no dependencies: only a
pyproject.toml naming the components (`fedecho.server.app:app`, `fedecho.client.app:app`) and, in
`[tool.flwr.app.config]`, the run itself (the run TOML's full text) and the coordinator settings the
ServerApp needs. Each submission keeps its folder under <state>/submissions/ as a record of what was sent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

import fedecho
from fedecho._proc import flower_bin, flower_env
from fedecho._toml import read_toml
from fedecho.server.config import CONNECTION, DEFAULT_MAX_EXAMPLES, ServerConfig

if TYPE_CHECKING:
    from fedecho.storage.store import RunRow

SERVERAPP = "fedecho.server.app:app"
CLIENTAPP = "fedecho.client.app:app"
APP_NAME = "fedecho-run"


class NothingToResume(Exception):
    """The run to resume has already finished: there is nothing to submit (not an error)."""


@dataclass(frozen=True)
class Submission:
    """A submitted run: its app folder, Flower's run id (0 if the submission failed) and final status."""

    app_dir: Path
    flower_run_id: int
    status: str  # Flower's status, e.g. "finished:completed", "finished:failed"; "" when unknown
    returncode: int
    run_status: str = ""  # the fedecho run's status in the store once the stream ended ("" when unknown)
    message: str = ""  # and its message (why it paused or failed)


EXIT_PAUSED = 3  # `fedecho server run|resume`: the run paused (too few sites); `fedecho server resume` continues it


def coordinator_runs(cfg: ServerConfig) -> list[RunRow]:
    """The fedecho runs in the coordinator's store; [] while it has none (or it cannot be read: the callers only
    add to what Flower says)."""
    from sqlalchemy.exc import SQLAlchemyError

    from fedecho.storage.store import Store, StoreMissing

    try:
        with Store(coordinator_store(cfg), create=False) as store:
            return store.list_runs()
    except (SQLAlchemyError, StoreMissing):
        return []


def fedecho_outcome(cfg: ServerConfig, flower_run_id: int) -> tuple[str, str]:
    """(status, message) of the fedecho run a Flower run carried, from the store; ("", "") when it has none. A
    paused run ends its Flower run normally (it is not a crash): Flower's status cannot tell it from a finished one."""
    rows = [r for r in coordinator_runs(cfg) if r.flower_run_id == flower_run_id]
    return (rows[-1].status, rows[-1].message) if rows else ("", "")


def app_config(cfg: ServerConfig, run_toml_text: str, resume: int = 0) -> dict[str, Any]:
    """The ServerApp's run config: what to run and where the coordinator keeps its state."""
    config: dict[str, Any] = {
        "fedecho-run-toml": run_toml_text,
        "fedecho-state": str(cfg.state),
        "fedecho-resume": int(resume),
        "fedecho-round-timeout": float(cfg.round_timeout),
        "fedecho-min-sites": int(cfg.min_sites),
        "fedecho-quorum": int(cfg.quorum),
        "fedecho-site-wait": float(cfg.site_wait),
        "fedecho-round-retries": int(cfg.round_retries),
        "fedecho-eval-data": str(cfg.eval_data) if cfg.eval_data else "",
        "fedecho-store": cfg.store or "",
    }
    if cfg.trace_messages:  # only when on: an untraced submission's config is unchanged
        config["fedecho-trace-messages"] = True
    # The examples caps travel only when they differ from the defaults, for the same reason. Flower's run config
    # holds flat values, so the per-site table travels as JSON text.
    if cfg.max_examples != DEFAULT_MAX_EXAMPLES:
        config["fedecho-max-examples"] = int(cfg.max_examples)
    if cfg.max_examples_per_site:
        config["fedecho-max-examples-per-site"] = json.dumps(dict(sorted(cfg.max_examples_per_site.items())))
    return config


def pyproject(config: dict[str, Any], description: str, serverapp: str = SERVERAPP, clientapp: str = CLIENTAPP) -> str:
    """A Flower app pyproject.toml with no code and no dependencies beyond what is installed."""
    doc = {
        "build-system": {"requires": ["setuptools>=77"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": APP_NAME,
            "version": fedecho.__version__,
            "description": description,
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedecho",
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": config,
                }
            }
        },
    }
    return tomli_w.dumps(doc, multiline_strings=True)


def build_app_dir(
    cfg: ServerConfig,
    run_toml: Path | None,
    resume: int = 0,
    *,
    serverapp: str = SERVERAPP,
    clientapp: str = CLIENTAPP,
) -> Path:
    """Write <state>/submissions/<UTC time>-<run name>/ with pyproject.toml and README.md; return the folder.

    run_toml may be None only for a resume: the run file is then the one the store recorded for that run.
    """
    if run_toml is None and not resume:
        raise ValueError("a new run needs its run TOML file")
    stored = run_to_resume(cfg, resume).config_toml if resume else ""
    if run_toml is not None:
        read_toml(run_toml)  # a broken run file fails here, naming the file, not inside the ServerApp
        text = Path(run_toml).read_text()
    else:
        text = stored
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(run_toml).stem if run_toml else "run")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    folder = cfg.state / "submissions" / f"{stamp}-{label}{f'-resume{resume}' if resume else ''}"
    folder.mkdir(parents=True)
    # Description and README are the same for every submission: only [tool.flwr.app.config] (the run) varies,
    # so the bundle's code hash, which a site approves (fedecho.client.approval), stays the same across runs.
    (folder / "pyproject.toml").write_text(
        pyproject(app_config(cfg, text, resume), "fedecho federated run", serverapp, clientapp)
    )
    (folder / "README.md").write_text(
        "# fedecho submission\n\nGenerated by `fedecho server run`. The code is the installed fedecho "
        "package; this bundle only carries the run configuration (`[tool.flwr.app.config]`).\n"
    )
    return folder


def coordinator_store(cfg: ServerConfig) -> str:
    """The SQLAlchemy URL of the coordinator's store: [server].store, else SQLite in the state folder (the one
    URL every command reading the coordinator's runs uses; nothing is created)."""
    from fedecho.storage.store import state_db_path

    return cfg.store or f"sqlite:///{state_db_path(cfg.state)}"


def run_to_resume(cfg: ServerConfig, run_id: int) -> RunRow:
    """The store's record of fedecho run `run_id`, checked to be resumable: an unknown run (or no store yet) raises
    ValueError, a finished one NothingToResume. Checked before anything is submitted."""
    from sqlalchemy.exc import SQLAlchemyError

    from fedecho.storage.store import Store, StoreMissing

    try:
        with Store(coordinator_store(cfg), create=False) as store:
            row = store.get_run(run_id)
    except SQLAlchemyError as e:  # a database server that does not answer, a driver missing
        raise ValueError(f"cannot resume run {run_id}: cannot read the store of {cfg.path}: {e}") from e
    except StoreMissing as e:
        raise ValueError(f"cannot resume run {run_id}: {e} (no run has been submitted to this coordinator)") from e
    except KeyError as e:
        raise ValueError(
            f"cannot resume run {run_id}: {e.args[0]} in {cfg.state} (`fedecho runs list --server {cfg.path}` "
            "lists the runs)"
        ) from e
    if row.status == "finished":
        raise NothingToResume(f"run {run_id} is already finished; nothing to resume")
    return row


def record_submission(cfg: ServerConfig, sub: Submission, fedecho_run_id: int) -> None:
    """Append which fedecho run a Flower run carried to STATE/submissions/runs.jsonl: the store keeps only a run's
    latest Flower run id, and `fedecho server status` names the fedecho run of each Flower run, resumed ones too."""
    line = {"flower_run_id": sub.flower_run_id, "fedecho_run_id": fedecho_run_id, "app_dir": sub.app_dir.name}
    with open(cfg.state / "submissions" / SUBMISSIONS_LOG, "a") as f:
        f.write(json.dumps(line) + "\n")


def submitted_runs(cfg: ServerConfig) -> dict[int, int]:
    """Flower run id -> fedecho run id, as `record_submission` wrote them (unknown ones are left out)."""
    found: dict[int, int] = {}
    try:
        lines = (cfg.state / "submissions" / SUBMISSIONS_LOG).read_text().splitlines()
    except OSError:
        return found
    for text in lines:
        try:
            entry = json.loads(text)
            flower, fedecho_id = int(entry["flower_run_id"]), int(entry["fedecho_run_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        if flower and fedecho_id:
            found[flower] = fedecho_id
    return found


_STARTED = re.compile(r"Successfully started run (\d+)")
_FEDECHO_RUN = re.compile(r"(?:^|\s)fedecho run (\d+): ")  # the ServerApp's first line (fedecho.server.app)
SUBMISSIONS_LOG = "runs.jsonl"


def flwr_run(
    cfg: ServerConfig,
    app_dir: Path,
    *,
    stream: bool = True,
    echo: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> Submission:
    """`flwr run APP_DIR fedecho [--stream]`; echo each output line; then ask the SuperLink for the final status."""
    from fedecho.server.superlink import SuperLinkError, flwr_json

    echo = echo or (lambda line: print(line, file=sys.stdout, flush=True))
    argv = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, *(["--stream"] if stream else [])]
    proc = subprocess.Popen(
        argv, env=flower_env(cfg.flwr_home), cwd=cfg.state, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, bufsize=1,
    )  # fmt: skip
    run_id = 0
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not run_id and (m := _STARTED.search(line)):
                run_id = int(m.group(1))
            echo(line)
        rc = proc.wait(timeout=timeout)
    except BaseException:
        proc.terminate()  # stops the log stream only; `flwr stop RUN_ID` stops the run itself
        proc.wait(timeout=10)
        raise
    status = ""
    if run_id and stream:
        try:
            runs = flwr_json(cfg, "ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
            status = str(runs[0].get("status", "")) if runs else ""
        except SuperLinkError:
            status = ""
    failed = rc != 0 or not run_id or (stream and status != "finished:completed")
    run_status, message = fedecho_outcome(cfg, run_id) if run_id and stream else ("", "")
    if not failed and run_status == "paused":
        return Submission(app_dir, run_id, status, EXIT_PAUSED, run_status, message)
    return Submission(app_dir, run_id, status, 1 if failed and rc == 0 else rc, run_status, message)


def submit_run(
    cfg: ServerConfig,
    run_toml: Path | None,
    resume: int = 0,
    *,
    stream: bool = True,
    echo: Callable[[str], None] | None = None,
    serverapp: str = SERVERAPP,
    clientapp: str = CLIENTAPP,
) -> Submission:
    """Submit a new run (resume=0) or the resumption of fedecho run `resume`, streaming its log until it ends.

    Resuming a finished run raises NothingToResume, an unknown one ValueError, before anything is submitted."""
    app_dir = build_app_dir(cfg, run_toml, resume, serverapp=serverapp, clientapp=clientapp)
    echo = echo or (lambda line: print(line, file=sys.stdout, flush=True))
    fedecho_run_id = [resume]

    def watch(line: str) -> None:
        if not fedecho_run_id[0] and (m := _FEDECHO_RUN.search(line)):
            fedecho_run_id[0] = int(m.group(1))
        echo(line)

    sub = flwr_run(cfg, app_dir, stream=stream, echo=watch)
    if sub.flower_run_id:
        with contextlib.suppress(OSError):  # a convenience for `fedecho server status`, never a reason to fail
            record_submission(cfg, sub, fedecho_run_id[0])
    return sub
