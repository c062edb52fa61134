"""Every change fedecho makes to Flower's own code, in one place, checked against the pinned Flower at start.

fedecho runs on flwr 1.42.0 (pinned in constraints.txt) and changes a few of its internals: module functions and
constants replaced, a class method wrapped, a private attribute written. Each change is one function here, whose
docstring says why it exists and what it measured; `TARGETS` names every internal they touch with its reason, and
`check()` verifies the installed Flower is the pinned one and still has every target. Every patch function checks
the targets of its process before it changes anything, and each process that patches Flower (the site's SuperNode
wrapper, its ClientApp runner, the coordinator's ServerApp and its runner) checks at its start: a Flower that
changed fails there, loudly, instead of running unpatched. What the site or the coordinator does inside a hook
(its state, the code approval) stays with the caller and is passed in; only the act of patching Flower lives here.

Nothing outside this module assigns into Flower (tests/test_flower_patches.py keeps that true). Flower is
imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FLOWER_VERSION = "1.42.0"
"""The flwr every patch here was written for and checked against (constraints.txt pins the same)."""

QUICK_PULL: dict[str, Any] = {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_tries_per_object": None}
"""Retries of Flower's object pulls while the sender is still uploading (flwr: after 1, 2, 4 ... 10 s, at most 500
tries): sooner, and bounded by Flower's time limit (2 h) alone, so that a slow upload is not cut short."""

_ORIGINAL = "__fedecho_original__"  # on a replacement: the Flower function it replaced (patching twice wraps it once)


