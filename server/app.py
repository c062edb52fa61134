"""The fedecho ServerApp: drives a federated run (pre-training, then fine-tuning) on Flower's Grid.

`app` serves `fedecho server run`: everything it needs arrives in the run config that
`fedecho server run` writes into the submitted app (`fedecho-run-toml`, `fedecho-state`,
`fedecho-store`, `fedecho-round-timeout`, `fedecho-min-sites`, `fedecho-eval-data`,
`fedecho-resume`, and `fedecho-trace-messages` when the coordinator traces messages).
`build_server_app` lets the simulation pass the same settings directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedecho._env import set_torch_threads
from fedecho.fl.config import parse_run_config
from fedecho.server.rounds import FederatedRun, ServerSettings
from fedecho.storage.store import store_url

log = logging.getLogger("fedecho.server")

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
        eval_data=Path(eval_data) if eval_data else None,
        eval_cache=state / "cache",
        trace_messages=bool(rc.get("fedecho-trace-messages", False)),
    )
    return text, settings, int(rc.get("fedecho-resume", 0))  # type: ignore[arg-type]


def print_round(phase: str, server_round: int, summary: dict[str, Any]) -> None:
    """One line per round on stdout: `fedecho server run` streams it from the SuperLink."""
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
    print(f"{phase} round {server_round}: {shown}", flush=True)


def build_server_app(
    resolve: SettingsResolver,
    on_round: Callable[[str, int, dict[str, Any]], None] | None = None,
    outcome: dict[str, Any] | None = None,
) -> ServerApp:
    """outcome, when given, receives the fedecho run id and any error (the simulation reads them)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        set_torch_threads()
        text, settings, resume = resolve(context)
        cfg = parse_run_config(text)
        run = FederatedRun(cfg, settings, resume=resume, on_round=on_round or print_round)
        if outcome is not None:
            outcome["run_id"] = run.run_id
        run.store.set_flower_run_id(run.run_id, int(context.run_id))
        log.info("fedecho run %d (%s): phases %s", run.run_id, run.cfg.run.name, ", ".join(run.cfg.phases))
        print(f"fedecho run {run.run_id}: {run.cfg.run.name}", flush=True)
        try:
            run.execute(grid)
        except Exception as e:
            if outcome is not None:
                outcome["error"] = e
            raise
        print(f"fedecho run {run.run_id} finished", flush=True)

    return app


app = build_server_app(settings_from_run_config)
