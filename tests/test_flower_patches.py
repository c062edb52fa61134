"""fedecho.fl.flower_patches: every change to Flower's internals in one module, checked against the pinned flwr.

The check runs on the installed Flower; each patch is applied to Flower's real modules (restored after each
test) and shown to change what it says, once however often it is applied. Where a patched function would talk
to a SuperNode (the ClientApp runner's pull and push), a recording stand-in takes its place: the real-process
tests (test_deploy.py, test_code_approval.py) run them against real Flower processes. The last tests scan the
source so that no module outside flower_patches assigns into Flower.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flwr
import httpx
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.proto.fleet_pb2 import ActivateNodeRequest
from flwr.supercore import heartbeat
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import http_grid
from flwr.supernode import fleet_http_connection as fhc
from flwr.supernode import start_client_internal as sci
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.runtime import run_clientapp as rc

from fedecho.fl import flower_patches as fp

ROOT = Path(__file__).resolve().parents[1]
RS = importlib.import_module("flwr.superlink.runtime.run_serverapp")  # the package exports a function so named

PATCHED = [
    (rc, "pull_task_input"), (rc, "push_message"), (rc, "pull_and_inflate_object_from_tree"),
    (http_grid, "pull_objects"), (sci, "time"), (fhc, "HEARTBEAT_DEFAULT_INTERVAL"),
    (heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"), (FleetHttpClient, "ActivateNode"), (RS, "install_from_fab"),
]  # fmt: skip


@pytest.fixture
def flower(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Flower's modules as they were before the test, whatever it patched."""
    for owner, name in PATCHED:
        monkeypatch.setattr(owner, name, owner.__dict__[name])
    yield monkeypatch


def test_check_passes_on_the_pinned_flower() -> None:
    assert flwr.__version__ == fp.FLOWER_VERSION
    assert f"flwr=={fp.FLOWER_VERSION}" in (ROOT / "constraints.txt").read_text().split()
    fp.check()
    assert all(t.why for t in fp.TARGETS)  # every target says why it is patched


def test_another_flower_is_refused_naming_both_versions(flower: pytest.MonkeyPatch) -> None:
    flower.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(RuntimeError, match=r"flwr\) 1\.43\.0 is installed.*flwr 1\.42\.0") as e:
        fp.check()
    assert "flwr==1.42.0" in str(e.value)
    before = rc.pull_and_inflate_object_from_tree
    with pytest.raises(RuntimeError, match=r"1\.43\.0"):
        fp.quick_task_pulls()  # no patch is applied to a Flower that was not checked
    assert rc.pull_and_inflate_object_from_tree is before


def test_a_target_gone_or_changed_is_named_with_its_reason(flower: pytest.MonkeyPatch) -> None:
    flower.delattr(rc, "pull_task_input")
    flower.setattr(http_grid, "pull_objects", lambda *args: None)  # Flower's retry arguments gone
    with pytest.raises(RuntimeError) as e:
        fp.check()
    text = str(e.value)
    assert "flwr.supernode.runtime.run_clientapp.pull_task_input is gone (code approval" in text
    assert "flwr.superlink.grid.http_grid.pull_objects is not a function taking initial_backoff" in text
    with pytest.raises(RuntimeError, match="pull_task_input") as e:
        fp.check("clientapp")  # a process checks its own targets only
    assert "pull_objects" not in str(e.value)
    fp.check("supernode")
    with pytest.raises(ValueError, match="no such process: server"):
        fp.check("server")


