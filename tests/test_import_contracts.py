"""Role boundaries as a checked contract: import-linter's contracts in pyproject.toml, on the package as it
installs. The roles live in top-level folders (server/, client/, sim/) and only the installed layout puts
them under `fedecho`, so the package is installed into a temporary folder first (no dependencies, seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


SKIP = {".git", ".venv", "build", "fedecho.egg-info", "demo-output", "runs", "bench", "site", "docs", "tests"}


def _outside_the_package(folder: str, names: list[str]) -> set[str]:
    """Top-level folders the package build does not read (the checkout's work folders, its history)."""
    return SKIP & set(names) if Path(folder) == ROOT else set()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("installed")
    build = tmp_path_factory.mktemp("build")
    shutil.copytree(ROOT, build / "src", ignore=_outside_the_package)  # setuptools writes build/ into its source
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(build / "src")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return target


def _lint(installed: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(
        [LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True, text=True, timeout=300, env=env, cwd=installed,
    )  # fmt: skip


def test_the_import_contracts_hold(installed: Path) -> None:
    result = _lint(installed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout, result.stdout


def test_a_coordinator_importing_site_code_breaks_them(installed: Path, tmp_path: Path) -> None:
    """The check bites: the import the coordinator once had (the site's error codes) is a broken contract."""
    copy = tmp_path / "copy"
    shutil.copytree(installed, copy)
    rounds = copy / "fedecho" / "server" / "rounds.py"
    rounds.write_text(rounds.read_text() + "\nfrom fedecho.client.local import site_train  # noqa\n")
    core = copy / "fedecho" / "privacy" / "dp_policy.py"
    core.write_text(core.read_text() + "\nfrom fedecho.train.engine import Trainer  # noqa\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "The coordinator and the sites never import each other BROKEN" in result.stdout, result.stdout
    assert "Core layers: federation over training over data over privacy over storage BROKEN" in result.stdout
