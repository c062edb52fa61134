"""The fedecho ServerApp: drives a federated run (pre-training, then fine-tuning) on Flower's Grid.

`app` serves `fedecho server run`: everything it needs arrives in the run config that
`fedecho server run` writes into the submitted app (`fedecho-run-toml`, `fedecho-state`,
`fedecho-store`, `fedecho-round-timeout`, `fedecho-min-sites`, `fedecho-quorum`,
`fedecho-site-wait`, `fedecho-round-retries`, `fedecho-eval-data`,
`fedecho-resume`, `fedecho-trace-messages` when the coordinator traces messages, and `fedecho-max-examples`,
`fedecho-max-examples-per-site` when its caps on claimed example counts differ from the defaults). Sites are
named from the registry the coordinator keeps in its state folder (`fedecho.server.identity.RegistryNames`).
`build_server_app` lets the simulation pass the same settings directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedecho._env import set_torch_threads
from fedecho.fl.config import parse_run_config
from fedecho.fl.flower_patches import quick_reply_pulls, set_message_id
from fedecho.fl.packing import pack_message, unpack_message
from fedecho.report.tables import fmt_round
from fedecho.server.config import DEFAULT_MAX_EXAMPLES
from fedecho.server.identity import RegistryNames
from fedecho.server.rounds import FederatedRun, RoundFailed, ServerSettings
from fedecho.server.transport import GridWrapper
from fedecho.storage.store import store_url

log = logging.getLogger("fedecho.server")

RESUME_HINTS = {  # what an operator runs once the sites are back
    "deployment": "fedecho server resume {} --server SERVER.toml",
    "simulation": "fedecho sim --resume {} (with the same options)",
}


def server_threads() -> int:
    """torch threads of the ServerApp: $FEDECHO_THREADS when set (the simulation sets it), else 1. Its round
    work (int8 encoding, update checks, averaging) is elementwise over a few hundred tensors, where a second
    thread gains nothing and, on busy cores (sites or other jobs on the host), costs 10-25x: measured,
    echo_vit_small's int8 encode takes 0.07 s on 1 thread and 1.8 s on 2."""
    return int(os.environ.get("FEDECHO_THREADS", "0") or 0) or 1


SettingsResolver = Callable[[Context], tuple[str, ServerSettings, int]]


def settings_from_run_config(context: Context) -> tuple[str, ServerSettings, int]:
    """(run file text, server settings, run id to resume or 0) from the submitted app's run config."""
    rc = context.run_config
    try:
        text = str(rc["fedecho-run-toml"])
        state = Path(str(rc["fedecho-state"]))
    except KeyError as e:
        raise ValueError(f"run config lacks {e.args[0]}: submit runs with `fedecho server run`") from e
    eval_data = str(rc.get("fedecho-eval-data", "") or "")
    settings = ServerSettings(
        state=state,
        store_url=store_url(state, str(rc.get("fedecho-store", "") or "") or None),
        round_timeout=float(rc.get("fedecho-round-timeout", 600.0)),  # type: ignore[arg-type]
        min_sites=int(rc.get("fedecho-min-sites", 2)),  # type: ignore[arg-type]
        quorum=int(rc.get("fedecho-quorum", 1)),  # type: ignore[arg-type]
        site_wait=float(rc.get("fedecho-site-wait", 600.0)),  # type: ignore[arg-type]
        round_retries=int(rc.get("fedecho-round-retries", 2)),  # type: ignore[arg-type]
        eval_data=Path(eval_data) if eval_data else None,
        eval_cache=state / "cache",
        trace_messages=bool(rc.get("fedecho-trace-messages", False)),
        site_names=RegistryNames(state=state),
        max_examples=int(rc.get("fedecho-max-examples", DEFAULT_MAX_EXAMPLES)),  # type: ignore[arg-type]
        max_examples_per_site=_per_site_caps(str(rc.get("fedecho-max-examples-per-site", "") or "")),
    )
    return text, settings, int(rc.get("fedecho-resume", 0))  # type: ignore[arg-type]


def _per_site_caps(text: str) -> dict[str, int]:
    """fedecho-max-examples-per-site: JSON {site name: cap} (`fedecho.server.submit.app_config`)."""
    if not text:
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return {str(k): int(v) for k, v in data.items()}
    except (ValueError, TypeError) as e:
        raise ValueError(f"run config fedecho-max-examples-per-site is malformed ({e}): {text[:80]!r}") from e


class PackingGrid(GridWrapper):
    """Flower's Grid with every message's arrays packed into one Array on the way out and unpacked on the way
    back (`fedecho.fl.packing`: one object per tensor made the transport cost 20-60 s a round). The round loop
    sees the records it built and the ones the sites built, as before."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        originals = list(messages)
        shared: dict[int, ArrayRecord] = {}  # the same global tensors go to every site: packed once
        ids = list(self.grid.push_messages([pack_message(m, cache=shared) for m in originals]))
        for m, i in zip(originals, ids, strict=False):  # as Flower's grid does with the message it pushes
            set_message_id(m, i)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [unpack_message(m) for m in self.grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        shared: dict[int, ArrayRecord] = {}
        replies = self.grid.send_and_receive([pack_message(m, cache=shared) for m in messages], timeout=timeout)
        return [unpack_message(m) for m in replies]


def print_round(phase: str, server_round: int, summary: dict[str, Any]) -> None:
    """One line per round on stdout: `fedecho server run` streams it from the SuperLink."""
    print(f"{phase} round {server_round}: {fmt_round(summary)}", flush=True)


def build_server_app(
    resolve: SettingsResolver,
    on_round: Callable[[str, int, dict[str, Any]], None] | None = None,
    outcome: dict[str, Any] | None = None,
) -> ServerApp:
    """outcome, when given, receives the fedecho run id and any error (the simulation reads them). Arrays
    travel packed (`PackingGrid`), in the simulation too, so that it runs the deployment's code."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        set_torch_threads(server_threads())
        quick_reply_pulls(grid)
        text, settings, resume = resolve(context)
        cfg = parse_run_config(text)
        run = FederatedRun(cfg, settings, resume=resume, on_round=on_round or print_round)
        if outcome is not None:
            outcome["run_id"] = run.run_id
        if run.already_finished:
            print(f"fedecho run {run.run_id} is already finished: nothing to resume", flush=True)
            return
        run.store.set_flower_run_id(run.run_id, int(context.run_id))
        log.info("fedecho run %d (%s): phases %s", run.run_id, run.cfg.run.name, ", ".join(run.cfg.phases))
        print(f"fedecho run {run.run_id}: {run.cfg.run.name}", flush=True)
        try:
            run.execute(run.transport(PackingGrid(grid)))  # deadlines and resends around the packed transport
        except RoundFailed as e:  # a pause, not a crash: one line, and the run resumes from its checkpoint
            if outcome is not None:
                outcome["error"] = e
            hint = RESUME_HINTS[settings.mode].format(run.run_id)
            print(f"fedecho run {run.run_id} paused: {e}. Resume it with `{hint}`", flush=True)
            return
        except Exception as e:
            if outcome is not None:
                outcome["error"] = e
            raise
        print(f"fedecho run {run.run_id} finished", flush=True)

    return app


app = build_server_app(settings_from_run_config)
