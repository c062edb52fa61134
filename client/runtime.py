"""The site's own ClientApp runner: judges each app bundle before any of its code is installed or imported.

`fedecho client start` runs the SuperNode with `--isolation process`: the SuperNode then starts no ClientApp
itself. This module, part of the fedecho the site installed, does instead:

- `node` (what `fedecho client start` launches): starts flower-supernode in its own process group and, in a
  thread, polls the SuperNode's Runtime API for ClientApp tasks (signed with a secret only the SuperNode and
  this process hold, so no other local process can take a task) and starts one `flwr-clientapp` runner per
  task, as Flower's own SuperExec would (`executor` does the polling alone, for a SuperNode started by hand);
- `flwr-clientapp` (one process per message): Flower's `run_clientapp`, with one change: right after it has
  pulled the message, context, run and bundle (FAB) from the SuperNode, and before it installs the bundle,
  `gate` hashes the bundle and asks `fedecho.client.approval.judge`. An unapproved bundle is answered with a
  refusal (error code 103: the server records the site as "refused"), kept for review under
  `<state>/bundles/refused/HASH.fab`, written to the site's audit log, and never installed or imported.

Every change to Flower's own code (the hook above and the ones below) is applied by `fedecho.fl.flower_patches`,
which says why each exists and checks, at the start of each process here, that the installed Flower is the
pinned one (flwr 1.42.0) and still has what is patched; this module only passes in what the site does.

Transport (measured per round, see the federation benchmark): the runner unpacks the message's arrays after the pull and
packs the reply's before the push (`fedecho.fl.packing`: one object per tensor cost 20-60 s a round), retries
its pull of the arrays sooner than Flower would (`flower_patches.quick_task_pulls`), and `flower-supernode` runs
Flower's SuperNode with its 3 s idle wait shortened (`flower_patches.shorter_supernode_polling`).

Crash and restart: the SuperNode heartbeats every `SUPERNODE_HEARTBEAT_INTERVAL` (Flower's minimum, not its
30 s default), and when the SuperLink refuses to activate it because it still counts the node online (a start
right after a crash), the wrapper releases its own node (DeactivateNode, which only this site's key can sign)
and activates again (`_activation_handler`). Every process of the site follows its parent: the launcher stops
the SuperNode and the runners when `fedecho client start` dies, the SuperNode stops when the launcher dies,
and the runners are told the launcher's pid (`watch_parent`, Flower's `parent_pid`).

Starting a Python process that imports torch, Flower and fedecho takes seconds (8-11 s on a busy 2-core
machine), once per message. So the runner keeps one spare runner started ahead (`--token-stdin`): it imports
the site's installed fedecho ClientApp, Flower's runner and torch, then waits for a task token on stdin.
Only code the site installed is imported ahead; the bundle is still judged before anything of it is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedecho.client.approval import Bundle, BundleError, judge, read_bundle
from fedecho.client.audit import BUNDLE_ENV, SiteLog
from fedecho.fl import flower_patches
from fedecho.fl.protocol import ERROR_REFUSED

log = logging.getLogger("fedecho.client.runtime")


class BundleRefused(RuntimeError):
    """The site refused the run's app bundle; the refusal has already been sent and logged."""


def _message_fields(message: Any) -> dict[str, Any]:
    """Run, round, phase of a message, read as data (no bundle code involved)."""
    out: dict[str, Any] = {
        "flower_run_id": int(message.metadata.run_id),
        "message_type": str(message.metadata.message_type),
    }
    with contextlib.suppress(Exception):
        cfg = message.content["config"]
        out["phase"] = str(cfg.get("phase", ""))
        if "server-round" in cfg:
            out["round"] = int(cfg["server-round"])
        if "run-id" in cfg:
            out["run_id"] = int(cfg["run-id"])
    return out


