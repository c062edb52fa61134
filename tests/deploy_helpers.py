"""Real Flower processes on loopback for the deployment tests: the harness lives in `fedecho.sim.loopback`
(shared with bench/federation.py); this module keeps the tests' import path."""

from pathlib import Path

from fedecho.sim.loopback import (
    Deployment,
    free_port,
    kill_group,
    make_deployment,
    running,
    write_server_toml,
    write_site_toml,
)

MARKER_APP = '''
"""Flower components that are not fedecho's: the ServerApp writes a file wherever it runs."""
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    Path({marker!r}).write_text("code not fedecho's ran on the coordinator")
'''


def marker_app(marker: Path) -> str:
    """The source of a module whose ServerApp, if it ever runs, writes `marker`."""
    return MARKER_APP.format(marker=str(marker))


__all__ = [
    "MARKER_APP",
    "Deployment",
    "free_port",
    "kill_group",
    "make_deployment",
    "marker_app",
    "running",
    "write_server_toml",
    "write_site_toml",
]
