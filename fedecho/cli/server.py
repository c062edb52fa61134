"""`fedecho server start|run|resume|status|flwr`: the coordinator's SuperLink, run submission, federation status."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import tomllib
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from fedecho._proc import LogFollower, flower_bin, flower_env, stop_on_signals
from fedecho._toml import ConfigFileError
from fedecho.server.config import ServerConfig, load_server_config
from fedecho.server.front import FrontError, front_health
from fedecho.server.submit import (
    EXIT_PAUSED,
    NothingToResume,
    coordinator_runs,
    run_to_resume,
    submit_run,
    submitted_runs,
)
from fedecho.server.superlink import (
    Coordinator,
    SuperLinkError,
    health,
    list_nodes,
    list_runs,
    pid_file,
    read_registry,
    register_sites,
    unregister_site,
    write_connection,
)
from fedecho.storage.store import RunRow

app = typer.Typer(help="Coordinator: run the SuperLink, submit runs, show the federation.", no_args_is_help=True)
SERVER = typer.Option(Path("configs/server.toml"), "--server", "-s", help="Server config (TOML).")
console = Console()


def _fail(e: Exception | str, code: int = 2) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}")
    return typer.Exit(code)


def _load(path: Path) -> ServerConfig:
    try:
        return load_server_config(path)
    except ConfigFileError as e:
        raise _fail(e) from e


def insecure_warning(what: str) -> None:
    """The loud warning --insecure deserves: no encryption, no authentication, loopback only."""
    Console(stderr=True).print(
        Panel(
            f"[bold]--insecure: {what} runs WITHOUT TLS and WITHOUT SuperNode authentication.[/]\n"
            "Model updates travel in clear text and any process that can reach the port can join the federation.\n"
            "Allowed on loopback addresses only, for development. Never use it with patient data.",
            title="[blink]INSECURE[/]",
            style="bold red",
            border_style="red",
        )
    )


def _read_pid(cfg: ServerConfig) -> dict[str, object]:
    try:
        data = json.loads(pid_file(cfg).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _insecure(cfg: ServerConfig) -> bool:
    return bool(_read_pid(cfg).get("insecure", False))


@app.command("start")
def start(
    config: Path = typer.Option(Path("configs/server.toml"), "--config", "-c", help="Server config (TOML)."),
    insecure: bool = typer.Option(
        False, "--insecure", help="No TLS, no node authentication: loopback development only."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not echo the SuperLink's log (it is still written)."),
    ready_timeout: float = typer.Option(60.0, "--ready-timeout", help="Seconds to wait for the SuperLink to come up."),
) -> None:
    """Start the coordinator and register the sites' keys: the SuperLink (TLS, SuperNode authentication,
    persistent state) on the loopback control address, fedecho's ServerApp runner, and the public front
    (nginx) on the listen address, which serves the sites the Fleet API and nothing else.

    Runs in the foreground until Ctrl-C, which stops all three cleanly.

    Example: fedecho server start --config configs/server.toml
    """
    cfg = _load(config)
    if insecure:
        if not cfg.loopback_only:
            raise _fail(
                f"--insecure is refused: {cfg.path} listens on {cfg.listen_host} / advertises {cfg.address}; "
                "both must be loopback (127.0.0.1, ::1, localhost)"
            )
        insecure_warning("the SuperLink")
    old = _read_pid(cfg)
    if _alive(old.get("pid")):
        raise _fail(f"a SuperLink for {cfg.state} is already running (pid {old['pid']})")
    stop_on_signals()
    coordinator = Coordinator(cfg, insecure)
    followers = {name: LogFollower.from_end(coordinator.log(name)) for name in ("superlink", "runner", "front")}

    def echo() -> None:
        for name, follower in followers.items():
            for line in follower.read_new():
                if not quiet:
                    console.print(f"[dim]{name:9} |[/] {escape(line)}", highlight=False)

    code = 0
    try:
        console.print(
            f"starting the coordinator: SuperLink on {cfg.control} (loopback), public front on {cfg.listen} "
            f"(state {cfg.state}, logs {cfg.logs})"
        )
        coordinator.start(ready_timeout)
        pids = coordinator.pids()
        pid_file(cfg).write_text(
            json.dumps({"pid": pids["superlink"], **pids, "insecure": insecure, "control": cfg.control}) + "\n"
        )
        echo()
        if insecure:
            console.print("[yellow]node authentication is off: site keys are not registered[/]")
        else:
            _print_registrations(cfg)
        console.print(
            f"[green]SuperLink ready[/] at {cfg.address} (front {cfg.listen}: Fleet API only; control {cfg.control}, "
            "this machine only). Ctrl-C to stop."
        )
        while (gone := coordinator.exited()) is None:
            echo()
            time.sleep(0.5)
        echo()
        rc = coordinator.procs[gone].returncode
        console.print(f"[red]the coordinator's {gone} exited with code {rc}[/] (log: {coordinator.log(gone)})")
        code = rc or 1
    except KeyboardInterrupt:
        console.print("stopping the coordinator ...")
    except (SuperLinkError, FrontError, OSError) as e:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}")
        code = 1
    finally:
        rc = coordinator.stop()
        echo()
        pid_file(cfg).unlink(missing_ok=True)
    if code:
        raise typer.Exit(code)
    console.print(f"SuperLink stopped (exit code {rc}); state kept in {cfg.state}")


def _print_registrations(cfg: ServerConfig) -> None:
    regs = register_sites(cfg)
    table = Table(title=f"sites (public keys in {cfg.keys})")
    table.add_column("site")
    table.add_column("node id")
    table.add_column("registration")
    for r in regs:
        style = "green" if r.status in ("registered", "already registered") else "red"
        table.add_row(r.name, r.node_id or "?", f"[{style}]{escape(r.status)}[/]")
    if not regs:
        console.print(f"[yellow]no site public keys (*.pub) in {cfg.keys}: no SuperNode can join[/]")
    else:
        console.print(table)


@app.command("register")
def register(server: Path = SERVER) -> None:
    """Register every site key in the keys folder with the running SuperLink, now (no restart needed).

    Only this command and `fedecho server start`, on the coordinator machine, add a site: the public front
    refuses registration from the network.

    Example: fedecho server register --server configs/server.toml
    """
    cfg = _load(server)
    _require_up(cfg)
    if _insecure(cfg):
        raise _fail("the SuperLink runs --insecure: node authentication is off, there are no keys to register")
    _print_registrations(cfg)


@app.command("unregister")
def unregister(
    site: str = typer.Argument(..., help="The site's name (its key's file stem in the keys folder)."),
    server: Path = SERVER,
) -> None:
    """Remove a site from the federation: its node is unregistered and its key leaves the keys folder.

    Example: fedecho server unregister site02 --server configs/server.toml
    """
    cfg = _load(server)
    _require_up(cfg)
    try:
        node_id = unregister_site(cfg, site)
    except SuperLinkError as e:
        raise _fail(e) from e
    console.print(f"site {site} removed (node {node_id or '?'}); its key is in {cfg.keys / 'removed'}")


def _require_up(cfg: ServerConfig) -> None:
    if not health(cfg, _insecure(cfg)):
        raise _fail(f"no SuperLink answers at {cfg.control}: start it with `fedecho server start --config {cfg.path}`")


def _quorum_note(cfg: ServerConfig, run_toml: Path | None) -> str:
    """A line for the operator when a single site outage would pause the run: its quorum (the run file's
    [run].min_sites, else [server].quorum) is not below the number of registered sites ("" when it is)."""
    quorum = cfg.quorum
    if run_toml is not None:
        with contextlib.suppress(OSError, ValueError):  # the run file is checked properly when it is submitted
            run = tomllib.loads(run_toml.read_text()).get("run", {})
            quorum = int(run.get("min_sites", 0) or 0) or quorum
    sites = len(read_registry(cfg))
    if not sites or quorum < sites:
        return ""
    return (
        f"quorum {quorum} with {sites} registered site(s): a round needs every site, so any one site's outage pauses "
        f"this run (it resumes with `fedecho server resume`). Lower [server].quorum in {cfg.path} (or the run file's "
        "[run].min_sites) to let rounds go on without a site."
    )


def _submit(cfg: ServerConfig, run_toml: Path | None, resume: int, detach: bool) -> None:
    _require_up(cfg)
    if note := _quorum_note(cfg, run_toml):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if cfg.trace_messages:
        console.print(f"tracing every message of the run into {cfg.state / 'trace'}", highlight=False)
    try:
        sub = submit_run(
            cfg, run_toml, resume, stream=not detach, echo=lambda line: console.print(escape(line), highlight=False)
        )
    except NothingToResume as e:  # finished meanwhile
        console.print(escape(str(e)), highlight=False)
        return
    except (ConfigFileError, SuperLinkError, OSError, ValueError) as e:
        raise _fail(e) from e
    except KeyboardInterrupt:
        console.print("stopped streaming; the run continues on the SuperLink (`flwr stop` ends it)")
        raise typer.Exit(130) from None
    if not sub.flower_run_id:
        raise _fail(f"the SuperLink did not accept the run (bundle in {sub.app_dir})", sub.returncode or 1)
    if detach:
        console.print(f"submitted Flower run {sub.flower_run_id} (bundle {sub.app_dir})")
        return
    style = "green" if sub.returncode == 0 else "red"
    console.print(
        f"[{style}]Flower run {sub.flower_run_id}: {sub.status or 'unknown status'}[/] (bundle {sub.app_dir})"
    )
    if sub.returncode == EXIT_PAUSED:
        Console(stderr=True).print(f"[yellow]paused:[/] {escape(sub.message)}", highlight=False)
    if sub.returncode:
        raise typer.Exit(sub.returncode)


@app.command("run")
def run(
    config: Path = typer.Option(..., "--config", "-c", exists=True, dir_okay=False, help="Federated run file (TOML)."),
    server: Path = SERVER,
    detach: bool = typer.Option(False, "--detach", help="Submit and return; do not stream the run's log."),
) -> None:
    """Submit a federated run to the SuperLink and stream its progress until it ends.

    Example: fedecho server run --config configs/quickstart.toml --server configs/server.toml
    """
    _submit(_load(server), config, 0, detach)


@app.command("resume")
def resume(
    run_id: int = typer.Argument(
        ..., min=1, help="fedecho run id to resume (`fedecho runs list --server configs/server.toml` lists them)."
    ),
    server: Path = SERVER,
    config: Path | None = typer.Option(
        None, "--config", "-c", exists=True, dir_okay=False, help="Run file (default: the one the store holds)."
    ),
    detach: bool = typer.Option(False, "--detach", help="Submit and return; do not stream the run's log."),
) -> None:
    """Resume an interrupted fedecho run from its last completed round. A finished run has nothing to resume:
    the command says so and submits nothing.

    Example: fedecho server resume 1 --server configs/server.toml
    """
    cfg = _load(server)
    try:
        run_to_resume(cfg, run_id)  # before the SuperLink is asked anything: an unknown or finished run is not sent
    except NothingToResume as e:
        console.print(escape(str(e)), highlight=False)
        return
    except ValueError as e:
        raise _fail(e) from e
    _submit(cfg, config, run_id, detach)


@app.command("status")
def status(server: Path = SERVER) -> None:
    """Show the SuperLink, the sites (registered / online / offline) and the runs, by fedecho's run id (what
    `fedecho runs`, `report` and `server resume` take) and Flower's.

    Example: fedecho server status --server configs/server.toml
    """
    cfg = _load(server)
    info = _read_pid(cfg)
    insecure = bool(info.get("insecure", False))
    up = health(cfg, insecure)
    pid = info.get("pid")
    state = "[green]up[/]" if up else "[red]down[/]"
    front = "[green]up[/]" if front_health(cfg, insecure) else "[red]down[/]"
    console.print(
        f"SuperLink {state} at {cfg.address} (control {cfg.control}, pid {pid if _alive(pid) else '-'}, "
        f"{'[red]INSECURE[/]' if insecure else 'TLS + node auth'}), state {cfg.state}"
    )
    console.print(f"public front {front} on {cfg.listen} (Fleet API only)")
    if not up:
        raise typer.Exit(1)
    try:
        nodes = {str(n.get("node-id")): n for n in list_nodes(cfg)}
        runs = list_runs(cfg)
    except SuperLinkError as e:
        raise _fail(e, 1) from e
    sites = Table(title="sites")
    for col in ("site", "node id", "status", "online since", "offline since"):
        sites.add_column(col)
    named = set()
    for name, entry in sorted(read_registry(cfg).items()):
        node = nodes.get(entry.get("node_id", ""), {})
        named.add(entry.get("node_id", ""))
        sites.add_row(name, entry.get("node_id", "") or "?", *_node_cols(node))
    for node_id, node in nodes.items():
        if node_id not in named:
            sites.add_row("(unnamed)", node_id, *_node_cols(node))
    console.print(sites)
    fedecho_runs, by_flower = _fedecho_runs(cfg)
    table = Table(title="runs")
    for col in ("fedecho run", "name", "status", "Flower run", "Flower status", "elapsed", "started", "finished"):
        table.add_column(col)
    for r in runs:
        st = str(r.get("status", ""))
        style = "green" if st == "finished:completed" else "red" if "failed" in st or "stopped" in st else "yellow"
        ours = fedecho_runs.get(by_flower.get(_int(r.get("run-id")), 0))
        mine = f"[{RUN_STYLE.get(ours.status, 'red')}]{ours.status}[/]" if ours else ""
        table.add_row(
            str(ours.id) if ours else "-", escape(ours.name) if ours else "", mine,
            str(r.get("run-id", "")), f"[{style}]{st}[/]", f"{float(r.get('elapsed', 0.0)):.0f} s",
            str(r.get("running-at", "")), str(r.get("finished-at", "")),
        )  # fmt: skip
    console.print(table)


RUN_STYLE = {"finished": "green", "running": "yellow", "paused": "yellow"}  # else red (failed, stopped)


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def _fedecho_runs(cfg: ServerConfig) -> tuple[dict[int, RunRow], dict[int, int]]:
    """The coordinator's fedecho runs by id, and Flower run id -> fedecho run id: the store's (each run's latest
    Flower run) over what each submission recorded (a resumed run's earlier Flower runs). Empty without a store."""
    rows = {r.id: r for r in coordinator_runs(cfg)}
    by_flower = submitted_runs(cfg)
    by_flower.update({r.flower_run_id: r.id for r in rows.values() if r.flower_run_id})
    return rows, by_flower


PASS_ON = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}