class _SuperNodeClock:
    """The `time` module as Flower's SuperNode loop sees it, with its waits shortened (`shorter_supernode_polling`)."""

    def __init__(self, idle: float, local: float):
        self.idle, self.local = idle, local

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        # flwr 1.42's loop sleeps 3 s after a pull that found no message, 0.5 s between looks for a reply
        time.sleep(self.idle if seconds >= 1 else min(seconds, self.local))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _accepts(*names: str) -> Callable[[Any], bool]:
    """A test: a function (the Flower original, under a patch of ours) that takes these keyword arguments."""

    def test(value: Any) -> bool:
        fn = getattr(value, _ORIGINAL, value)
        try:
            return callable(fn) and set(names) <= set(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            return False

    return test


def _is_time_module(value: Any) -> bool:
    return value is time or isinstance(value, _SuperNodeClock)


def _is_fleet_http_client(value: Any) -> bool:
    from flwr.supernode.fleet_http_client import FleetHttpClient

    return value is FleetHttpClient


def _keeps_base_url(value: Any) -> bool:
    """ProtobufClient keeps the SuperLink's address as `_base_url` (read by `wrap_activation`)."""
    try:
        return "self._base_url = base_url" in inspect.getsource(value.__init__)
    except (OSError, TypeError):
        return False


def _message_id_in_dict(value: Any) -> bool:
    """Metadata keeps message_id as `__dict__["_message_id"]`, read back by its property (`set_message_id`)."""
    try:
        probe = value(
            run_id=0, message_id="probe", src_node_id=0, dst_node_id=0, reply_to_message_id="", group_id="",
            created_at=0.0, ttl=1.0, message_type="train",
        )  # fmt: skip
        probe.__dict__["_message_id"] = "written"
        return probe.message_id == "written"
    except Exception:
        return False


@dataclass(frozen=True)
class Target:
    """One Flower internal fedecho patches or relies on: `module`.`name` (a dotted path inside the module), in the
    process that patches it (PROCESSES)."""

    process: str
    module: str
    name: str
    why: str
    test: Callable[[Any], bool] = callable
    expect: str = "callable"


PROCESSES = ("clientapp", "supernode", "serverapp")
"""The processes that patch Flower: the site's ClientApp runner (and its launcher), the site's SuperNode, the
coordinator's ServerApp (its runner, and the simulation's). Each checks only its own targets: importing the others'
modules would cost a site's runner seconds (the SuperNode's pull in SQLAlchemy and alembic) and fill its log."""


_RC = "flwr.supernode.runtime.run_clientapp"
_SCI = "flwr.supernode.start_client_internal"
_FHC = "flwr.supernode.fleet_http_connection"
_RS = "flwr.superlink.runtime.run_serverapp"
_HG = "flwr.superlink.grid.http_grid"

_C, _N, _S = PROCESSES

# fmt: off
TARGETS: tuple[Target, ...] = (
    Target(_C, _RC, "run_clientapp", "the site's ClientApp runner runs it per task (clientapp_hooks)"),
    Target(_C, _RC, "pull_task_input", "code approval judges the bundle after the pull, before install "
           "(clientapp_hooks)"),
    Target(_C, _RC, "push_message", "the reply's arrays are packed into one object (clientapp_hooks)"),
    Target(_C, _RC, "pull_and_inflate_object_from_tree", "a task's arrays are pulled with quicker retries "
           "(quick_task_pulls)", _accepts(*QUICK_PULL), "a function taking " + ", ".join(QUICK_PULL)),
    Target(_N, _SCI, "time", "the SuperNode loop's 3 s idle wait is shortened (shorter_supernode_polling)",
           _is_time_module, "the time module"),
    Target(_N, _SCI, "_pull_and_store_message", "the loop whose idle wait is shortened "
           "(shorter_supernode_polling)"),
    Target(_N, _FHC, "HEARTBEAT_DEFAULT_INTERVAL", "the heartbeat interval the SuperNode declares "
           "(supernode_heartbeat)", _is_number, "a number"),
    Target(_N, "flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL", "how often the SuperNode sends heartbeats "
           "(supernode_heartbeat)", _is_number, "a number"),
    Target(_N, "flwr.common.constant", "HEARTBEAT_MIN_INTERVAL", "the shortest interval the SuperLink accepts "
           "(supernode_heartbeat)", _is_number, "a number"),
    Target(_N, "flwr.supernode.fleet_http_client", "FleetHttpClient.ActivateNode", "a node still counted online is "
           "released and activated again (wrap_activation)"),
    Target(_N, "flwr.supernode.fleet_http_client", "FleetHttpClient.DeactivateNode", "how that node is released "
           "(wrap_activation)"),
    Target(_N, _FHC, "FleetHttpClient", "the SuperNode's connection uses the class whose ActivateNode is wrapped "
           "(wrap_activation)", _is_fleet_http_client, "flwr.supernode.fleet_http_client.FleetHttpClient"),
    Target(_N, "flwr.supercore.protobuf.client", "ProtobufClient", "the SuperLink address a node is remembered at "
           "(wrap_activation)", _keeps_base_url, "a class that keeps `_base_url`"),
    Target(_S, _HG, "HttpGrid", "the ServerApp's grid whose reply pulls are quickened (quick_reply_pulls)",
           inspect.isclass, "a class"),
    Target(_S, _HG, "pull_objects", "a reply's arrays are pulled with quicker retries (quick_reply_pulls)",
           _accepts(*QUICK_PULL), "a function taking " + ", ".join(QUICK_PULL)),
    Target(_S, "flwr.app", "Metadata", "the id Flower gave a packed copy is written into the original "
           "(set_message_id)", _message_id_in_dict, "message_id kept as __dict__['_message_id']"),
    Target(_S, "flwr.app", "Message", "a packed copy keeps the message's metadata (message_with)",
           _accepts("metadata", "content"), "a class taking metadata= and content="),
    Target(_S, _RS, "run_serverapp", "the coordinator's ServerApp runner runs it per task (serverapp_bundle_hook)"),
    Target(_S, _RS, "install_from_fab", "the coordinator judges a bundle before it is installed "
           "(serverapp_bundle_hook)"),
)
# fmt: on


def _resolve(target: Target) -> Any:
    """The target's current value; AttributeError or ImportError when it is gone."""
    value: Any = importlib.import_module(target.module)
    for part in target.name.split("."):
        value = getattr(value, part)
    return value


def check(*processes: str) -> None:
    """Raise RuntimeError unless the installed Flower is FLOWER_VERSION and still has every one of TARGETS that
    the given processes patch (none given: all of them)."""
    import flwr

    unknown = set(processes) - set(PROCESSES)
    if unknown:
        raise ValueError(f"no such process: {', '.join(sorted(unknown))} (known: {', '.join(PROCESSES)})")

    installed = str(getattr(flwr, "__version__", "unknown"))
    if installed != FLOWER_VERSION:
        raise RuntimeError(
            f"Flower (flwr) {installed} is installed, but fedecho patches Flower internals written for flwr "
            f"{FLOWER_VERSION} (pinned in constraints.txt): install flwr=={FLOWER_VERSION}"
        )
    problems = []
    for target in TARGETS:
        if processes and target.process not in processes:
            continue
        where = f"{target.module}.{target.name}"
        try:
            value = _resolve(target)
        except (ImportError, AttributeError):
            problems.append(f"{where} is gone ({target.why})")
            continue
        if not target.test(value):
            problems.append(f"{where} is not {target.expect} ({target.why})")
    if problems:
        raise RuntimeError(f"flwr {installed} lacks what fedecho patches: " + "; ".join(problems))


def _replace(owner: Any, name: str, make: Callable[[Any], Any]) -> Any:
    """owner.name = make(Flower's original), marked with the original: a second patch wraps the original again
    instead of the first patch. Returns the replacement."""
    current = getattr(owner, name)
    original = getattr(current, _ORIGINAL, current)
    new = make(original)
    setattr(new, _ORIGINAL, original)
    setattr(owner, name, new)
    return new


def original(value: Any) -> Any:
    """The Flower function a patch here replaced (value itself when it is not one of ours)."""
    return getattr(value, _ORIGINAL, value)


def quick_reply_pulls(grid: Any) -> None:
    """Flower's HttpGrid returns a reply as soon as the site has announced it, then pulls its arrays with retries
    after 1, 2, 4 ... s while the site is still uploading them: a second or more of every round. Retry sooner
    (QUICK_PULL; Flower's time limit, 2 h, still bounds a pull; its count of tries would end a slow upload too
    early). Only an HttpGrid (a deployment) is concerned; calling it again changes nothing."""
    check("serverapp")
    from flwr.superlink.grid import http_grid

    if isinstance(grid, http_grid.HttpGrid):
        _replace(http_grid, "pull_objects", lambda pull: functools.partial(pull, **QUICK_PULL))


def quick_task_pulls() -> None:
    """The SuperNode hands a ClientApp task out before it has the message's arrays from the SuperLink, and
    Flower's runner then retries its pull of them after 1 s (then 2, 4, ...): a second or more of every round.
    Look again sooner (QUICK_PULL; a local call to the site's own SuperNode)."""
    check("clientapp")
    from flwr.supernode.runtime import run_clientapp as rc

    _replace(rc, "pull_and_inflate_object_from_tree", lambda pull: functools.partial(pull, **QUICK_PULL))


def clientapp_hooks(
    after_pull: Callable[[Any, Any, Any, Callable[[Any], None]], Any], before_push: Callable[[Any], Any]
) -> Callable[..., None]:
    """Flower's ClientApp runner (run_clientapp) with the site's hooks; returns run_clientapp to call.

    Code approval: Flower's runner pulls the message, context, run and bundle (FAB) from the SuperNode and then
    installs the bundle and imports it. fedecho's site must judge the bundle before any of its code is installed
    or imported, and Flower has no hook there, so `pull_task_input` is replaced: after_pull(message, context, fab,
    reply) is called right after the pull and returns the message the ClientApp gets; reply(message) sends a
    message as the task's reply (a refusal), and an exception it raises ends the task before the install.
    Transport: one object per tensor cost 20-60 s a round (`fedecho.fl.packing`), so `push_message` is replaced
    to pass every reply through before_push (which packs its arrays) before Flower pushes it."""
    check("clientapp")
    from flwr.supernode.runtime import run_clientapp as rc

    def hooked_pull(pull: Callable[[Any], tuple[Any, Any, Any, Any]]) -> Callable[[Any], tuple[Any, Any, Any, Any]]:
        def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
            message, context, run, fab = pull(client)
            return after_pull(message, context, fab, lambda m: rc.push_message(client, m, context)), context, run, fab

        return pull_task_input

    def hooked_push(push: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
        def push_message(client: Any, message: Any, context: Any) -> None:
            push(client, before_push(message), context)

        return push_message

    _replace(rc, "pull_task_input", hooked_pull)
    _replace(rc, "push_message", hooked_push)
    return rc.run_clientapp  # type: ignore[no-any-return]


def serverapp_bundle_hook(judge: Callable[[bytes], None]) -> Callable[..., None]:
    """Flower's ServerApp runner (run_serverapp) with judge(fab bytes) called before `install_from_fab`; returns
    run_serverapp to call. The coordinator runs only fedecho's own code-less bundle, whoever submitted a run, and
    Flower has no hook between pulling a run's bundle and installing it: judge raises to refuse it, and nothing
    of the bundle is then installed or imported."""
    check("serverapp")
    rs = importlib.import_module(_RS)  # the package exports a function of the module's name

    def hooked(install: Callable[..., Any]) -> Callable[..., Any]:
        def install_from_fab(fab: bytes, *args: Any, **kwargs: Any) -> Any:
            judge(fab)
            return install(fab, *args, **kwargs)

        return install_from_fab

    _replace(rs, "install_from_fab", hooked)
    return rs.run_serverapp  # type: ignore[no-any-return]


def shorter_supernode_polling(idle: float, local: float) -> None:
    """Flower's SuperNode loop (flwr.supernode.start_client_internal) with shorter waits: flwr 1.42 sleeps 3 s
    after every pull that found no message and 0.5 s between looks for the ClientApp's reply, so a round's message
    waited 1.5 s on average (up to 3 s) before its site saw it, and the reply up to 0.5 s more (measured: about 2 s
    of every round, 20 % of a 10 s round). The loop's `time` module is replaced by one whose sleep waits `idle`
    instead of a wait of 1 s or more and at most `local` otherwise. An idle pull is one small request."""
    check("supernode")
    from flwr.supernode import start_client_internal as sci

    sci.time = _SuperNodeClock(idle, local)  # type: ignore[assignment]


def supernode_heartbeat(interval: float) -> None:
    """The SuperNode heartbeats every `interval` s instead of Flower's 30 s default. The SuperLink counts a node
    online until HEARTBEAT_PATIENCE (2) intervals after its last heartbeat, so at Flower's minimum (10 s) a site
    that died is seen offline after about 20 s instead of 60 s (the coordinator leaves it out of a round sooner).
    flwr reads the value as the module constant HEARTBEAT_DEFAULT_INTERVAL in `flwr.supernode.fleet_http_connection`
    (what it declares) and in `flwr.supercore.heartbeat` (how often it sends: (interval - 5 s) x 0.7..0.9, about
    every 4 s at 10 s); both are set. Raises ValueError below Flower's HEARTBEAT_MIN_INTERVAL."""
    check("supernode")
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection as fhc

    if interval < HEARTBEAT_MIN_INTERVAL:
        minimum = f"flwr's HEARTBEAT_MIN_INTERVAL ({HEARTBEAT_MIN_INTERVAL} s)"
        raise ValueError(f"heartbeat interval {interval} s is below {minimum}")
    fhc.HEARTBEAT_DEFAULT_INTERVAL = interval
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval


@dataclass(frozen=True)
class Activation:
    """One ActivateNode call of the SuperNode, as `wrap_activation`'s handler sees it."""

    public_key: bytes  # the node's public key (the request's)
    superlink: str  # the SuperLink's address, as the SuperNode reaches it
    activate: Callable[[], Any]  # Flower's ActivateNode with this request; its response has node_id
    deactivate: Callable[[int], Any]  # Flower's DeactivateNode of that node id (signed with this node's key)


def wrap_activation(handler: Callable[[Activation], Any]) -> None:
    """The SuperNode's activation goes through handler(Activation), which returns the ActivateNode response.
    Why: the SuperLink refuses to activate a node it still counts online (flwr 1.42: ONLINE until 2 heartbeat
    intervals after the last heartbeat), so a site restarted right after a crash was refused until then, and
    Flower does not release the node itself; the site's handler can release its previous node with `deactivate`
    and activate again. FleetHttpClient.ActivateNode is replaced (the class the SuperNode's connection uses)."""
    check("supernode")
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supernode.fleet_http_client import FleetHttpClient

    def hooked(activate: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def ActivateNode(client: Any, request: Any) -> Any:  # Flower's method name
            return handler(
                Activation(
                    public_key=bytes(request.public_key),
                    superlink=str(getattr(client, "_base_url", "")),
                    activate=lambda: activate(client, request),
                    deactivate=lambda node_id: client.DeactivateNode(DeactivateNodeRequest(node_id=node_id)),
                )
            )

        return ActivateNode

    _replace(FleetHttpClient, "ActivateNode", hooked)


def set_message_id(message: Any, message_id: str) -> None:
    """message.metadata.message_id = message_id. Flower's grid writes the SuperLink's id into the message it
    pushes, which under fedecho's PackingGrid is the packed copy; the round loop traces and matches replies
    against its own message, which gets the id here, written as Flower's grid writes it (Metadata has no setter
    for it: `__dict__["_message_id"]`)."""
    message.metadata.__dict__["_message_id"] = message_id


def message_with(message: Any, content: Any) -> Any:
    """A new Message with a copy of message's metadata and `content`; message is left as it is. PackingGrid sends
    packed copies and keeps the round loop's messages; Flower's Message takes its metadata only through the
    constructor's `metadata=` (marked for Flower's internal use), and a copy must not share the original's
    metadata, into which Flower writes the pushed message's id."""
    import copy

    from flwr.app import Message

    return Message(content=content, metadata=copy.copy(message.metadata))
