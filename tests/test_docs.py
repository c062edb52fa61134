"""The manual (README.md and the MkDocs site under docs/) stays short where it must, names only real commands, carries
no internal labels, and its generated reference pages follow the code. `make test` also builds the site with
`mkdocs build --strict`, so a broken link or a missing page fails there."""

from __future__ import annotations

import importlib.util
import logging
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import click
import pytest
import typer
from typer.testing import CliRunner

from fedecho.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
LABEL = re.compile(r"\b(issue|item)s?\s*#?\d+", re.I)  # internal bookkeeping, meaningless to a reader
NAMES = re.compile(r"[a-z][\w-]*(\|[a-z][\w-]*)*")  # a command name, or names joined by |
LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)(#[^)\s]*)?\)")


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedecho_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _root() -> click.Group:
    command = typer.main.get_command(app)
    assert isinstance(command, click.Group)
    return command


def _command_paths() -> list[tuple[str, ...]]:
    """Every command (not group) of the app, as its words after `fedecho`."""
    out = []

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            out.append(path)

    walk(_root(), ())
    return out


def _mentions() -> Iterator[tuple[str, str]]:
    """(page, text) of every `fedecho ...` the pages show: shell lines of code blocks (continuations joined,
    comments dropped) and inline code. Console output quoted inline (it has ': ' in it) is not a command."""
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(ROOT).as_posix()
        fence, block, prose = None, list[str](), list[str]()  # the open code block's language, its lines
        for line in text.splitlines():
            if line.startswith("```"):
                if fence is None:
                    fence, block = line[3:].strip(), []
                    continue
                if fence in ("bash", "sh", ""):
                    for command in "\n".join(block).replace("\\\n", " ").splitlines():
                        command = re.sub(r"(^|\s)#.*$", "", command).strip()
                        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", command):
                            if part.startswith("fedecho "):
                                yield name, part
                fence = None
            elif fence is not None:
                block.append(line)
            else:
                prose.append(line)
        for span in re.findall(r"`([^`]+)`", " ".join(" ".join(prose).split())):
            if span.startswith("fedecho ") and ": " not in span:
                yield name, span


def _resolve(mention: str) -> list[tuple[str, ...]] | str:
    """The command paths a mention names (`a|b` names both), or why it names none. Words after the last group
    are the command's own (arguments, options, placeholders such as OUT or RUN_ID)."""
    try:
        words = shlex.split(mention)[1:]
    except ValueError as e:
        return f"cannot split: {e}"
    paths: list[tuple[tuple[str, ...], click.Command]] = [((), _root())]
    for word in words:
        if not any(isinstance(c, click.Group) for _, c in paths) or not re.fullmatch(NAMES, word):
            break  # an option, an argument, or a placeholder such as OUT, RUN_ID or ...
        step = []
        for path, command in paths:
            if not isinstance(command, click.Group):
                step.append((path, command))
                continue
            for name in word.split("|"):
                if name not in command.commands:
                    return f"no command {name!r} under 'fedecho {' '.join(path)}'"
                step.append(((*path, name), command.commands[name]))
        paths = step
    if all(not path for path, _ in paths):
        return [()] if words and words[0] in ("--version", "--help") else "names no command"
    return [path for path, _ in paths]


def test_the_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual's detail belongs under docs/"


@pytest.mark.slow
def test_every_fedecho_command_in_the_manual_is_a_real_command_whose_help_runs() -> None:
    mentions = list(_mentions())
    assert len(mentions) > 80, "the pages' commands were not found"
    wrong = {f"{page}: {m}": why for page, m in mentions if isinstance(why := _resolve(m), str)}
    assert not wrong, wrong
    named = {path for _, m in mentions for path in _resolve(m)}  # type: ignore[union-attr]
    runner = CliRunner()
    for path in sorted(named):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output, (path, result.output)
    assert len(named) >= 20, sorted(named)


def test_the_resolver_catches_unknown_commands() -> None:
    assert "no command 'shows'" in str(_resolve("fedecho runs shows 1"))
    assert "no command 'stat'" in str(_resolve("fedecho server start|stat"))
    assert _resolve("fedecho server start|run --config x") == [("server", "start"), ("server", "run")]
    assert _resolve("fedecho report RUN_ID") == [("report",)]


def test_no_internal_labels_in_the_manual() -> None:
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in PAGES}
    texts["docs/reference/key-notes.toml"] = (DOCS / "reference" / "key-notes.toml").read_text()
    found = {name: m.group(0) for name, text in texts.items() if (m := LABEL.search(text))}
    assert not found, found
    assert LABEL.search("as issue 6 item 5 says") and LABEL.search("(items 1 and 2)")


