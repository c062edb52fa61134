"""`fedecho client start`: a hospital's SuperNode, from its site.toml."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from fedecho._proc import LogFollower, stop, stop_on_signals
from fedecho._toml import ConfigFileError
from fedecho.cli.server import insecure_warning
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
    stop_on_signals()
    log = cfg.logs / "supernode.log"
    follower = LogFollower.from_end(log)
    try:
        proc = start_supernode(cfg, insecure, log)
    except (SuperNodeError, OSError) as e:
        raise _fail(e) from e
    console.print(f"site {cfg.name}: SuperNode dialling {cfg.superlink} (state {cfg.state}, log {log})")
    console.print(f"policy: {escape(cfg.policy.describe())}", highlight=False)
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


@app.command("approve")
def approve(
    bundle: str = typer.Argument("", help="The app bundle's code hash (64 hex digits), from the refusal."),
    app_dir: Path | None = typer.Option(
        None, "--app", exists=True, file_okay=False, help="Approve the bundle built from this reviewed app folder."
    ),
    site: Path = typer.Option(..., "--site", exists=True, dir_okay=False, help="Site config, e.g. site.toml."),
    revoke: bool = typer.Option(False, "--revoke", help="Withdraw an earlier approval instead."),
    note: str = typer.Option("", "--note", help="Why it was approved (kept with the approval)."),
) -> None:
    """Allow this site to run an app bundle other than the fedecho one it installed (or --revoke that).

    A refused bundle is kept for review in STATE/bundles/refused/HASH.fab (a zip): read its code first.

    Examples: fedecho client approve 3f2a...c9 --site site.toml --note "reviewed by J. Doe";
    fedecho client approve --app reviewed-app/ --site site.toml
    """
    from fedecho.client.audit import SiteLog

    if app_dir is not None:
        from fedecho.client.approval import app_dir_bundle

        try:
            bundle = app_dir_bundle(app_dir).sha256
        except Exception as e:  # Flower's build raises its own error types
            raise _fail(f"{app_dir}: cannot build its bundle: {e}") from e
    digest = bundle.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _fail(f"{bundle!r} is not a bundle hash (64 hex digits)")
    try:
        cfg = load_site_config(site)
    except ConfigFileError as e:
        raise _fail(e) from e
    with SiteLog(cfg.state) as log:
        if revoke:
            done = log.revoke(digest)
            console.print(f"bundle {digest} {'no longer approved' if done else 'was not approved'} at {cfg.name}")
            return
        log.approve(digest, note)
    console.print(f"bundle {digest} approved at site {cfg.name} (takes effect with the next message)")