@app.command("flwr", context_settings=PASS_ON)
def flwr_cli(ctx: typer.Context, server: Path = SERVER) -> None:
    """Run Flower's own CLI (`flwr`, the arguments after --) against this coordinator's SuperLink: its loopback
    control address over TLS checked against the federation CA, with telemetry and update checks off.

    It runs in the state folder with FLWR_HOME=STATE/flwr, whose only connection, the default, is the
    coordinator's. Plain `flwr` reads ~/.flwr instead, where Flower's default connection ("local") starts a
    local insecure SuperLink of its own in the background; this command never starts one.

    Examples: fedecho server flwr --server configs/server.toml -- ls;
    fedecho server flwr --server configs/server.toml -- ls --format json
    """
    cfg = _load(server)
    if not ctx.args:
        raise _fail("no flwr command: e.g. `fedecho server flwr --server configs/server.toml -- ls`")
    _require_up(cfg)
    write_connection(cfg, _insecure(cfg))  # as `fedecho server start` wrote it: nothing else in this FLWR_HOME
    try:
        rc = subprocess.run([flower_bin("flwr"), *ctx.args], env=flower_env(cfg.flwr_home), cwd=cfg.state).returncode
    except OSError as e:
        raise _fail(f"cannot run flwr: {e}") from e
    raise typer.Exit(rc)


def _node_cols(node: dict[str, object]) -> tuple[str, str, str]:
    st = str(node.get("status", "not seen"))
    style = {"online": "green", "offline": "red", "registered": "yellow"}.get(st, "dim")
    return f"[{style}]{st}[/]", str(node.get("online-at", "")), str(node.get("offline-at", ""))
