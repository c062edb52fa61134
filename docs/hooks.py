"""MkDocs hooks: the reference pages are generated from the code at every build, so they cannot drift.

A page asks for a generated section with a marker line, `<!-- fedecho:NAME -->`, and `on_page_markdown` puts
the section there:

- `cli`: every command of the typer app (`fedecho.cli.app`): its help, usage and parameters;
- `run-file`: the run-file sections and keys, from the dataclasses `fedecho.train.config` and
  `fedecho.fl.config` parse them into (the comments beside each field are its meaning), and the strategies
  with their parameters from `fedecho.fl.strategies`;
- `server-toml`, `site-toml`: the keys the loaders (`server/config.py`, `client/config.py`,
  `client/policy.py`, `fedecho/privacy/dp_policy.py`) read, recorded while they load the shipped
  `configs/server.toml` and `configs/site.example.toml`, with type, default and bounds as the loader states
  them; the meaning is the shipped file's comment on the key;
- `models`, `model-config`, `tasks`: the model registry (`create_model` names, their configurations and
  sizes, counted on torch's meta device) and the task heads;
- `benchmarks`: the table of `bench/results/latest.json`;
- `layout`: every module of `fedecho/`, `server/`, `client/` and `sim/` with the first sentence of its docstring.

`docs/reference/key-notes.toml` adds a short note to a key; a note for a key the code no longer has, a key
without any meaning, or an unknown marker is a warning, which `mkdocs build --strict` turns into a failure.
Nothing here touches the network.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import inspect
import json
import logging
import re
import textwrap
import tomllib
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NOTES_FILE = Path(__file__).resolve().parent / "reference" / "key-notes.toml"
MARKER = re.compile(r"^<!-- fedecho:([\w-]+) -->$", re.M)
log = logging.getLogger("mkdocs.plugins.fedecho")


def _cell(text: Any) -> str:
    """One Markdown table cell: no line breaks, no raw HTML, no bare pipes."""
    s = " ".join(str(text).split())
    return html.escape(s, quote=False).replace("|", "\\|")


def _code(value: Any) -> str:
    """A value as inline code (TOML-like spelling), for a table cell."""
    if isinstance(value, bool):
        s = "true" if value else "false"
    elif isinstance(value, str):
        s = f'"{value}"'
    elif isinstance(value, tuple | list):
        s = "[" + ", ".join(_code(v).strip("`") for v in value) + "]"
    else:
        s = repr(value)
    return f"`{s.replace('|', '&#124;')}`"


def _meaning(*parts: str) -> str:
    """The code's comment, then the note: sentences, one after the other."""
    parts = tuple(p.strip() for p in parts if p and p.strip())
    return " ".join(p if p.endswith((".", "?", "!")) or i == len(parts) - 1 else f"{p}." for i, p in enumerate(parts))


def _notes() -> dict[str, Any]:
    return tomllib.loads(NOTES_FILE.read_text()) if NOTES_FILE.is_file() else {}


def _take_notes(notes: dict[str, Any], page: str, table: str, keys: set[str]) -> dict[str, str]:
    """The notes of one table, warning about notes for keys the code does not have."""
    mine = notes.get(page, {}).get(table, {})
    for key in sorted(set(mine) - keys):
        log.warning("docs/reference/key-notes.toml: [%s.%s] has a note for %r, which the code does not read", page,
                    table, key)  # fmt: skip
    return mine


# ----------------------------------------------------------------------------------------------- the command line


def _typer_params(group: Any, path: tuple[str, ...] = ("fedecho",)) -> dict[tuple[str, ...], dict[str, str]]:
    """Each command's parameter helps as declared (click's arguments lose theirs)."""
    import typer

    out: dict[tuple[str, ...], dict[str, str]] = {}
    for info in group.registered_commands:
        name = info.name or info.callback.__name__
        helps = {}
        for p in inspect.signature(info.callback).parameters.values():
            if isinstance(p.default, typer.models.ParameterInfo):
                helps[p.name] = p.default.help or ""
        out[(*path, name)] = helps
    for sub in group.registered_groups:
        out.update(_typer_params(sub.typer_instance, (*path, sub.name)))
    return out


