"""`fedecho client start`: a hospital's SuperNode, from its site.toml."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from fedecho._proc import stop, stop_on_signals
from fedecho._toml import ConfigFileError
from fedecho.cli.server import insecure_warning
from fedecho.client.config import SiteConfig, load_site_config, settings_in_force
from fedecho.client.supernode import (
    SuperNodeError,
    SuperNodeWatch,
    check_site_files,
    claim_site,
    start_supernode,
    wait_for_coordinator,
)

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

    Runs in the foreground until Ctrl-C (or SIGTERM), which stops every process it started. Patient video never
    leaves the site; only model updates do. A second site on this machine may not share this one's state or cache
    folder, private key or SuperNode port.

    Example: fedecho client start --site site.toml
    """
    from fedecho.client.audit import audit_start

    try:
        cfg = load_site_config(site)
    except ConfigFileError as e:
        raise _fail(e) from e
    if insecure and not cfg.superlink_is_loopback:
        raise _fail(f"--insecure is refused: [superlink].address {cfg.superlink} in {cfg.path} is not loopback")
    try:
        settings = settings_in_force(cfg)  # checks the data folder too: missing or empty is an error here
    except ConfigFileError as e:
        raise _fail(e) from e
    if insecure:
        insecure_warning(f"site {cfg.name}'s SuperNode")
    console.print(f"site {cfg.name}: settings in force", highlight=False)
    for line in settings:
        console.print(f"  {escape(line)}", highlight=False)
    stop_on_signals()
    log = cfg.logs / "supernode.log"
    try:
        if not insecure:
            check_site_files(cfg)
        with claim_site(cfg, insecure) as claim:  # before anything is written: a clashing second site stops here
            audit_start(cfg, settings)  # what was in force when the site joined, for its auditors
            wait_for_coordinator(cfg, insecure, lambda text: console.print(f"[yellow]{escape(text)}[/]"))
            proc = start_supernode(cfg, insecure, log, claim)  # the launcher holds the site's locks from here on
    except (SuperNodeError, OSError) as e:
        raise _fail(e) from e
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    code = _supervise(cfg, proc, log, insecure, quiet)
    if code:
        raise typer.Exit(code)
    console.print(f"SuperNode of site {cfg.name} stopped")


def _supervise(cfg: SiteConfig, proc: subprocess.Popen[bytes], log: Path, insecure: bool, quiet: bool) -> int:
    """Echo the SuperNode's log of this start, say what happened in it, until it exits or Ctrl-C/SIGTERM; then
    stop it and everything it started. Returns the exit code for `fedecho client start`."""
    err = Console(stderr=True)
    watch = SuperNodeWatch(cfg, log, insecure)
    try:
        console.print(f"site {cfg.name}: SuperNode dialling {cfg.superlink} (state {cfg.state}, log {log})")
        while True:
            exited = proc.poll() is not None
            for event in watch.poll():
                if event.kind == "line" and not quiet:
                    console.print(f"[dim]{cfg.name} |[/] {escape(event.text)}", highlight=False)
                elif event.kind == "connected":
                    console.print(f"[green]connected[/] as node {event.node_id}. Ctrl-C to stop.")
                elif event.kind in ("released", "waiting", "reached"):
                    console.print(f"[yellow]{escape(event.text)}[/]", highlight=False)
                elif event.kind == "refused":
                    err.print(f"[red]error:[/] {escape(event.text)}", highlight=False)
            if exited:
                break
            time.sleep(0.5)
        if watch.refusal is None:
            how = f"was killed (signal {-proc.returncode})" if proc.returncode < 0 else f"exited ({proc.returncode})"
            err.print(f"[red]error:[/] the SuperNode of site {cfg.name} {how} (log: {log})")
        return proc.returncode if proc.returncode > 0 else 1
    except KeyboardInterrupt:
        console.print("stopping the SuperNode ...")
        return 0
    finally:
        stop(proc)


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
