"""`fedecho client start`: a hospital's SuperNode, from its site.toml."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from fedecho._proc import LogFollower, stop
from fedecho._toml import ConfigFileError
from fedecho.cli.server import _raise_interrupt, insecure_warning
from fedecho.client.config import load_site_config
from fedecho.client.supernode import SuperNodeError, node_id_in_log, refused_in_log, start_supernode

app = typer.Typer(help="Hospital site: run the SuperNode that trains on this site's data.", no_args_is_help=True)
console = Console()


def _fail(e: Exception | str, code: int = 2) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}")
    return typer.Exit(code)


@app.command("start")
def start(
    site: Path = typer.Option(..., "--site", exists=True, dir_okay=False, help="Site config, e.g. site.toml."),
    insecure: bool = typer.Option(
        False, "--insecure", help="No TLS, no node authentication: loopback development only."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not echo the SuperNode's log (it is still written)."),
) -> None:
    """Start this site's SuperNode: it connects to the SuperLink and trains when a run asks it to.

    Runs in the foreground until Ctrl-C. Patient video never leaves the site; only model updates do.

    Example: fedecho client start --site site.toml
    """
    try:
        cfg = load_site_config(site)
    except ConfigFileError as e:
        raise _fail(e) from e
    if insecure:
        if not cfg.superlink_is_loopback:
            raise _fail(f"--insecure is refused: [superlink].address {cfg.superlink} in {cfg.path} is not loopback")
        insecure_warning(f"site {cfg.name}'s SuperNode")
    if not cfg.data.exists():
        console.print(f"[yellow]warning:[/] {escape(f'{cfg.path}: [site].data = {cfg.data} does not exist (yet)')}")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started from a shell that ignores it
    log = cfg.logs / "supernode.log"
    follower = LogFollower(log)
    if log.exists():
        follower.offset = log.stat().st_size
    try:
        proc = start_supernode(cfg, insecure, log)
    except (SuperNodeError, OSError) as e:
        raise _fail(e) from e
    console.print(f"site {cfg.name}: SuperNode dialling {cfg.superlink} (state {cfg.state}, log {log})")
    connected, code = False, 0
    try:
        while proc.poll() is None:
            for line in follower.read_new():
                if not quiet:
                    console.print(f"[dim]{cfg.name} |[/] {escape(line)}", highlight=False)
            if not connected and (node_id := node_id_in_log(log)) is not None:
                connected = True
                console.print(f"[green]connected[/] as node {node_id}. Ctrl-C to stop.")
            time.sleep(0.5)
        for line in follower.read_new():
            if not quiet:
                console.print(f"[dim]{cfg.name} |[/] {escape(line)}", highlight=False)
        code = proc.returncode or 1
        if refused_in_log(log):
            Console(stderr=True).print(
                f"[red]error:[/] the SuperLink refused site {cfg.name}: its public key "
                f"({cfg.public_key or 'NAME.pub'}) must be in the coordinator's keys folder and registered "
                "(`fedecho server start` registers them)"
            )
        else:
            Console(stderr=True).print(f"[red]error:[/] the SuperNode exited with code {proc.returncode} (log: {log})")
    except KeyboardInterrupt:
        console.print("stopping the SuperNode ...")
    finally:
        stop(proc)
    if code:
        raise typer.Exit(code)
    console.print(f"SuperNode of site {cfg.name} stopped")
