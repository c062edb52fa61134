"""`fedecho certs init|site`: the federation CA, the SuperLink's TLS certificate, the sites' key pairs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedecho.security.certs import CertError, create_site_keys, init_certs

app = typer.Typer(
    help="Create the federation's CA, the SuperLink TLS certificate and site key pairs.", no_args_is_help=True
)
FORCE = typer.Option(False, "--force", help="Replace existing files (the old keys stop working).")


def _fail(e: Exception) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {e}")
    return typer.Exit(2)


@app.command("init")
def init(
    folder: Path = typer.Argument(..., help="Folder for ca.pem, ca.key, server.pem, server.key (e.g. certs)."),
    server_address: str = typer.Option(
        ..., "--server-address", help="HOST[:PORT] the sites dial (DNS name or IP); goes into the certificate SANs."
    ),
    san: list[str] = typer.Option([], "--san", help="Another name or IP the SuperLink is reachable at (repeatable)."),
    days: int = typer.Option(825, "--days", min=1, help="Validity of the server certificate in days."),
    force: bool = FORCE,
) -> None:
    """Create a CA and the SuperLink's TLS certificate (SANs: the address, --san names, loopback).

    Example: fedecho certs init certs --server-address superlink.hospital-net.org:9093
    """
    try:
        made = init_certs(folder, server_address, extra_sans=tuple(san), server_days=days, overwrite=force)
    except (CertError, OSError) as e:
        raise _fail(e) from e
    table = Table(title=f"certificates in {made.folder}")
    table.add_column("file")
    table.add_column("what")
    table.add_column("goes to")
    table.add_row(str(made.ca_cert), "CA certificate", "every site ([superlink].ca) and the server")
    table.add_row(str(made.ca_key), "CA private key (0600)", "[bold]nowhere[/]: keep it offline")
    table.add_row(str(made.server_cert), "SuperLink certificate", "the server")
    table.add_row(str(made.server_key), "SuperLink private key (0600)", "the server only")
    console = Console()
    console.print(table)
    console.print(f"SANs: {', '.join(made.sans)}")
    console.print(f"check: openssl verify -CAfile {made.ca_cert} {made.server_cert}")


@app.command("site")
def site(
    folder: Path = typer.Argument(..., help="Folder for NAME.key and NAME.pub (e.g. keys)."),
    name: str = typer.Argument(..., help="Site name, e.g. site01 (letters, digits, '.', '_', '-')."),
    force: bool = FORCE,
) -> None:
    """Create a site's node-authentication key pair (EC P-384, OpenSSH format).

    The private key (NAME.key, 0600) stays at the site; the public key (NAME.pub) goes into the
    coordinator's keys folder, which `fedecho server start` registers with the SuperLink.

    Example: fedecho certs site keys site01
    """
    try:
        keys = create_site_keys(folder, name, overwrite=force)
    except (CertError, OSError) as e:
        raise _fail(e) from e
    console = Console()
    console.print(f"[green]private key[/] {keys.private_key} (0600): stays at site {name}")
    console.print(f"[green]public key[/]  {keys.public_key}: copy into the server's keys folder")
