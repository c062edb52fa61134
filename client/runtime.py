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

The hook is a replacement of `pull_task_input` in Flower's `run_clientapp` module, for flwr 1.42.0 (pinned);
`check_flower` fails loudly if that function ever goes away.

Transport (measured per round, issue 6 item 5): the runner unpacks the message's arrays after the pull and
packs the reply's before the push (`fedecho.fl.packing`: one object per tensor cost 20-60 s a round), retries
its pull of the arrays sooner than Flower would (`QUICK_PULL`), and `flower-supernode` runs Flower's SuperNode
with its 3 s idle wait shortened (`_SuperNodeClock`).

Starting a Python process that imports torch, Flower and fedecho takes seconds (8-11 s on a busy 2-core
machine), once per message. So the runner keeps one spare runner started ahead (`--token-stdin`): it imports
the site's installed fedecho ClientApp, Flower's runner and torch, then waits for a task token on stdin.
Only code the site installed is imported ahead; the bundle is still judged before anything of it is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedecho.client.approval import Bundle, BundleError, judge, read_bundle
from fedecho.client.audit import BUNDLE_ENV, SiteLog

log = logging.getLogger("fedecho.client.runtime")

ERROR_REFUSED = 103  # fedecho.client.app.ERROR_REFUSED (not imported: that module loads torch)


class BundleRefused(RuntimeError):
    """The site refused the run's app bundle; the refusal has already been sent and logged."""


def check_flower() -> Any:
    """Flower's run_clientapp module, checked to still have the function fedecho hooks."""
    from flwr.supernode.runtime import run_clientapp as rc

    if not callable(getattr(rc, "pull_task_input", None)) or not callable(getattr(rc, "push_message", None)):
        raise RuntimeError("this flwr has no run_clientapp.pull_task_input/push_message: code approval cannot hook it")
    return rc


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


def gate(rc: Any, client: Any, message: Any, context: Any, fab: Any) -> Bundle:
    """Allow the bundle (returns it) or answer the message with a refusal and raise BundleRefused."""
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
    rc.push_message(client, Message(Error(code=ERROR_REFUSED, reason=reason), reply_to=message), context)
    raise BundleRefused(reason)


def run_task(address: str, token: str | None, parent_pid: int | None) -> None:
    """One ClientApp task: Flower's run_clientapp with the bundle judged before installation.

    token None: a spare runner; import what every task needs first, then read the token from stdin
    (end of input, i.e. the runner went away without a task for it: exit)."""
    rc = check_flower()
    if token is None:
        import fedecho.client.app  # noqa: F401  (the site's installed ClientApp, and torch with it)

        token = sys.stdin.readline().strip()
        if not token:
            return
    from fedecho.fl.packing import QUICK_PULL, pack_in_place, unpack_message

    pull, push = rc.pull_task_input, rc.push_message
    # The SuperNode hands the task out before it has the message's arrays from the SuperLink: Flower's first
    # retry comes after 1 s (then 2, 4, ...), a second or more of every round; look again sooner (a local call).
    rc.pull_and_inflate_object_from_tree = functools.partial(rc.pull_and_inflate_object_from_tree, **QUICK_PULL)

    def pull_and_judge(client: Any) -> tuple[Any, Any, Any, Any]:
        message, context, run, fab = pull(client)
        gate(rc, client, message, context, fab)
        return unpack_message(message), context, run, fab  # the arrays travel packed (fedecho.fl.packing)

    def push_packed(client: Any, message: Any, context: Any) -> None:
        push(client, pack_in_place(message), context)  # the reply's arrays as one object, not one per tensor

    rc.pull_task_input = pull_and_judge
    rc.push_message = push_packed
    rc.run_clientapp(
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

    check_flower()
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


SUPERNODE_IDLE_POLL = 0.5  # s between a SuperNode's requests for a new message while it has none (flwr: 3 s)
SUPERNODE_LOCAL_POLL = 0.1  # s between its looks for the ClientApp's reply, in its own memory (flwr: 0.5 s)


class _SuperNodeClock:
    """The `time` module as Flower's SuperNode loop (flwr.supernode.start_client_internal) sees it, with shorter
    waits: flwr 1.42 sleeps 3 s after every pull that found no message and 0.5 s between looks for a reply, so
    a round's message waited 1.5 s on average (up to 3 s) before its site saw it, and the reply up to 0.5 s more
    (measured: about 2 s of every round, 20 % of a 10 s round). An idle pull is one small request."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(SUPERNODE_IDLE_POLL if seconds >= 1 else min(seconds, SUPERNODE_LOCAL_POLL))


def supernode(argv: list[str]) -> None:
    """Flower's flower-supernode (same arguments) with `_SuperNodeClock` in its message loop."""
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.cli import flower_supernode

    if getattr(sci, "time", None) is not time or not callable(getattr(sci, "_pull_and_store_message", None)):
        raise RuntimeError("this flwr's SuperNode loop has changed: fedecho cannot shorten its polling")
    sci.time = _SuperNodeClock()  # type: ignore[assignment]
    sys.argv = ["flower-supernode", *argv]
    sys.exit(flower_supernode())


def node(supernode: list[str], address: str, secret_file: Path) -> int:
    """Start flower-supernode (same process group) and serve its ClientApp tasks until it exits; Ctrl-C or
    SIGTERM stop the SuperNode cleanly. Returns the SuperNode's exit code."""
    import signal
    import threading

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    proc = subprocess.Popen(supernode)
    threading.Thread(target=serve, args=(address, secret_file, None), daemon=True).start()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


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
    if args.command == "node":
        sys.exit(node(args.supernode, args.runtime_api_address, args.secret_file))
    if args.command == "executor":
        with contextlib.suppress(KeyboardInterrupt):
            serve(args.runtime_api_address, args.secret_file, args.parent_pid)
    else:
        run_task(args.runtime_api_address, args.token, args.parent_pid)


if __name__ == "__main__":
    main()
