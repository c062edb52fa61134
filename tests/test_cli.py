"""The CLI: --help everywhere, and `data inspect` reading phantom data back."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedecho.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        [], ["synth"], ["data"], ["data", "inspect"], ["model"], ["model", "list"], ["model", "import"],
        ["train"], ["train", "pretrain"], ["train", "finetune"], ["train", "evaluate"], ["predict"],
    ],
)  # fmt: skip
def test_help_on_every_command(args: list[str]) -> None:
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


@pytest.mark.slow
def test_inspect_multisite_phantom(dicom_phantom: Path, cache_dir: Path) -> None:
    res = runner.invoke(app, ["data", "inspect", str(dicom_phantom), "--cache", str(cache_dir)], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "site01 (dicom)" in res.output and "site02 (dicom)" in res.output
    assert "EF %" in res.output and "(3, 16, 112, 112)" in res.output


def test_inspect_reports_problems_and_bad_paths(echonet_phantom: Path, tmp_path: Path, cache_dir: Path) -> None:
    res = runner.invoke(app, ["data", "inspect", str(echonet_phantom), "--cache", str(cache_dir), "--period", "2"])
    assert res.exit_code == 0 and "skipped: none" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["data", "inspect", str(tmp_path / "empty")], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "neither an echo source" in res.output


@pytest.mark.slow
def test_model_list_shows_the_zoo() -> None:
    res = runner.invoke(app, ["model", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert all(n in res.output for n in ("echo_vit_tiny", "echo_vit_small", "echo_vit_base", "86.2 M"))