def cli_commands() -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, click command) of every command and group of the `fedecho` app, depth first, groups first."""
    import click
    import typer

    from fedecho.cli import app

    def walk(command: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        yield path, command
        if isinstance(command, click.Group):
            for name in command.commands:
                yield from walk(command.commands[name], (*path, name))

    yield from walk(typer.main.get_command(app), ("fedecho",))


def _help_text(text: str) -> str:
    """A docstring as Markdown paragraphs; `Example(s):` lines become code blocks."""
    out = []
    for para in textwrap.dedent(text or "").strip().split("\n\n"):
        flat = " ".join(para.split())
        m = re.match(r"Examples?: (.*)$", flat)
        if m:
            lines = [p.strip() for p in m.group(1).split(";") if p.strip()]
            out.append("Example" + ("s" if len(lines) > 1 else "") + ":\n\n```bash\n" + "\n".join(lines) + "\n```")
        elif flat:
            out.append(html.escape(flat, quote=False))
    return "\n\n".join(out)


def cli_reference() -> str:
    import click

    from fedecho.cli import app

    helps = _typer_params(app)
    parts = []
    for path, command in cli_commands():
        name = " ".join(path)
        ctx = click.Context(command, info_name=name)
        if isinstance(command, click.Group):
            if len(path) == 1:
                continue
            subs = ", ".join(f"[`{name} {s}`](#{'-'.join((*path, s))})" for s in command.commands)
            parts.append(f"## {name}\n\n{_help_text(command.help or '')}\n\nCommands: {subs}.\n")
            continue
        usage = command.get_usage(ctx).replace("Usage: ", "")
        rows = ["| parameter | type | default | meaning |", "|---|---|---|---|"]
        for p in command.params:
            if p.name == "help":
                continue
            if isinstance(p, click.Argument):
                label = f"`{p.human_readable_name}`"
            else:
                label = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
            kind = "flag" if getattr(p, "is_flag", False) else p.type.name.lower().replace("typerpath", "path")
            if p.required:
                default = "required"
            elif p.default is None or (getattr(p, "is_flag", False) and p.default is False):
                default = ""
            else:
                default = _code(str(p.default) if isinstance(p.default, Path) else p.default)
            meaning = getattr(p, "help", None) or helps.get(path, {}).get(p.name or "", "")
            rows.append(f"| {label} | {kind} | {default} | {_cell(meaning)} |")
        parts.append(
            f"### {name}\n\n{_help_text(command.help or '')}\n\n```text\n{usage}\n```\n\n" + "\n".join(rows) + "\n"
        )
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ run files


def field_comments(cls: type) -> dict[str, str]:
    """The comments on each field of a dataclass's source: the block right above it, then the one beside it."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        lines, _ = inspect.getsourcelines(klass)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node in body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            row = node.lineno - 1
            above = []
            i = row - 1
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            beside = ""
            m = re.search(r"\s#\s?(.*)$", lines[node.end_lineno - 1])  # type: ignore[operator]
            if m and "fmt:" not in m.group(1):
                beside = m.group(1).strip()
            text = " ".join(x for x in (" ".join(above), beside) if x)
            if text:
                comments[node.target.id] = text
    return comments


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return "list"
    name = getattr(annotation, "__name__", str(annotation))
    return {"str": "string", "float": "number", "int": "integer", "bool": "boolean"}.get(name, name)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def dataclass_table(
    cls: type, notes: dict[str, str], skip: tuple[str, ...] = (), base: type | None = None, where: str = ""
) -> str:
    """key | type | default | meaning for each field of a section dataclass; with `base`, only the fields that
    `cls` adds or whose default it changes."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    base_fields = {f.name: _default(f) for f in dataclasses.fields(base)} if base else {}
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip or (f.name in base_fields and base_fields[f.name] == _default(f)):
            continue
        meaning = _meaning(comments.get(f.name, ""), notes.get(f.name, ""))
        if not meaning:
            log.warning("%s: the key %r has no meaning (a comment in the code or a note)", where, f.name)
        rows.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {_code(_default(f))} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def run_file_reference() -> str:
    from fedecho.fl.config import DPSection, FedPhaseSection, RunSection
    from fedecho.fl.strategies import CENTRAL_DP, STRATEGIES, central_dp_parameters, strategy_parameters
    from fedecho.models import ModelConfig
    from fedecho.train.config import DataSection, PhaseSection

    notes = _notes()

    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def table(section: str, cls: type, **kw: Any) -> str:
        mine = _take_notes(notes, "run-file", section, names(cls) | names(kw.get("base") or cls))
        return dataclass_table(cls, mine, where=f"run file [{section}]", **kw)

    model_notes = _take_notes(notes, "run-file", "model", names(ModelConfig))
    out = [
        "### `[run]` (federated)\n",
        table("run", RunSection),
        "### `[strategy]` (federated)\n",
        "`name` picks one of Flower's strategies; the other keys are that strategy's own parameters "
        "(Flower's defaults below), or a central-DP wrapper (`central_dp`) with its parameters.\n",
        "| `name` | parameters (Flower's defaults) |",
        "|---|---|",
        *(
            f"| `{s}` | "
            + (", ".join(f"`{k}` = {_code(v).strip('`')}" for k, v in strategy_parameters(s).items()) or "none")
            + " |"
            for s in STRATEGIES
        ),
        "",
        "| `central_dp` | parameters (required where no default) |",
        "|---|---|",
        *(
            f'| `"{c}"` | '
            + ", ".join(
                f"`{k}`" + ("" if v is inspect.Parameter.empty else f" = {_code(v).strip('`')}")
                for k, v in central_dp_parameters(c).items()
            )
            + " |"
            for c in CENTRAL_DP
        ),
        "",
        "### `[dp]` (federated)\n",
        table("dp", DPSection),
        "### `[model]`\n",
        "`name` is a registered model ([model zoo](models.md)); every other key overrides a field of its "
        "configuration (`ModelConfig`):\n",
        dataclass_table(ModelConfig, model_notes, skip=("name",), where="run file [model]"),
        "### `[data]`\n",
        table("data", DataSection),
        "### `[pretrain]`, `[finetune]`\n",
        "The optimisation settings of each phase, for local runs (`fedecho train`) and federated ones:\n",
        table("phase", PhaseSection),
        "A federated run file's phases add these keys, or change their defaults "
        "(`warmup_epochs` is refused there: use `warmup_rounds`):\n",
        table("federated-phase", FedPhaseSection, base=PhaseSection),
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- server.toml, site.toml


_GETTERS = ("text", "integer", "number", "integers", "flag", "choice", "optional_choice", "location",
            "optional_location", "_get")  # fmt: skip


@contextmanager
def _recording() -> Iterator[list[dict[str, Any]]]:
    """Record every key the config loaders read through `fedecho._toml.Table` (the outermost getter of each
    read): a table rejects every key it did not read, so these are exactly the keys a file may have."""
    from fedecho._toml import _MISSING, Table

    reads: list[dict[str, Any]] = []
    depth = [0]
    saved = {name: getattr(Table, name) for name in _GETTERS}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def getter(self: Table, key: str, *args: Any, **kw: Any) -> Any:
            if depth[0] == 0:
                bound = inspect.signature(fn).bind(self, key, *args, **kw)
                bound.apply_defaults()
                a = dict(bound.arguments)
                default = a.get("default")  # optional_* and integers take none: the key may be absent
                reads.append({"table": self.name, "key": key, "getter": name, "required": default is _MISSING,
                              "default": None if default is _MISSING else default,
                              "choices": a.get("choices"), "minimum": a.get("minimum"),
                              "positive": a.get("positive", False)})  # fmt: skip
            depth[0] += 1
            try:
                return fn(self, key, *args, **kw)
            finally:
                depth[0] -= 1

        return getter

    for name, fn in saved.items():
        setattr(Table, name, wrap(name, fn))
    try:
        yield reads
    finally:
        for name, fn in saved.items():
            setattr(Table, name, fn)


_KINDS = {"text": "string", "integer": "integer", "number": "number", "integers": "table of integers",
          "flag": "boolean", "choice": "string", "optional_choice": "string", "location": "path",
          "optional_location": "path", "_get": "list of names"}  # fmt: skip


def shipped_comments(path: Path, known: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The comments on each key of an annotated config file: the block right above the key (or above its
    commented-out example line) and the one beside it, with its aligned continuation lines."""
    out: dict[tuple[str, str], str] = {}
    table, block, last = "", list[str](), None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        header = re.match(r"^(#\s*)?\[([\w.]+)\]$", line)
        entry = re.match(r"^(#\s*)?(\w+)\s*=\s*(\"[^\"]*\"|\[[^\]]*\]|[^#\s]+)\s*(#\s?(.*))?$", line)
        if header and not header.group(1):  # a table
            table, block, last = header.group(2), [], None
        elif header and tuple(header.group(2).rsplit(".", 1)) in known:  # a commented-out sub-table
            last = tuple(header.group(2).rsplit(".", 1))  # type: ignore[assignment]
            out[last], block = " ".join(block), []  # type: ignore[index]
        elif entry and (table, entry.group(2)) in known:  # a key, or its commented-out example
            last = (table, entry.group(2))
            out[last] = " ".join(x for x in (" ".join(block), entry.group(5) or "") if x) or out.get(last, "")
            block = []
        elif line.startswith("#") and raw.startswith(" ") and last is not None:  # a continuation beside a key
            out[last] = f"{out[last]} {line.lstrip('#').strip()}".strip()
        elif line.startswith("#"):
            block.append(line.lstrip("#").strip())
            last = None
        else:
            block, last = [], None
    return out


