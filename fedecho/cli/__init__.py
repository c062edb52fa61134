"""The `fedecho` command line: one typer app, one module per command group."""

from __future__ import annotations

import typer

import fedecho
from fedecho.cli import audit as audit_cli
from fedecho.cli import certs as certs_cli
from fedecho.cli import client as client_cli
from fedecho.cli import data as data_cli
from fedecho.cli import model as model_cli
from fedecho.cli import predict as predict_cli
from fedecho.cli import report as report_cli
from fedecho.cli import runs as runs_cli
from fedecho.cli import server as server_cli
from fedecho.cli import sim as sim_cli
from fedecho.cli import synth as synth_cli
from fedecho.cli import train as train_cli

app = typer.Typer(
    name="fedecho",
    help="Federated echocardiography video foundation models: phantom data, data sources, training, federation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("synth")(synth_cli.synth)
app.add_typer(data_cli.app, name="data")
app.add_typer(model_cli.app, name="model")
app.add_typer(train_cli.app, name="train")
app.command("predict")(predict_cli.predict)
app.command("sim")(sim_cli.sim)
app.add_typer(certs_cli.app, name="certs")
app.add_typer(server_cli.app, name="server")
app.add_typer(client_cli.app, name="client")
app.add_typer(runs_cli.app, name="runs")
app.command("report")(report_cli.report)
app.command("audit")(audit_cli.audit)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedecho {fedecho.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """fedecho: train one echo foundation model across hospitals without moving patient video."""


def main() -> None:
    app()