def gate(message: Any, context: Any, fab: Any, reply: Callable[[Any], None]) -> Bundle:
    """Allow the bundle (returns it) or answer the message with a refusal (reply: the task's reply to the
    SuperNode) and raise BundleRefused."""
    from fedecho.client.config import load_site_config

    site = load_site_config(Path(str(context.node_config["site-config"])))
    with SiteLog(site.state) as site_log:
        try:
            bundle = read_bundle(fab.content)
            verdict = judge(bundle, site_log.approved(bundle.sha256))
            sha, allowed, reason = bundle.sha256, verdict.allowed, verdict.reason
        except BundleError as e:
            sha, allowed, reason = "", False, str(e)
        if allowed:
            os.environ[BUNDLE_ENV] = sha
            return bundle
        keep = site.state / "bundles" / "refused" / f"{sha or 'unreadable'}.fab"
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_bytes(fab.content)
        reason = f"refused by site {site.name}: {reason}"
        site_log.record(decision="refused", reason=reason, bundle_sha256=sha, **_message_fields(message))
    from flwr.app import Error, Message

    log.warning(reason)
    reply(Message(Error(code=ERROR_REFUSED, reason=reason), reply_to=message))
    raise BundleRefused(reason)


def run_task(address: str, token: str | None, parent_pid: int | None) -> None:
    """One ClientApp task: Flower's run_clientapp with the bundle judged before installation.

    token None: a spare runner; import what every task needs first, then read the token from stdin
    (end of input, i.e. the runner went away without a task for it: exit)."""
    flower_patches.check("clientapp")
    if token is None:
        import fedecho.client.app  # noqa: F401  (the site's installed ClientApp, and torch with it)

        token = sys.stdin.readline().strip()
        if not token:
            return
    from fedecho.fl.packing import pack_in_place, unpack_message

    def judge_and_unpack(message: Any, context: Any, fab: Any, reply: Callable[[Any], None]) -> Any:
        gate(message, context, fab, reply)
        return unpack_message(message)  # the arrays travel packed (fedecho.fl.packing)

    flower_patches.quick_task_pulls()
    # the reply's arrays as one object, not one per tensor
    run_clientapp = flower_patches.clientapp_hooks(judge_and_unpack, pack_in_place)
    run_clientapp(
        runtime_api_address=address, token=token, insecure=True, parent_pid=parent_pid,
        runtime_dependency_install=False,
    )  # fmt: skip


