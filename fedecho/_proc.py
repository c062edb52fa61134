"""The Flower processes fedecho supervises: their environment, start in their own session, clean stop.

Every Flower process gets FLWR_HOME inside a fedecho state folder (so connection configs, installed app
bundles and credentials never land in ~/.flwr) and telemetry and update checks forced off. Each runs in
its own session, so a Ctrl-C in the operator's terminal reaches fedecho only, which then stops the
children in order (SIGINT, then SIGTERM, then SIGKILL for the whole group).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from fedecho._env import NO_TELEMETRY

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
FLOWER_ENV_OFF = {k: v for k, v in NO_TELEMETRY.items() if k.startswith("FLWR_")}


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ plus FLWR_HOME, telemetry off (forced, not defaulted) and this venv's bin first on PATH.

    The SuperLink and SuperNode start `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name,
    so the bin folder of the interpreter running fedecho must come first.
    """
    env = dict(os.environ)
    env.update(FLOWER_ENV_OFF)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir)])
    env.update(extra or {})
    return env


def ensure_secret(path: Path) -> Path:
    """A random secret file (0600, created once): signs a runner's task requests to a Flower Runtime API."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
    return path


def flower_bin(name: str) -> str:
    """The Flower console script beside this interpreter (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def spawn(
    argv: Sequence[str], env: dict[str, str], log: Path, cwd: Path | None = None, pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:
    """Start argv in a new session (its own process group), stdout and stderr appended to `log`; `pass_fds`
    stay open in the child (e.g. the descriptors of locks it is to hold)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, pass_fds=tuple(pass_fds),
        )  # fmt: skip


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process from /proc; None when it is gone (or there is no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., starttime (22nd field)
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every live descendant of pid (Linux; {} without /proc)."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[2] != "Z":
                children.setdefault(st[0], []).append(int(entry.name))
                started[int(entry.name)] = st[1]
    found: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = started[child]
        todo.extend(children.get(child, []))
    return found


def _kill_detached(processes: dict[int, int], grace: float) -> None:
    """SIGTERM, then SIGKILL after grace, each process still alive and still the same (start time unchanged)."""

    def alive() -> list[int]:
        return [p for p, t in processes.items() if (st := _stat(p)) is not None and st[1] == t and st[2] != "Z"]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if wait_for(lambda: not alive(), grace, interval=0.1):
            return


def stop_descendants(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after grace, every live descendant of pid (a supervisor's leftovers as it exits)."""
    _kill_detached(descendants(pid), grace)


def pid_alive(pid: int) -> bool:
    """True while process pid exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[2] != "Z"


def parent_of(pid: int) -> int | None:
    """The parent pid of a live process (None when it is gone)."""
    st = _stat(pid)
    return st[0] if st is not None and st[2] != "Z" else None


def watch_parent(on_orphaned: Callable[[], None], interval: float = 0.5) -> threading.Thread:
    """Call on_orphaned() once, from a daemon thread, when this process's parent dies (it is then re-parented:
    getppid changes), so that a SIGKILL of a supervisor does not leave its children running."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_orphaned()

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> int:
    """Stop a spawned Flower process: SIGINT (it shuts down its own children), then SIGTERM, then SIGKILL.

    Returns its exit code. The group is signalled too, so a ClientApp or ServerApp still running in the
    group does not outlive its parent. Descendants in sessions of their own are stopped as well: the SuperLink
    starts its SuperExec with start_new_session, and a ServerApp that the SuperExec started and that is
    blocked in Flower's retry loop (a push to the SuperLink under way) ignores the SIGINT its parent monitor
    raises in another thread, so it would outlive the SuperLink for good and could reconnect to a restarted one.
    """
    detached = descendants(proc.pid) if proc.poll() is None else {}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
    _signal_group(proc, signal.SIGTERM)  # leftovers of the group, if any
    _kill_detached(detached, grace=5.0)
    return proc.returncode


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 / ::1: the only hosts --insecure is allowed on."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def strip_ansi(text: str) -> str:
    """text without terminal colour codes (Flower colours its log lines even into a file)."""
    return _ANSI.sub("", text)


def rotate_log(path: Path, keep: int = 5) -> None:
    """Move path to path.1 (path.1 to path.2, ... up to `keep` generations), so a new start's log holds only its own
    lines: what a supervisor reads to judge this start (node id, refusal) can never be an earlier start's line."""
    if not path.exists():
        return
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file (empty if missing): to show why a process died."""
    try:
        return "\n".join(_ANSI.sub("", path.read_text(errors="replace")).splitlines()[-lines:])
    except OSError:
        return ""


class LogFollower:
    """Read a growing log file incrementally (the CLI echoes a child's log while it supervises it)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    @classmethod
    def from_end(cls, path: Path) -> LogFollower:
        """Follow only what is written from now on (the log of an earlier start stays unechoed)."""
        follower = cls(path)
        if path.exists():
            follower.offset = path.stat().st_size
        return follower

    def read_new(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1  # only whole lines
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


class LockBusy(RuntimeError):
    """Another live process holds the lock; `holder` is what it wrote into the lock file ({} if unreadable)."""

    def __init__(self, path: Path, holder: dict[str, object]) -> None:
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path, self.holder = path, holder


def read_lock(path: Path) -> dict[str, object]:
    """What the holder of a lock file wrote into it ({} when missing or unreadable)."""
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_lock(fd: int, holder: dict[str, object]) -> None:
    """Replace the holder record in a lock file this process holds (e.g. with the pid of the child it passed to)."""
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def lock_file(path: Path, holder: dict[str, object], wait: float = 0.0, readonly: bool = False) -> int:
    """An exclusive flock on path (created if missing), with `holder` (JSON) written into it; returns the descriptor.

    The kernel releases the lock when the last process holding the descriptor exits, however it ends, so a crashed
    holder never blocks a restart. Pass the descriptor to a child (spawn's pass_fds) and it holds the lock too.
    readonly: lock an existing file without writing to it (e.g. a private key in a read-only folder). Raises
    LockBusy, naming what the holder wrote, when another process still holds it after `wait` seconds."""
    fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise LockBusy(path, {} if readonly else read_lock(path)) from None
            time.sleep(0.2)
    if not readonly:
        write_lock(fd, holder)
    return fd


def port_in_use(host: str, port: int) -> bool:
    """True when a TCP port on host cannot be bound because something listens there (or binds it) now."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no user
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def listening_pid(port: int) -> int | None:
    """The pid of a process (of this user: others' are unreadable) listening on TCP port, from /proc; None if none
    is found."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])  # state 0A: LISTEN
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in (entry / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) in wanted:
                            return int(entry.name)
    return None


def cmdline(pid: int) -> list[str]:
    """A process's argv from /proc ([] when gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    """Poll predicate() until it is truthy or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Make SIGTERM and SIGINT both end a foreground supervisor with KeyboardInterrupt (SIGINT also when
    started from a shell that ignores it), so its `finally` stops the child cleanly."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


class StateFolder:
    """The layout of a Flower process's state folder, shared by the server's and the sites' configs."""

    state: Path

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr"

    @property
    def logs(self) -> Path:
        return self.state / "logs"
