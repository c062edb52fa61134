"""The CLI answers at once: commands that do not train import no torch, timm, Flower or Ray.

Each command runs in a fresh interpreter (as `fedecho ...` does), which then reports every module it
imported; the heavy libraries are imported only by the commands that need them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.main import get_command

from builders import cli_in_fresh_interpreter
from fedecho.cli import app

HEAVY = ("torch", "timm", "flwr", "ray", "matplotlib", "cv2", "av", "pydicom", "opacus", "peft")


def _imported(*args: str) -> set[str]:
    """Top-level packages a command imported."""
    return {m.split(".")[0] for m in cli_in_fresh_interpreter(*args)[1]}


def _commands() -> list[list[str]]:
    """Every command path of the app, groups included: ["data", "add"], ["sim"], ..."""
    paths: list[list[str]] = []

    def walk(cmd: object, prefix: list[str]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(get_command(app), [])
    return paths


@pytest.mark.slow
def test_help_of_every_command_imports_nothing_heavy() -> None:
    commands = _commands()
    assert ["data", "add"] in commands and ["runs", "list"] in commands and ["sim"] in commands
    heavy = {" ".join(c): sorted(set(HEAVY) & _imported(*c, "--help")) for c in [[], *commands]}
    assert not {c: h for c, h in heavy.items() if h}, heavy


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "list", "--state", "{tmp}"],
        ["data", "report", "--site-dir", "{tmp}"],
        ["audit", "--state", "{tmp}"],
        ["certs", "init", "{tmp}/certs", "--server-address", "127.0.0.1:9093"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_commands_that_do_not_train_import_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    imported = _imported(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert not set(HEAVY) & imported, sorted(set(HEAVY) & imported)
    assert "fedecho" in imported


@pytest.mark.slow
def test_a_training_command_still_imports_what_it_needs(tmp_path: Path) -> None:
    """The measure is real: `model list` builds models, so torch and timm are imported there."""
    assert {"torch", "timm"} <= _imported("model", "list")