def test_the_sites_runner_checks_without_loading_the_supernodes_database_code() -> None:
    """The ClientApp runner starts once per message: its check imports only what it patches (the SuperNode's
    modules pull in SQLAlchemy and alembic, seconds of imports and a line per alembic plugin in the site's log)."""
    code = (
        "import sys; from fedecho.fl import flower_patches as fp; fp.check('clientapp'); "
        "heavy = ('alembic', 'sqlalchemy', 'flwr.supernode.start_client_internal'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_quick_reply_pulls_replaces_pull_objects_once_on_an_http_grid(flower: pytest.MonkeyPatch) -> None:
    flowers = http_grid.pull_objects
    fp.quick_reply_pulls(object())  # not an HttpGrid (the simulation's grid): nothing changes
    assert http_grid.pull_objects is flowers
    grid = http_grid.HttpGrid(token="t")
    fp.quick_reply_pulls(grid)
    pulls = http_grid.pull_objects
    assert isinstance(pulls, functools.partial) and pulls.func is flowers and pulls.keywords == fp.QUICK_PULL
    fp.quick_reply_pulls(grid)  # again: Flower's function wrapped once, not the partial again
    assert http_grid.pull_objects.func is flowers and fp.original(http_grid.pull_objects) is flowers
    fp.check()  # a patched Flower still passes


def test_quick_task_pulls_replaces_the_runners_pull_once(flower: pytest.MonkeyPatch) -> None:
    flowers = rc.pull_and_inflate_object_from_tree
    fp.quick_task_pulls()
    fp.quick_task_pulls()
    pulls = rc.pull_and_inflate_object_from_tree
    assert isinstance(pulls, functools.partial) and pulls.func is flowers and pulls.keywords == fp.QUICK_PULL


def test_clientapp_hooks_judge_after_the_pull_and_pass_every_reply_through_before_push(
    flower: pytest.MonkeyPatch,
) -> None:
    pushed: list[tuple[Any, Any, Any]] = []
    flower.setattr(rc, "pull_task_input", lambda client: ("message", "context", "run", "fab"))  # stand-ins
    flower.setattr(rc, "push_message", lambda client, message, context: pushed.append((client, message, context)))
    seen: list[tuple[Any, ...]] = []

    def after_pull(message: Any, context: Any, fab: Any, reply: Any) -> Any:
        seen.append((message, context, fab))
        reply("refusal")
        return "unpacked " + message

    fp.clientapp_hooks(lambda *a: pytest.fail("replaced by the second call"), lambda m: m)
    run_clientapp = fp.clientapp_hooks(after_pull, lambda m: "packed " + m)
    assert run_clientapp is rc.run_clientapp
    assert rc.pull_task_input("client") == ("unpacked message", "context", "run", "fab")
    assert seen == [("message", "context", "fab")]  # once: the second call wrapped Flower's pull, not the first hook
    rc.push_message("client", "reply", "context")
    assert pushed == [("client", "packed refusal", "context"), ("client", "packed reply", "context")]


def test_serverapp_bundle_hook_judges_before_flowers_install(flower: pytest.MonkeyPatch) -> None:
    class Refused(Exception):
        pass

    judged: list[bytes] = []

    def refuse(fab: bytes) -> None:
        judged.append(fab)
        raise Refused

    run_serverapp = fp.serverapp_bundle_hook(refuse)
    assert run_serverapp is RS.run_serverapp
    with pytest.raises(Refused):
        RS.install_from_fab(b"not a bundle", skip_prompt=True)
    fp.serverapp_bundle_hook(judged.append)  # allowed: Flower's own install runs (and rejects these bytes)
    with pytest.raises(Exception, match="zip") as e:
        RS.install_from_fab(b"not a bundle", skip_prompt=True)
    assert not isinstance(e.value, Refused) and judged == [b"not a bundle", b"not a bundle"]


def test_shorter_supernode_polling_shortens_the_loops_waits(flower: pytest.MonkeyPatch) -> None:
    fp.shorter_supernode_polling(0.01, 0.005)
    clock = sci.time
    assert clock is not time and clock.monotonic is time.monotonic  # everything else is the time module
    start = time.monotonic()
    clock.sleep(3)  # Flower's idle wait
    clock.sleep(0.5)  # its wait for a reply
    assert time.monotonic() - start < 1.0
    fp.check()


def test_supernode_heartbeat_sets_both_constants_and_not_below_flowers_minimum(flower: pytest.MonkeyPatch) -> None:
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL

    fp.supernode_heartbeat(HEARTBEAT_MIN_INTERVAL)
    assert fhc.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_MIN_INTERVAL
    with pytest.raises(ValueError, match="HEARTBEAT_MIN_INTERVAL"):
        fp.supernode_heartbeat(HEARTBEAT_MIN_INTERVAL - 1)
    assert fhc.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_MIN_INTERVAL


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wrap_activation_hands_the_call_to_the_site(flower: pytest.MonkeyPatch) -> None:
    flowers = FleetHttpClient.ActivateNode
    calls: list[fp.Activation] = []

    def handler(act: fp.Activation) -> str:
        calls.append(act)
        return "response"

    fp.wrap_activation(lambda act: pytest.fail("replaced by the second call"))
    fp.wrap_activation(handler)
    assert fp.original(FleetHttpClient.ActivateNode) is flowers
    url = f"http://127.0.0.1:{_closed_port()}"
    client = FleetHttpClient(url + "/", timeout=5.0)
    assert client.ActivateNode(ActivateNodeRequest(public_key=b"key", heartbeat_interval=10)) == "response"
    (act,) = calls
    assert act.public_key == b"key" and act.superlink == url
    with pytest.raises(httpx.ConnectError):  # Flower's own ActivateNode, to the SuperLink's address
        act.activate()
    with pytest.raises(httpx.ConnectError):
        act.deactivate(7)


def _message(monkeypatch: pytest.MonkeyPatch) -> Message:
    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    return Message(RecordDict({"config": ConfigRecord({"phase": "pretrain"})}), 7, MessageType.TRAIN)


def test_message_with_copies_the_metadata_and_set_message_id_writes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _message(monkeypatch)
    content = RecordDict({"config": ConfigRecord({"phase": "finetune"})})
    copy = fp.message_with(msg, content)
    assert copy.content is content and msg.content["config"]["phase"] == "pretrain"
    assert copy.metadata is not msg.metadata and copy.metadata.dst_node_id == 7
    assert copy.metadata.message_type == msg.metadata.message_type
    fp.set_message_id(copy, "pushed-id")
    assert copy.metadata.message_id == "pushed-id" and msg.metadata.message_id == ""
    fp.set_message_id(msg, "pushed-id")
    assert msg.metadata.message_id == "pushed-id"


# --- the rule: no module outside flower_patches assigns into Flower -----------------------------------------------

SOURCES = ("fedecho", "server", "client", "sim")
PATCHES = ROOT / "fedecho" / "fl" / "flower_patches.py"
PATCHED_NAMES = {t.name.rsplit(".", 1)[-1] for t in fp.TARGETS}  # what Flower has that fedecho patches
DICT_WRITES = {"pop", "update", "setdefault", "clear", "popitem", "__setitem__", "__delitem__"}


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _flower_names(tree: ast.AST) -> set[str]:
    """Names bound to Flower's modules and objects: imports from flwr, import_module("flwr...")."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if re.match(r"flwr(\.|$)", a.name)}
        elif isinstance(node, ast.ImportFrom) and re.match(r"flwr(\.|$)", node.module or ""):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args:
            func, first = node.value.func, node.value.args[0]
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "import_module" and isinstance(first, ast.Constant) and str(first.value).startswith("flwr"):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign | ast.Delete):
        found = list(node.targets)
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        found = [node.target]
    else:
        return []
    flat: list[ast.AST] = []
    while found:
        t = found.pop()
        if isinstance(t, ast.Tuple | ast.List):
            found.extend(t.elts)
        else:
            flat.append(t.value if isinstance(t, ast.Starred) else t)
    return flat


def writes_into_flower(source: str) -> list[str]:
    """Lines that change Flower: an assignment into (or deletion from) a name imported from flwr, setattr or
    delattr on one, an assignment to an attribute fedecho patches in Flower (whatever the object is called, but
    `self`/`cls`), and any write into an object's `__dict__` (Flower's objects keep their parts there)."""
    tree = ast.parse(source)
    flower = _flower_names(tree)
    found = []
    for node in ast.walk(tree):
        for t in _targets(node):
            root = _root(t)
            if not isinstance(t, ast.Attribute | ast.Subscript) or not isinstance(root, ast.Name):
                continue
            into_dict = (
                isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "__dict__"
            )
            patched = isinstance(t, ast.Attribute) and t.attr in PATCHED_NAMES and root.id not in ("self", "cls")
            if root.id in flower or into_dict or patched:
                found.append(f"{node.lineno}: {ast.unparse(node)[:100]}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            root = _root(node.args[0]) if node.args else None
            if isinstance(root, ast.Name) and root.id in flower:
                found.append(f"{node.lineno}: {ast.unparse(node)[:100]}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DICT_WRITES:
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and owner.attr == "__dict__":
                found.append(f"{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_nothing_outside_flower_patches_assigns_into_flower() -> None:
    files = sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py") if p != PATCHES)
    assert len(files) > 50
    found = [f"{p.relative_to(ROOT)}:{line}" for p in files for line in writes_into_flower(p.read_text())]
    assert not found, "patch Flower only in fedecho/fl/flower_patches.py:\n" + "\n".join(found)
    assert writes_into_flower(PATCHES.read_text())  # the scan sees the patches where they are


@pytest.mark.parametrize(
    "source",
    [
        "from flwr.supernode.runtime import run_clientapp as rc\nrc.pull_task_input = judge",
        "from flwr.supernode import start_client_internal as sci\ndef f():\n    sci.time = Clock()",
        "import flwr.superlink.grid.http_grid\nflwr.superlink.grid.http_grid.pull_objects = quick",
        "import importlib\nrs = importlib.import_module('flwr.superlink.runtime.run_serverapp')\nrs.x = judge",
        "def hook(client_class):\n    client_class.ActivateNode = activate_or_release",
        "def push(m, i):\n    m.metadata.__dict__['_message_id'] = i",
        "def copy(out):\n    out.__dict__.pop('_object_id', None)",
        "from flwr.app import Metadata\nsetattr(Metadata, 'message_id', 'x')",
        "from flwr.supercore import heartbeat\nheartbeat.HEARTBEAT_DEFAULT_INTERVAL += 1",
    ],
)
def test_the_scan_finds_a_patch_of_flower(source: str) -> None:
    assert writes_into_flower(source), source


def test_the_scan_leaves_fedechos_own_objects_alone() -> None:
    source = (
        "from flwr.app import ArrayRecord\nclass A:\n    def f(self):\n        self.time = 1\n"
        "record = ArrayRecord()\nstate = {}\nstate['x'] = record\nstrategy.m_t = {}\nvalue = dict(obj.__dict__)"
    )
    assert writes_into_flower(source) == []
