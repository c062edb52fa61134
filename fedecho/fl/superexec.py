"""fedecho's own SuperExec: take app tasks from a Flower Runtime API and hand each to a runner fedecho installed.

Flower's SuperLink and SuperNode, started with `--isolation process`, start no ServerApp or ClientApp
themselves: a SuperExec asks their Runtime API for tasks (`AcquireTask`, signed with a secret that only the
Flower process and its SuperExec hold, so no other process can take a task) and starts one process per task.
fedecho runs this loop in place of Flower's `flower-superexec` on both ends, so that the process that pulls a
run's app bundle is fedecho's (`fedecho.server.runtime`, `fedecho.client.runtime`) and judges the bundle
before any of it is installed or imported.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fedecho.superexec")
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


def hand_token(runner: subprocess.Popen[bytes], token: str) -> None:
    """Give a runner started with stdin=PIPE its task token on stdin (argv is readable by every local user), then
    reap it when its task ends: nothing else waits for a runner once it has its task, and an exited child that
    nobody waits for stays in the process table as a zombie for as long as the SuperExec runs (one per round at
    a site)."""
    assert runner.stdin is not None
    runner.stdin.write(token.encode() + b"\n")
    runner.stdin.close()
    threading.Thread(target=_reap, args=(runner,), name=f"reap-{runner.pid}", daemon=True).start()


def _reap(runner: subprocess.Popen[bytes]) -> None:
    code = runner.wait()
    log.debug("runner %d exited with code %d", runner.pid, code)


def serve(
    address: str,
    secret_file: Path,
    task_type: str,
    launch: Callable[[str], None],
    *,
    parent_pid: int | None = None,
    root_certificates: Path | None = None,
    poll: float = 0.2,
) -> None:
    """Acquire tasks of `task_type` ("flwr-serverapp", "flwr-clientapp") and call launch(token) for each, until
    the parent dies (or forever). TLS to the Runtime API when root_certificates is given."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates.read_bytes() if root_certificates is not None else None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret_file.read_bytes(), protected_methods={ACQUIRE}),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    try:
        while True:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
            except Exception as e:  # the Runtime API is not up yet, or restarting
                log.debug("AcquireTask: %s", e)
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                launch(res.token)
                continue  # another task may be waiting
            time.sleep(poll)
    finally:
        client.close()