def _constraint(r: dict[str, Any]) -> str:
    if r["choices"]:
        return "one of " + ", ".join(f'`"{c}"`' for c in r["choices"])
    if r["minimum"] is not None:
        return f"at least {r['minimum']}"
    if r["positive"]:
        return "positive"
    return ""


def toml_reference(page: str, load: Callable[[Path], Any], shipped: Path, fallback: type) -> str:
    """The key tables of one deployment config, from what its loader reads while loading the shipped file; a key
    the shipped file does not comment takes the comment of the loader's dataclass field of that name."""
    with _recording() as reads:
        load(shipped)
    known = {(r["table"], r["key"]) for r in reads}
    comments = shipped_comments(shipped, known)
    notes = _notes()
    tables: dict[str, list[dict[str, Any]]] = {}
    for r in reads:
        if r["key"] not in {x["key"] for x in tables.get(r["table"], [])}:
            tables.setdefault(r["table"], []).append(r)
    for extra_table in set(notes.get(page, {})) - set(tables):
        log.warning("docs/reference/key-notes.toml: [%s.%s] names a table the loader does not read", page,
                    extra_table)  # fmt: skip
    parts = []
    for name, rows in tables.items():
        mine = _take_notes(notes, page, name, {r["key"] for r in rows})
        lines = [f"### `[{name}]`\n", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for r in rows:
            key = r["key"]
            kind = _KINDS[r["getter"]]
            if r["getter"] == "integers":
                key, kind = f"[{name}.{key}]", "`NAME = integer`"
            default = "required" if r["required"] else ("" if r["default"] in (None, "") else _code(r["default"]))
            if r["default"] == "" and not r["required"]:
                default = '`""`'
            said = comments.get((name, r["key"])) or field_comments(fallback).get(r["key"], "")
            meaning = _meaning(said, mine.get(r["key"], ""))
            if not meaning:
                log.warning("%s: [%s].%s has no comment in %s and no note", page, name, key, shipped.name)
            lines.append(f"| `{key}` | {kind} | {default} | {_constraint(r)} | {_cell(meaning)} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def server_toml_reference() -> str:
    from fedecho.server.config import ServerConfig, load_server_config

    return toml_reference("server-toml", load_server_config, ROOT / "configs" / "server.toml", ServerConfig)


def site_toml_reference() -> str:
    from fedecho.client.config import SiteConfig, load_site_config

    return toml_reference("site-toml", load_site_config, ROOT / "configs" / "site.example.toml", SiteConfig)


# ----------------------------------------------------------------------------------------------------- the models


def models_reference() -> str:
    import torch

    from fedecho.models import ModelConfig, create_model, list_models, model_config

    base = {f.name: _default(f) for f in dataclasses.fields(ModelConfig)}
    rows = [
        "| name | input (frames x px) | encoder (width/depth/heads) | decoder | tokens | encoder params "
        "| STF-Net params (EF head) | what it is |",
        "|---|---|---|---|---|---|---|---|",
    ]
    configs = []
    for name in list_models():
        with torch.device("meta"):  # sizes only: no memory, no initialisation time
            m = create_model(name, tasks=["ef"])
        c = m.cfg
        count = sum(p.numel() for p in m.encoder.parameters()) / 1e6
        fusion = sum(p.numel() for p in m.fusion.parameters()) / 1e6 if m.fusion is not None else 0.0
        doc = inspect.getdoc(getattr(__import__("fedecho.models.echo_vision_fm", fromlist=[name]), name)) or ""
        rows.append(
            f"| `{name}` | {c.num_frames} x {c.img_size} | {c.embed_dim}/{c.depth}/{c.num_heads} "
            f"| {c.decoder_dim}/{c.decoder_depth}/{c.decoder_heads} | {c.num_tokens} | {count:.1f} M "
            f"| {fusion:.1f} M | {_cell(doc)} |"
        )
        changed = {k: v for k, v in dataclasses.asdict(model_config(name)).items() if base.get(k) != v}
        configs.append(f"| `{name}` | " + ", ".join(f"`{k} = {_code(v).strip('`')}`" for k, v in changed.items()))
    return (
        "\n".join(rows) + "\n\nEach name's configuration, as the fields it sets on `ModelConfig`'s defaults "
        "([`[model]` keys](run-files.md#model)):\n\n| name | configuration |\n|---|---|\n"
        + " |\n".join(configs)
        + " |\n"
    )


def tasks_reference() -> str:
    from fedecho.models import TASKS

    rows = ["| task | kind | outputs |", "|---|---|---|"]
    rows += [f"| `{t.name}` | {t.kind} | {t.outputs} |" for t in TASKS.values()]
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------------ benchmarks


def _value(value: Any, unit: str) -> str:
    if isinstance(value, float) and unit == "x" and abs(value) < 0.01:
        return f"{value:.5f}x"
    return f"{value}x" if unit == "x" else f"{value} {unit}"


def benchmarks_reference() -> str:
    data = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    m = data.get("machine", {})
    head = (
        f"Commit `{data.get('commit')}`, written {data.get('written')}; {m.get('cpus')} CPU cores, torch "
        f"{m.get('torch')}, CUDA {m.get('cuda') or 'none'}.\n\n"
    )
    rows = ["| group | measure | value | target | met | measured |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        group = re.sub(r"^\d+\.\s*", "", r["item"])  # the table's groups, without their internal numbers
        met = "" if r.get("met") is None else ("yes" if r["met"] else "**no**")
        rows.append(
            f"| {_cell(group)} | {_cell(r['measure'])} | {_cell(_value(r['value'], r['unit']))} "
            f"| {_cell(r.get('target') or '')} | {met} | {_cell(r.get('measured', ''))} |"
        )
    return head + "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------------ the layout

PACKAGES = (("fedecho", "fedecho"), ("server", "fedecho.server"), ("client", "fedecho.client"), ("sim", "fedecho.sim"))


def _summary(path: Path) -> str:
    """The first sentence of a module's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=[.:;])\s", first, maxsplit=1)[0].rstrip(".:;")


def layout_reference() -> str:
    """Every module of the installed packages, folder by folder, with the first sentence of its docstring."""
    parts = []
    for folder, package in PACKAGES:
        for directory in sorted({p.parent for p in (ROOT / folder).rglob("*.py")}):
            if "migrations" in directory.parts and directory.name not in ("migrations",):
                continue
            rel = directory.relative_to(ROOT).as_posix()
            dotted = ".".join([package, *directory.relative_to(ROOT / folder).parts])
            rows = [f"### `{rel}/` (`{dotted}`)\n", "| module | what |", "|---|---|"]
            for module in sorted(directory.glob("*.py")):
                rows.append(f"| `{module.name}` | {_cell(_summary(module))} |")
            parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


GENERATORS: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "run-file": run_file_reference,
    "server-toml": server_toml_reference,
    "site-toml": site_toml_reference,
    "models": models_reference,
    "tasks": tasks_reference,
    "benchmarks": benchmarks_reference,
    "layout": layout_reference,
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Put each generated section where its marker is."""

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in GENERATORS:
            log.warning("%s: unknown generated section %r (known: %s)", page.file.src_path, name, ", ".join(GENERATORS))
            return ""
        return GENERATORS[name]()

    return MARKER.sub(fill, markdown)