def test_the_readme_links_into_pages_that_exist() -> None:
    targets = LINK.findall(README.read_text())
    assert len(targets) > 10
    missing = [t for t, _ in targets if not (ROOT / t).is_file()]
    assert not missing, missing


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    return _hooks()


def test_the_cli_reference_lists_every_command(hooks: ModuleType) -> None:
    text = hooks.cli_reference()
    headings = set(re.findall(r"^### (fedecho .+)$", text, flags=re.M))
    expected = {" ".join(("fedecho", *path)) for path in _command_paths()}
    assert expected == headings, (expected - headings, headings - expected)
    for group in _root().commands.values():
        if isinstance(group, click.Group):
            assert f"## fedecho {group.name}\n" in text
    assert "`--site-dir`" in text and "`--server-address`" in text  # options come from the app, with their help
    assert not LABEL.search(text)


def test_the_config_references_follow_the_loaders(hooks: ModuleType) -> None:
    server = hooks.server_toml_reference()
    for key in (
        "address",
        "listen",
        "control",
        "quorum",
        "site_wait",
        "max_examples",
        "[server.max_examples_per_site]",
    ):
        assert f"| `{key}` |" in server, key
    site = hooks.site_toml_reference()
    for table in ("site", "superlink", "supernode", "policy", "privacy"):
        assert f"### `[{table}]`" in site, table
    assert "| `min_patients` | integer | `5` | at least 0 |" in site
    run = hooks.run_file_reference()
    for key in ("wire_dtype", "norm_factor", "scaffold", "target_stats", "lora_rank", "mask_ratio", "label_fraction"):
        assert f"| `{key}` |" in run, key
    assert "`fedyogi`" in run and "`proximal_mu`" in run
    assert not LABEL.search(server + site + run)


def test_a_note_for_a_key_the_code_lacks_is_a_warning(
    hooks: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    notes = tmp_path / "key-notes.toml"
    notes.write_text('["server-toml".server]\nadress = "a typo of address"\n')
    monkeypatch.setattr(hooks, "NOTES_FILE", notes)
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.fedecho"):
        hooks.server_toml_reference()
    assert "'adress', which the code does not read" in caplog.text


def test_the_benchmark_table_is_latest_json_without_internal_numbers(hooks: ModuleType) -> None:
    import json

    rows = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())["rows"]
    text = hooks.benchmarks_reference()
    assert text.count("\n| ") == len(rows) + 1  # the header row, then one per result
    assert not re.search(r"^\| \d+\. ", text, flags=re.M)


def test_the_files_and_modules_the_manual_names_exist() -> None:
    """A file or module the pages name in code (`server/config.py`, `fedecho.fl.packing`) is in the tree: a
    moved module must take the manual with it. Names with placeholders (NAME, RUN_ID) and outputs are left out."""
    import importlib

    text = "\n".join(page.read_text() for page in PAGES)
    made = {"bench/results/cuda/", "fedecho.db"}  # written by the benchmarks and the simulation
    paths = set(re.findall(r"`((?:fedecho|server|client|sim|tests|bench|configs)/[\w/.-]*)`", text))
    missing = sorted(p for p in paths - made if not re.search(r"[A-Z]{3,}", p) and not (ROOT / p).exists())
    assert not missing, missing
    unknown = []
    for dotted in sorted(set(re.findall(r"`(fedecho\.[a-z_.]*[a-z_])`", text)) - made):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        for name in parts[i:]:
            obj = getattr(obj, name, None)
        if obj is None:
            unknown.append(dotted)
    assert not unknown, unknown
    assert len(paths) > 20
