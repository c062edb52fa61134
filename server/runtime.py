"""The coordinator's ServerApp runner: it runs fedecho's own ServerApp and nothing else.

`fedecho server start` runs the SuperLink with `--isolation process`: the SuperLink then starts no ServerApp
itself. This module, part of the fedecho the coordinator installed, does instead:

- `executor`: takes ServerApp tasks from the SuperLink's Runtime API (`fedecho.fl.superexec`, requests signed
  with `<state>/runtime.secret`) and starts one `flwr-serverapp` runner per task;
- `flwr-serverapp`: Flower's `run_serverapp`, with the app bundle (FAB) judged right after it was pulled and
  before it is installed: only the code-less bundle that `fedecho server run` generates for this fedecho
  version runs (`fedecho.fl.bundle`). Any other bundle, however it reached the SuperLink (even from loopback),
  is refused: the run ends `failed` with the reason, the refusal is written to the server's access audit log,
  and nothing of the bundle is installed or imported.

The hook is applied by `fedecho.fl.flower_patches.serverapp_bundle_hook`, which checks first that the installed
Flower is the pinned one (flwr 1.42.0) and still has what it patches.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import sys
from pathlib import Path

from fedecho.fl.bundle import BundleError, read_bundle

log = logging.getLogger("fedecho.server.runtime")


class BundleRefused(RuntimeError):
    """The coordinator refused a run's app bundle (already audited)."""


def judge_bundle(fab: bytes) -> tuple[bool, str, str]:
    """(allowed, bundle hash, reason): the coordinator runs only fedecho's generated, code-less bundle."""
    try:
        bundle = read_bundle(fab)
    except BundleError as e:
        return False, "", str(e)
    if bundle.default_fedecho():
        return True, bundle.sha256, "the fedecho bundle (code-less, installed package)"
    what = bundle.describe()
    return False, bundle.sha256, f"app bundle {bundle.sha256} is not fedecho's code-less submission ({what})"


def record_refusal(server_config: Path, sha: str, reason: str) -> None:
    """Append the refusal to the server's access audit log (the store the server config names)."""
    from fedecho.server.config import load_server_config
    from fedecho.server.superlink import COORDINATOR
    from fedecho.storage.store import Store, store_url

    cfg = load_server_config(server_config)
    with Store(store_url(cfg.state, cfg.store)) as store:
        store.add_access(COORDINATOR, "bundle", f"app bundle {sha or '(unreadable)'}", "refused", reason)


class _QuietRefusal(logging.Filter):
    """Flower logs a ServerApp's exception with its traceback; a refused bundle is an event, not a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BundleRefused):
            record.msg, record.args, record.exc_info = "ServerApp refused by the coordinator: %s", (str(exc),), None
        return True


def run_task(address: str, token: str, root_certificates: Path | None, parent_pid: int | None, server: Path) -> None:
    """One ServerApp task: Flower's flwr-serverapp with the bundle judged before installation."""
    from queue import Queue

    from flwr.supercore.logger import mirror_output_to_queue, restore_output

    from fedecho.fl import flower_patches

    def judge(fab: bytes) -> None:
        allowed, sha, reason = judge_bundle(fab)
        if not allowed:
            try:
                record_refusal(server, sha, reason)
            except Exception as e:  # the refusal stands even if the audit cannot be written; say so
                log.error("could not write the refusal to the audit log: %s", e)
            raise BundleRefused(reason)

    run_serverapp = flower_patches.serverapp_bundle_hook(judge)
    logging.getLogger("flwr").addFilter(_QuietRefusal())
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)  # as flwr-serverapp does: `flwr run --stream` shows the run's output
    try:
        run_serverapp(
            runtime_api_address=address, log_queue=log_queue, token=token, insecure=root_certificates is None,
            certificates=root_certificates.read_bytes() if root_certificates else None, parent_pid=parent_pid,
            runtime_dependency_install=False,
        )  # fmt: skip
    finally:
        restore_output()


def runner_argv(address: str, root_certificates: Path | None, server: Path) -> list[str]:
    """A runner's command line; its task token comes on stdin (not in argv, which every local user can read)."""
    argv = [sys.executable, "-m", "fedecho.server.runtime", "flwr-serverapp", "--runtime-api-address", address,
            "--server-config", str(server)]  # fmt: skip
    return [*argv, "--root-certificates", str(root_certificates)] if root_certificates else argv


def executor(
    address: str, secret_file: Path, root_certificates: Path | None, server: Path, parent_pid: int | None
) -> None:
    """Take ServerApp tasks from the SuperLink and start a runner for each, until the parent dies; meanwhile
    copy the public front's refusals into the server's access audit log."""
    import threading

    from fedecho.fl.flower_patches import check
    from fedecho.fl.superexec import hand_token, serve
    from fedecho.server.config import load_server_config
    from fedecho.server.front import watch_refusals

    check("serverapp")
    threading.Thread(target=watch_refusals, args=(load_server_config(server),), daemon=True).start()

    def launch(token: str) -> None:  # hand_token reaps the runner when its task ends (no zombie is left)
        hand_token(subprocess.Popen(runner_argv(address, root_certificates, server), stdin=subprocess.PIPE), token)

    serve(address, secret_file, "flwr-serverapp", launch, parent_pid=parent_pid, root_certificates=root_certificates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedecho.server.runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("executor", "take ServerApp tasks from the SuperLink"), ("flwr-serverapp", "run one task")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--runtime-api-address", required=True)
        p.add_argument("--root-certificates", type=Path, help="CA of the SuperLink's TLS (omit: plain HTTP)")
        p.add_argument("--server-config", required=True, type=Path, help="the coordinator's server.toml")
        p.add_argument("--parent-pid", type=int)
        if name == "executor":
            p.add_argument("--secret-file", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "executor":  # a ServerApp task logs as under Flower's own runner (its output is the run's log)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("httpx", "alembic"):  # a line per request, per plugin: not what an operator reads
            logging.getLogger(noisy).setLevel(logging.WARNING)
        with contextlib.suppress(KeyboardInterrupt):
            executor(args.runtime_api_address, args.secret_file, args.root_certificates, args.server_config,
                     args.parent_pid)  # fmt: skip
    else:
        token = sys.stdin.readline().strip()
        if token:
            run_task(args.runtime_api_address, token, args.root_certificates, args.parent_pid, args.server_config)


if __name__ == "__main__":
    main()
