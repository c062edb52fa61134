"""The documented commands are real: every `fedecho ...` example in the code blocks and command tables of the README
and the manual (docs/), and in the CLI's own help texts, names a command that exists with options it has, and every
config file they name (configs/*.toml) is in the repository, or made by an earlier step of the manual (`cp`,
`sed ... >`)."""

from __future__ import annotations

import inspect
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer

from fedecho.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MANUAL = [README, *sorted((ROOT / "docs").rglob("*.md"))]  # the README and the user manual's pages
CONFIG = re.compile(r"(?<![\w./-])configs/[\w.-]+\.toml\b")


def _root_command() -> click.Group:
    command = typer.main.get_command(app)
    assert isinstance(command, click.Group)
    return command


def _code_lines() -> Iterator[str]:
    """The README's and the manual's shell lines: code blocks (continuations joined, comments dropped), then the
    example column of the command tables."""
    text = "\n".join(page.read_text() for page in MANUAL)
    fence: str | None = None  # the open code block's language
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, lines = line[3:].strip(), []
                continue
            if fence in ("bash", "sh", ""):
                for command in "\n".join(lines).replace("\\\n", " ").splitlines():
                    command = re.sub(r"(^|\s)#.*$", "", command).strip()
                    if command:
                        yield command
            fence = None
        elif fence is not None:
            lines.append(line)
    for row in re.findall(r"^\| `fedecho [^\n]*$", text, flags=re.M):
        cells = re.split(r"(?<!\\) \| ", row)
        if len(cells) > 1:
            yield cells[1].strip("` ")


def _shell(line: str) -> list[list[str]]:
    """One shell line as the argv of each of its commands (split at ;, &&, ||, |), redirections kept as tokens."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [argv for argv in commands if argv]


def _commands(line: str) -> list[list[str]]:
    """The `fedecho ...` commands of one shell line, as argv lists."""
    return [argv for argv in _shell(line) if argv[0] == "fedecho"]


def _helps(command: click.Command, path: tuple[str, ...] = ("fedecho",)) -> Iterator[tuple[str, str]]:
    """(command path, text) for every help text and path-like default in the CLI."""
    name = " ".join(path)
    yield name, command.help or ""
    for param in command.params:  # options, and typer's arguments, have help texts
        yield name, getattr(param, "help", None) or ""
        if isinstance(param.default, Path):
            yield name, str(param.default)
    if isinstance(command, click.Group):
        for sub_name, sub in command.commands.items():
            yield from _helps(sub, (*path, sub_name))


def _argument_helps(group: typer.Typer, path: tuple[str, ...] = ("fedecho",)) -> Iterator[tuple[str, str]]:
    """(command path, help) of every typer parameter as declared: the click objects lose an argument's help with
    some click versions, and a help text nobody sees is still checked."""
    for info in group.registered_commands:
        assert info.callback is not None
        name = " ".join((*path, info.name or info.callback.__name__))
        for param in inspect.signature(info.callback).parameters.values():
            if isinstance(param.default, typer.models.ParameterInfo):
                yield name, param.default.help or ""
    for sub in group.registered_groups:
        assert sub.typer_instance is not None and sub.name
        yield from _argument_helps(sub.typer_instance, (*path, sub.name))


def _help_examples(text: str) -> Iterator[tuple[str, bool]]:
    """The commands a help text cites, each with whether it is an example (a whole command line): its
    `Example(s):` (split at ';', a trailing remark in parentheses dropped), and every `fedecho ...` in
    backquotes (which may name a group, as in "see `fedecho runs`")."""
    flat = " ".join(text.split())
    for m in re.finditer(r"Examples?: (.*?)$", flat):
        for part in m.group(1).split(";"):
            part = re.sub(r"\s+\(.*$", "", part).strip()
            if part.startswith("fedecho "):
                yield part, True
    yield from ((m, False) for m in re.findall(r"`(fedecho [^`]*)`", flat) if "{" not in m)


def _check(argv: list[str], group_ok: bool = False) -> str | None:
    """None if argv is a fedecho command line this CLI accepts by name and options, else what is wrong."""
    command: click.Command = _root_command()
    args = argv[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.commands.get(args[0])
        if sub is None:
            return f"no command {args[0]!r} under {command.name!r}"
        command, args = sub, args[1:]
    if isinstance(command, click.Group):
        return None if group_ok and not args else f"{' '.join(argv)!r} names a command group, not a command"
    names = {"--help"} | {
        o for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)
    }
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-") and not re.fullmatch(r"-\d.*", arg) and arg.split("=")[0] not in names:
            return f"{command.name}: no option {arg.split('=')[0]!r}"
    return None


def _readme_made() -> set[str]:
    """Config files the README's own steps create (`cp SRC DEST`, `... > DEST`)."""
    made = set()
    for argv in (argv for line in _code_lines() for argv in _shell(line)):
        if argv[0] == "cp" and len(argv) >= 3:
            made.add(argv[-1])
        if ">" in argv[:-1]:
            made.add(argv[argv.index(">") + 1])
    return made


def test_the_readme_commands_exist_with_their_options() -> None:
    lines = list(_code_lines())
    commands = [argv for line in lines for argv in _commands(line)]
    assert len(commands) > 50, "the README's code blocks were not found"
    wrong = {" ".join(argv): why for argv in commands if (why := _check(argv))}
    assert not wrong, wrong


def test_the_help_examples_exist_with_their_options() -> None:
    texts = [*_helps(_root_command()), *_argument_helps(app)]
    cited = [(where, *ex) for where, text in texts for ex in _help_examples(text)]
    assert sum(whole for _, _, whole in cited) > 20, cited
    wrong = {f"{where}: {ex}": why for where, ex, whole in cited if (why := _check(shlex.split(ex), not whole))}
    assert not wrong, wrong


def test_every_config_path_named_in_the_readme_and_the_help_exists() -> None:
    made = _readme_made()
    assert {"configs/site01.toml", "configs/site02.toml"} <= made, made  # the walk-through makes the sites'
    named = {m for line in _code_lines() for m in CONFIG.findall(line)}
    named |= {m for _, text in [*_helps(_root_command()), *_argument_helps(app)] for m in CONFIG.findall(text)}
    assert {"configs/server.toml", "configs/quickstart.toml"} <= named, named
    missing = sorted(p for p in named if not (ROOT / p).is_file() and p not in made)
    assert not missing, missing
    for made_from in ("configs/site.example.toml",):  # what the README copies must exist itself
        assert (ROOT / made_from).is_file()


@pytest.mark.parametrize(
    "argv, why",
    [
        (["fedecho", "runs", "shows", "1"], "no command 'shows'"),
        (["fedecho", "runs", "list", "--servers", "x"], "no option '--servers'"),
        (["fedecho", "server"], "command group"),
    ],
)
def test_the_check_catches_wrong_commands(argv: list[str], why: str) -> None:
    assert why in (_check(argv) or "")