def _spare_runner(address: str) -> subprocess.Popen[bytes]:
    """A runner started ahead of its task: it imports everything, then waits for the task token on stdin."""
    argv = [
        sys.executable, "-m", "fedecho.client.runtime", "flwr-clientapp",
        "--runtime-api-address", address, "--token-stdin", "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdin=subprocess.PIPE)


def serve(address: str, secret_file: Path, parent_pid: int | None, poll: float = 0.2) -> None:
    """Take ClientApp tasks from the SuperNode's Runtime API (`fedecho.fl.superexec`) and hand each to a spare
    runner started ahead (then start the next spare), until the parent dies."""
    from fedecho.fl.superexec import hand_token
    from fedecho.fl.superexec import serve as serve_tasks

    flower_patches.check("clientapp")
    spare = [_spare_runner(address)]

    def launch(token: str) -> None:
        if spare[0].poll() is not None:  # the spare died (e.g. killed): start a fresh one for this task
            spare[0] = _spare_runner(address)
        hand_token(spare[0], token)
        spare[0] = _spare_runner(address)

    try:
        serve_tasks(address, secret_file, "flwr-clientapp", launch, parent_pid=parent_pid, poll=poll)
    finally:
        with contextlib.suppress(OSError):
            if spare[0].stdin is not None:
                spare[0].stdin.close()  # end of input: the spare exits without a task


# The SuperNode's waits (`flower_patches.shorter_supernode_polling` says why: about 2 s of every round)
SUPERNODE_IDLE_POLL = 0.5  # s between a SuperNode's requests for a new message while it has none (flwr: 3 s)
SUPERNODE_LOCAL_POLL = 0.1  # s between its looks for the ClientApp's reply, in its own memory (flwr: 0.5 s)


SUPERNODE_HEARTBEAT_INTERVAL = 10
"""s between the SuperNode's heartbeats as it declares them to the SuperLink: Flower's minimum
(HEARTBEAT_MIN_INTERVAL), not its 30 s default. The SuperLink counts a node online until HEARTBEAT_PATIENCE (2)
intervals after its last heartbeat, so a site that died is seen offline after about 20 s instead of 60 s (the
coordinator leaves it out of a round sooner). Set by `flower_patches.supernode_heartbeat`."""

NODE_FILE = "node.json"  # in the state folder: the node id this site's key was last activated as, at which SuperLink


class SiteRefused(RuntimeError):
    """The SuperLink did not activate this site's node; the reason has been written as a `fedecho-site:` line."""


def _say(kind: str, text: str) -> None:
    """One line for the supervisor (`fedecho.client.supernode.SuperNodeWatch`), in the SuperNode's log."""
    from fedecho.client.supernode import EVENT_PREFIX

    print(f"{EVENT_PREFIX} {kind}: {text}", file=sys.stderr, flush=True)


def _node_key(base_url: str, public_key: bytes) -> str:
    return hashlib.sha256(base_url.encode() + b"\0" + public_key).hexdigest()


def remembered_node(state: Path, base_url: str, public_key: bytes) -> int | None:
    """The node id this key was last activated as at this SuperLink (None: never, or another key/SuperLink)."""
    try:
        data = json.loads((state / NODE_FILE).read_text())
        return int(data["node_id"]) if data.get("key") == _node_key(base_url, public_key) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_node(state: Path, base_url: str, public_key: bytes, node_id: int) -> None:
    from fedecho.storage.files import atomic_write_bytes

    data = {"node_id": node_id, "superlink": base_url, "key": _node_key(base_url, public_key)}
    with contextlib.suppress(OSError):
        atomic_write_bytes(state / NODE_FILE, json.dumps(data).encode())


def _activation_refused(exc: BaseException) -> bool:
    """True for the SuperLink's "Failed to activate SuperNode" (its public reply: the cause is not sent, whether
    the key is unknown or the node still online)."""
    import httpx
    from flwr.supercore.error import ApiErrorCode, FlowerError

    if not isinstance(exc, httpx.HTTPStatusError):
        return False
    error = FlowerError.from_json(exc.response.text)
    return error is not None and error.code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED


def _activation_handler(site: str, state: Path) -> Callable[[flower_patches.Activation], Any]:
    """What the site's SuperNode does when it activates (`flower_patches.wrap_activation`): Flower's ActivateNode,
    remembering the node id it got and, when the SuperLink refuses because it still counts the node online
    (flwr 1.42: ONLINE until 2 heartbeat intervals after the last heartbeat, e.g. a start right after a crash),
    releasing the node and activating again.

    The refusal does not say why, so the node this key was last activated as (NODE_FILE) is released with
    DeactivateNode: the SuperLink accepts it only when signed by that node's own key. Unauthorized (401) means this
    key maps to no such node: the key is not registered (any more)."""
    import httpx

    def release_and_activate(act: flower_patches.Activation, refusal: BaseException) -> Any:
        known = remembered_node(state, act.superlink, act.public_key)
        if known is None:
            _say("unregistered", "the coordinator refused to activate this site's key, and no node of it is on record")
            raise SiteRefused(f"site {site}: activation refused; its public key is not registered") from refusal
        try:
            act.deactivate(known)
        except httpx.HTTPStatusError as e:
            if e.response.status_code == httpx.codes.UNAUTHORIZED:
                _say("unregistered", f"the coordinator refused to activate this site's key (node {known} is not its)")
                raise SiteRefused(f"site {site}: activation refused; its public key is not registered") from refusal
            status = e.response.status_code
            _say("refused", f"activation refused; node {known} could not be released either (HTTP {status})")
            raise SiteRefused(f"site {site}: activation refused") from refusal
        said = f"the coordinator still counted site {site} online from its previous start; released node {known}"
        _say("released", said)
        try:
            return act.activate()
        except Exception as e:
            if _activation_refused(e):
                _say("online", f"node {known} released, but its activation was refused again")
                raise SiteRefused(f"site {site}: activation refused after releasing node {known}") from e
            raise

    def activate_or_release(act: flower_patches.Activation) -> Any:
        try:
            response = act.activate()
        except Exception as e:
            if not _activation_refused(e):
                raise
            response = release_and_activate(act, e)
        remember_node(state, act.superlink, act.public_key, int(response.node_id))
        return response

    return activate_or_release


def supernode(argv: list[str]) -> None:
    """Flower's flower-supernode (same arguments) with shorter waits in its message loop, heartbeats every
    SUPERNODE_HEARTBEAT_INTERVAL, a node still counted online released (`_activation_handler`), and a graceful
    stop (SIGINT to itself: Flower then deactivates the node) when its parent, the site's launcher, dies."""
    from flwr.supernode.cli import flower_supernode

    from fedecho._proc import watch_parent

    flower_patches.check("supernode")
    flower_patches.shorter_supernode_polling(SUPERNODE_IDLE_POLL, SUPERNODE_LOCAL_POLL)
    flower_patches.supernode_heartbeat(SUPERNODE_HEARTBEAT_INTERVAL)
    state = Path(os.environ.get("FEDECHO_SITE_STATE") or Path.cwd())
    flower_patches.wrap_activation(_activation_handler(os.environ.get("FEDECHO_SITE_NAME", "this site"), state))
    watch_parent(lambda: os.kill(os.getpid(), signal.SIGINT))
    sys.argv = ["flower-supernode", *argv]
    sys.exit(flower_supernode())


def _serve_when_up(proc: subprocess.Popen[bytes], address: str, secret_file: Path) -> None:
    """serve() once the SuperNode's Runtime API listens: polling it earlier only fills the log with Flower's
    "Connection attempt failed" lines (the SuperNode takes seconds to start)."""
    from fedecho._proc import port_in_use

    host, _, port = address.rpartition(":")
    while proc.poll() is None and not port_in_use(host, int(port)):
        time.sleep(0.2)
    if proc.poll() is None:
        serve(address, secret_file, None)


def node(supernode: list[str], address: str, secret_file: Path, hold_fds: Sequence[int] = ()) -> int:
    """Start flower-supernode (same process group; it inherits hold_fds, the site's locks) and serve its ClientApp
    tasks until it exits. Ctrl-C, SIGTERM or the death of the parent (`fedecho client start`) stop the SuperNode
    cleanly; the runners left (the spare, a task's) are stopped as the launcher ends. Returns the SuperNode's exit
    code."""
    from fedecho._proc import stop_descendants, watch_parent

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    proc = subprocess.Popen(supernode, pass_fds=tuple(hold_fds))
    watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    threading.Thread(target=_serve_when_up, args=(proc, address, secret_file), daemon=True).start()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop at a time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        stop_descendants(os.getpid(), grace=5.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedecho.client.runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("executor", help="take ClientApp tasks from the SuperNode and run them")
    ex.add_argument("--runtime-api-address", required=True)
    ex.add_argument("--secret-file", required=True, type=Path)
    ex.add_argument("--parent-pid", type=int)
    nd = sub.add_parser("node", help="start flower-supernode (argv after --) with the runner beside it")
    nd.add_argument("--runtime-api-address", required=True)
    nd.add_argument("--secret-file", required=True, type=Path)
    nd.add_argument("--hold-fd", type=int, action="append", default=[], help="a lock descriptor to keep (and pass on)")
    nd.add_argument("supernode", nargs=argparse.REMAINDER)
    sn = sub.add_parser("flower-supernode", help="Flower's flower-supernode (its argv after --), polling sooner")
    sn.add_argument("supernode", nargs=argparse.REMAINDER)
    task = sub.add_parser("flwr-clientapp", help="run one ClientApp task, judging its bundle first")
    task.add_argument("--runtime-api-address", required=True)
    given = task.add_mutually_exclusive_group(required=True)
    given.add_argument("--token")
    given.add_argument("--token-stdin", action="store_true", help="start ahead; read the task token from stdin")
    task.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    if args.command in ("node", "flower-supernode"):  # the SuperNode's own arguments, after an optional "--"
        args.supernode = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
    if args.command == "flower-supernode":  # Flower configures its own logging
        supernode(args.supernode)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request (the runner polls 5 times a second)
    logging.getLogger("flwr").propagate = False  # Flower's logger has its own handler: each of its lines once
    if args.command == "node":
        sys.exit(node(args.supernode, args.runtime_api_address, args.secret_file, args.hold_fd))
    if args.command == "executor":
        with contextlib.suppress(KeyboardInterrupt):
            serve(args.runtime_api_address, args.secret_file, args.parent_pid)
    else:
        run_task(args.runtime_api_address, args.token, args.parent_pid)


if __name__ == "__main__":
    main()
