"""Real Flower processes on loopback for the deployment tests: the harness lives in `fedecho.loopback`
(shared with bench/federation.py); this module keeps the tests' import path."""

from fedecho.loopback import (
    Deployment,
    free_port,
    kill_group,
    make_deployment,
    running,
    write_server_toml,
    write_site_toml,
)

__all__ = [
    "Deployment",
    "free_port",
    "kill_group",
    "make_deployment",
    "running",
    "write_server_toml",
    "write_site_toml",
]
