"""Run a hospital's Flower SuperNode: argv and environment from site.toml, start, connection check, stop.

The SuperNode dials the SuperLink over TLS (trusting only the federation CA), signs its requests with the
site's private key (the coordinator registered the public one), and serves its local Runtime API port with
`--isolation process`: the ClientApp processes are started not by Flower but by the site's own runner
(`fedecho.client.runtime`, in the SuperNode's process group), which judges each run's app bundle before any
of its code is installed (code approval). The runner's task requests are signed with a secret in the state
folder (mode 0600). The ClientApp learns where the site's settings are from the node config key
`site-config` (absolute path of site.toml), written to a small TOML file so that any path survives quoting.

One site per state folder, cache folder, private key and Runtime API port: `claim_site` takes an exclusive
lock (flock) in the state and cache folders and beside the key, and checks the port, before anything is
written; a second site sharing any of them is refused, naming the field, the path or port and who holds it.
The locks pass to the site's launcher and its SuperNode, and die with them (a crashed site's locks never
block its restart).

Each start rotates the SuperNode's log (`supernode.log` -> `supernode.log.1`, ...), so `SuperNodeWatch`
judges a start (node id, refusal, waiting) only from lines that start wrote. The SuperNode wrapper
(`fedecho.client.runtime flower-supernode`) writes one line `fedecho-site: KIND: text` when it released a
node the coordinator still counted online, or when the coordinator refused the site.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedecho._proc import (
    LockBusy,
    LogFollower,
    cmdline,
    ensure_secret,
    flower_env,
    listening_pid,
    lock_file,
    parent_of,
    pid_alive,
    port_in_use,
    rotate_log,
    spawn,
    strip_ansi,
    tail,
    write_lock,
)
from fedecho.client.config import SiteConfig
from fedecho.security.certs import split_host_port
from fedecho.storage.files import atomic_write_bytes

# Flower's exit code (logged; the process itself exits 1) when the SuperNode could not connect: the SuperLink
# refused to activate it (e.g. its public key is not registered), or TLS failed.
EXIT_ACTIVATION_REFUSED = 305
EVENT_PREFIX = "fedecho-site:"  # a line of the site's SuperNode wrapper for its supervisor: "fedecho-site: KIND: text"
# KINDs: "released" (a node still counted online was released), and the refusals below
REFUSALS = ("unregistered", "online", "tls", "port", "refused")
LOCK_NAME = "fedecho-site.lock"  # in the state folder and the cache folder: the same name, so crossed folders clash
CLAIM_GRACE = 8.0  # s a start waits for the locks of a site whose processes are stopping (their supervisor died)
WAIT_REPORT = 30.0  # s between two "waiting for the coordinator" lines

_EVENT = re.compile(rf"^{EVENT_PREFIX} ([a-z-]+): (.*)$")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RELEASED = re.compile(r"released node (\d+)")
_RETRY = re.compile(r"Connection attempt failed")
_RECONNECTED = re.compile(r"Connection successful after [\d.]+ seconds and (\d+) tries")
_TLS = re.compile(r"SSL/TLS handshake error detected")
_PORT_BUSY = re.compile(r"\[Errno 98\]|address already in use", re.IGNORECASE)
_REFUSED = re.compile(rf"Exit Code: {EXIT_ACTIVATION_REFUSED}\b|Failed to activate SuperNode")


class SuperNodeError(RuntimeError):
    """The SuperNode could not start or was refused by the SuperLink."""


class SiteClash(SuperNodeError):
    """Another running site holds this site's state folder, cache folder, private key or Runtime API port."""


def node_config_file(site: SiteConfig) -> Path:
    """Write <state>/node-config.toml: `site-config` (absolute site.toml path) and `site-name`."""
    path = site.state / "node-config.toml"
    data = {"site-config": str(site.path), "site-name": site.name}
    atomic_write_bytes(path, tomli_w.dumps(data).encode())
    return path


def runtime_secret(site: SiteConfig) -> Path:
    """<state>/runtime.secret (0600, created once): signs the runner's task requests to the SuperNode."""
    return ensure_secret(site.state / "runtime.secret")


def check_site_files(site: SiteConfig) -> None:
    """Fail early, naming the file and the field, when the CA or the key is missing."""
    if site.ca is None:
        raise SuperNodeError(f"{site.path}: [superlink].ca is required (the federation's ca.pem)")
    if site.private_key is None:
        raise SuperNodeError(f"{site.path}: [superlink].private_key is required (from `fedecho certs site`)")
    for key, f in (("ca", site.ca), ("private_key", site.private_key)):
        if not f.is_file():
            raise SuperNodeError(f"{site.path}: [superlink].{key} = {f} does not exist")
    if site.private_key.stat().st_mode & 0o077:
        raise SuperNodeError(f"{site.private_key}: private key readable by others; run `chmod 600 {site.private_key}`")


# --- one site per state folder, cache folder, key and port ---------------------------------------------------


@dataclass
class SiteClaim:
    """The locks of one site's start (descriptors of flock'ed files, each with its role). `start_supernode` passes
    them to the launcher and closes this process's copies: from then on they live as long as the site's processes."""

    site: SiteConfig
    locks: list[tuple[int, str]] = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        return [fd for fd, _ in self.locks]

    def holder(self, pid: int, role: str, parent: int | None = None) -> dict[str, object]:
        return {"site": self.site.name, "config": str(self.site.path), "pid": pid, "parent": parent, "role": role}

    def hand_to(self, pid: int) -> None:
        """Name pid (the launcher, a child of this process) as the holder in each lock file (a read-only lock has
        no record: skipped)."""
        for fd, role in self.locks:
            with contextlib.suppress(OSError):
                write_lock(fd, self.holder(pid, role, parent=os.getpid()))

    def release(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.locks.clear()

    def __enter__(self) -> SiteClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_ROLES = {"state": "state folder", "cache": "cache folder", "key": "private key"}


def _claims(site: SiteConfig, insecure: bool) -> list[tuple[str, str, Path, Path, bool]]:
    """(role, field, shown path, lock file, readonly) for each thing only one site may use."""
    out: list[tuple[str, str, Path, Path, bool]] = []
    folders: set[Path] = set()
    for role, folder in (("state", site.state), ("cache", site.cache)):
        folder = folder.resolve()
        if folder not in folders:  # a site whose cache is its state folder locks it once
            folders.add(folder)
            out.append((role, f"[site].{role}", folder, folder / LOCK_NAME, False))
    if not insecure and site.private_key is not None:
        key = site.private_key.resolve()
        beside = key.with_name(key.name + ".lock")
        readonly = not os.access(key.parent, os.W_OK) and not beside.exists()
        out.append(("key", "[superlink].private_key", key, key if readonly else beside, readonly))
    return out


def _who(holder: dict[str, object]) -> str:
    if not holder.get("site"):
        return "another running process"
    return f"site {holder['site']} ({holder.get('config')}, pid {holder.get('pid')})"


def _stopping(holder: dict[str, object]) -> bool:
    """True when the lock's holder is on its way out: dead (a child of it still holds the lock for a moment), or
    orphaned (the `fedecho client start` that started it was killed: it is stopping the site)."""
    pid, parent = holder.get("pid"), holder.get("parent")
    if not isinstance(pid, int):
        return False
    return not pid_alive(pid) or (isinstance(parent, int) and parent_of(pid) != parent)


def claim_site(site: SiteConfig, insecure: bool = False) -> SiteClaim:
    """Lock this site's state folder, cache folder and private key, and check its Runtime API port is free;
    raise SiteClash naming the field, the path (resolved) or port, and the site or process that holds it."""
    claim = SiteClaim(site)
    try:
        for role, fieldname, shown, lock, readonly in _claims(site, insecure):
            if not readonly:
                lock.parent.mkdir(parents=True, exist_ok=True)
            try:
                try:
                    fd = lock_file(lock, claim.holder(os.getpid(), role), readonly=readonly)
                except LockBusy as busy:
                    if not _stopping(busy.holder):
                        raise
                    fd = lock_file(lock, claim.holder(os.getpid(), role), wait=CLAIM_GRACE, readonly=readonly)
            except LockBusy as busy:
                if busy.holder.get("config") == str(site.path):
                    pid = busy.holder.get("pid")
                    raise SiteClash(
                        f"site {site.name} is already running from {site.path} (pid {pid}, lock {lock}): stop it "
                        f"first (Ctrl-C in its terminal, or `kill {pid}`)"
                    ) from None
                theirs = _ROLES.get(str(busy.holder.get("role", "")), "")
                raise SiteClash(
                    f"{site.path}: {fieldname} = {shown} is in use by {_who(busy.holder)}"
                    + (f" as its {theirs}" if theirs else "")
                    + f": each site on a machine needs its own {_ROLES[role]} (lock {lock})"
                ) from None
            claim.locks.append((fd, role))
        check_port(site)
    except BaseException:
        claim.release()
        raise
    return claim


def _describe_pid(pid: int) -> str:
    """A fedecho site's launcher or SuperNode, named by its site; any other process by its command line."""
    argv = cmdline(pid)
    if "--node-config" in argv and argv.index("--node-config") + 1 < len(argv):
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
            conf = tomllib.loads(Path(argv[argv.index("--node-config") + 1]).read_text())
            return f"site {conf.get('site-name')} ({conf.get('site-config')}, pid {pid})"
    return f"pid {pid} ({' '.join(argv)[:120] or 'unknown'})"


def check_port(site: SiteConfig) -> None:
    """Raise SiteClash when [supernode].port is taken on [supernode].host, naming who listens there."""
    if not port_in_use(site.supernode_host, site.supernode_port):
        return
    pid = listening_pid(site.supernode_port)
    who = _describe_pid(pid) if pid is not None else "another process"
    raise SiteClash(
        f"{site.path}: [supernode].port = {site.supernode_port} on {site.supernode_host} is in use by {who}: "
        "each SuperNode on a machine needs its own port"
    )


# --- before connecting: is the coordinator there, and does it speak what this site speaks? -----------------


@dataclass(frozen=True)
class Reach:
    """What a probe of the SuperLink address found. fatal: retrying cannot help (TLS on one end only, a
    certificate the federation CA does not vouch for)."""

    ok: bool
    reason: str = ""
    fatal: bool = False


def _handshake(sock: socket.socket, context: ssl.SSLContext, host: str | None) -> None:
    with context.wrap_socket(sock, server_hostname=host) as tls:
        tls.do_handshake()


def _speaks_plain_http(host: str, port: int, timeout: float) -> bool:
    """True when host:port answers a plain HTTP request (a front started with --insecure)."""
    try:
        with socket.create_connection((host, port), timeout) as sock:
            sock.sendall(f"GET /health HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


def probe_superlink(site: SiteConfig, insecure: bool = False, timeout: float = 5.0) -> Reach:
    """Connect to [superlink].address: reachable? TLS at both ends or at neither (a TLS handshake with the
    federation CA; with --insecure, a handshake that succeeds means the coordinator speaks TLS)?"""
    host, port = split_host_port(site.superlink)
    assert port is not None
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout)
    except socket.gaierror:
        return Reach(False, f"{host} does not resolve")
    except ConnectionRefusedError:
        return Reach(False, "connection refused")
    except TimeoutError:
        return Reach(False, f"no answer within {timeout:.0f} s")
    except OSError as e:
        return Reach(False, e.strerror or str(e))
    sock.settimeout(timeout)
    if insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            _handshake(sock, context, None)
        except (ssl.SSLError, OSError):
            return Reach(True)  # no TLS there: plain HTTP at both ends
        return Reach(
            False,
            f"the coordinator at {where} speaks TLS, but this site was started with --insecure (plain HTTP): start "
            f"it without --insecure, with [superlink].ca and [superlink].private_key set in {site.path}",
            fatal=True,
        )
    assert site.ca is not None
    try:
        context = ssl.create_default_context(cafile=str(site.ca))
        _handshake(sock, context, host)
    except ssl.SSLCertVerificationError as e:
        return Reach(
            False,
            f"the coordinator at {where} presented a certificate that [superlink].ca = {site.ca} does not vouch for "
            f"({e.verify_message}): is it this federation's ca.pem, and is {host} in the server certificate's names "
            "(`fedecho certs init --server-address`, `--san`)?",
            fatal=True,
        )
    except (ssl.SSLError, OSError) as e:
        sock.close()
        if _speaks_plain_http(host, port, timeout):
            return Reach(
                False,
                f"the coordinator at {where} speaks plain HTTP (it was started with --insecure), but this site "
                "uses TLS: the coordinator must run with TLS (`fedecho server start` without --insecure), or, on "
                "loopback for development only, start this site with --insecure too",
                fatal=True,
            )
        return Reach(False, f"TLS handshake with {where} failed: {e}", fatal=isinstance(e, ssl.SSLError))
    return Reach(True)


# --- start ---------------------------------------------------------------------------------------------------


def supernode_argv(site: SiteConfig, insecure: bool = False) -> list[str]:
    """The flower-supernode command line for this site (TLS + node authentication unless insecure), run through
    `fedecho.client.runtime flower-supernode`: Flower's SuperNode with shorter polling."""
    argv = [
        sys.executable, "-m", "fedecho.client.runtime", "flower-supernode", "--",
        "--superlink", site.superlink,
        "--node-config", str(node_config_file(site)),
        "--isolation", "process",
        "--superexec-auth-secret-file", str(runtime_secret(site)),
        "--host", site.supernode_host,
        "--port", str(site.supernode_port),
    ]  # fmt: skip
    if insecure:
        return [*argv, "--insecure"]
    assert site.ca is not None and site.private_key is not None
    return [*argv, "--root-certificates", str(site.ca), "--auth-supernode-private-key", str(site.private_key)]


def supernode_env(site: SiteConfig) -> dict[str, str]:
    """FLWR_HOME in the site's state folder (app bundles install there), telemetry off, threads pinned; the site's
    name and state folder for the SuperNode wrapper (its messages, and the node id it remembers)."""
    return flower_env(
        site.flwr_home,
        {
            "FEDECHO_THREADS": str(site.threads),
            "OMP_NUM_THREADS": str(site.threads),
            "FEDECHO_SITE_NAME": site.name,
            "FEDECHO_SITE_STATE": str(site.state.resolve()),
        },
    )


def start_supernode(
    site: SiteConfig, insecure: bool = False, log: Path | None = None, claim: SiteClaim | None = None
) -> subprocess.Popen[bytes]:
    """Start the site's launcher (flower-supernode and the ClientApp runner) in its own session; output to
    <state>/logs/supernode.log (or `log`), rotated first so that it holds this start's lines only.

    The site's locks (`claim`, or claimed here: SiteClash when another site holds any of them) pass to the
    launcher; this process's copies are closed, so a later start from this same process is not refused."""
    if not insecure:
        check_site_files(site)
    claim = claim or claim_site(site, insecure)
    with claim:
        site.state.mkdir(parents=True, exist_ok=True)
        site.flwr_home.mkdir(parents=True, exist_ok=True)
        log = log or site.logs / "supernode.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(log)
        proc = spawn(node_argv(site, insecure, claim.fds), supernode_env(site), log, cwd=site.state, pass_fds=claim.fds)
        claim.hand_to(proc.pid)
    return proc


def node_argv(site: SiteConfig, insecure: bool = False, hold_fds: list[int] | None = None) -> list[str]:
    """The site's launcher (`python -m fedecho.client.runtime node`): it starts flower-supernode and runs the
    ClientApp runner beside it, all in one process group, and exits with the SuperNode's exit code. hold_fds:
    the site's lock descriptors, which the launcher keeps and passes on to flower-supernode."""
    return [
        sys.executable, "-m", "fedecho.client.runtime", "node",
        "--runtime-api-address", f"{site.supernode_host}:{site.supernode_port}",
        "--secret-file", str(runtime_secret(site)),
        *(a for fd in hold_fds or [] for a in ("--hold-fd", str(fd))),
        "--", *supernode_argv(site, insecure),
    ]  # fmt: skip


# --- judging a start from its log ----------------------------------------------------------------------------


def _tries(n: int) -> str:
    return f"{n} {'try' if n == 1 else 'tries'}"


@dataclass(frozen=True)
class Event:
    """What one log line of this start means. kind: "line" (anything else), "connected", "released", "waiting",
    "reached", "refused" (refusal: one of REFUSALS)."""

    kind: str
    text: str = ""
    node_id: int | None = None
    refusal: str = ""


def refusal_message(site: SiteConfig, refusal: str, detail: str = "") -> str:
    """One message saying why the coordinator (or the machine) did not take this site, and what to do."""
    where = site.superlink
    if refusal == "unregistered":
        key = site.public_key.name if site.public_key else f"{site.name}.pub"
        return (
            f"the coordinator at {where} refused site {site.name}: its public key is not registered there. The "
            f"coordinator's operator puts {key} ([superlink].public_key) in its keys folder and runs `fedecho server "
            "register` (`fedecho server start` registers the keys folder too)"
            + (
                ". (Had this site run before from another state folder, the coordinator might instead still count it "
                "online: it counts a silent site offline after about 20 s)"
                if "on record" in detail
                else ""
            )
        )
    if refusal == "online":
        return (
            f"the coordinator at {where} still counts site {site.name} online from an earlier start and did not "
            f"release it ({detail}); it counts a silent site offline after about 20 s: start again then"
        )
    if refusal == "tls":
        return (
            f"TLS with the coordinator at {where} failed ({detail or 'handshake error'}): check [superlink].ca "
            f"in {site.path} is the federation's ca.pem, and that both ends use TLS (or, on loopback, neither)"
        )
    if refusal == "port":
        return (
            f"{site.path}: [supernode].port = {site.supernode_port} on {site.supernode_host} is in use by another "
            "process: each SuperNode on a machine needs its own port"
        )
    return f"the coordinator at {where} refused site {site.name} (Flower exit code {EXIT_ACTIVATION_REFUSED}): {detail}"


class SuperNodeWatch:
    """Reads this start's SuperNode log (start_supernode rotated it: no line of an earlier start) and says what
    happened: connected (node id), a node released, waiting for the coordinator (Flower's retries summed up in one
    line naming the address and the cause), reached again, refused (why). Lines after a refusal are Flower's
    exit report: kept in the log, not repeated."""

    def __init__(self, site: SiteConfig, log: Path, insecure: bool = False) -> None:
        self.site, self.insecure = site, insecure
        self.follower = LogFollower(log)
        self.node_id: int | None = None
        self.refusal: Event | None = None
        self.tries = 0
        self._reported = 0.0

    def poll(self) -> list[Event]:
        out: list[Event] = []
        for line in self.follower.read_new():
            event = None if self.refusal else self._judge(strip_ansi(line))
            if event is not None:
                out.append(event)
                if event.kind == "refused":
                    self.refusal = event
        return out

    def _waiting(self) -> Event | None:
        self.tries += 1
        now = time.monotonic()
        if self.tries > 1 and now - self._reported < WAIT_REPORT:
            return None
        self._reported = now
        reach = probe_superlink(self.site, self.insecure, timeout=2.0)
        reason = reach.reason if not reach.ok else "its front answers, its SuperLink does not (yet)"
        return Event(
            "waiting", f"waiting for the coordinator at {self.site.superlink} ({reason}, {_tries(self.tries)})"
        )

    def _judge(self, line: str) -> Event | None:
        if match := _EVENT.match(line.strip()):
            kind, text = match.groups()
            if kind == "released":
                released = _RELEASED.search(text)
                return Event("released", text, node_id=int(released.group(1)) if released else None)
            return Event("refused", refusal_message(self.site, kind, text), refusal=kind)
        if match := _NODE_ID.search(line):
            self.node_id = int(match.group(1))
            return Event("connected", line, node_id=self.node_id)
        if _RETRY.search(line):
            return self._waiting()
        if match := _RECONNECTED.search(line):
            tries, self.tries = self.tries, 0
            return Event(
                "reached", f"reached the coordinator at {self.site.superlink} after {_tries(tries or int(match[1]))}"
            )
        if _TLS.search(line):
            return Event("refused", refusal_message(self.site, "tls"), refusal="tls")
        if _PORT_BUSY.search(line):
            return Event("refused", refusal_message(self.site, "port"), refusal="port")
        if _REFUSED.search(line):
            detail = f"its log: {self.follower.path}"
            return Event("refused", refusal_message(self.site, "refused", detail), refusal="refused")
        return Event("line", line)


def wait_connected(
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 60.0,
    site: SiteConfig | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> int:
    """Block until the SuperNode is connected (returns its node id); raise SuperNodeError, saying why, if it is
    refused, exits or times out. site: read from the node config beside the state folder when not given."""
    if site is None:
        from fedecho.client.config import load_site_config

        conf = tomllib.loads((log.parent.parent / "node-config.toml").read_text())
        site = load_site_config(conf["site-config"])
    watch = SuperNodeWatch(site, log)
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None
        for event in watch.poll():
            if on_event is not None:
                on_event(event)
            if event.kind == "connected" and event.node_id is not None:
                return event.node_id
            if event.kind == "refused":
                raise SuperNodeError(f"{event.text}\n{tail(log)}")
        if exited:
            raise SuperNodeError(f"flower-supernode exited with code {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise SuperNodeError(f"flower-supernode did not connect within {timeout:.0f} s (log: {log}):\n{tail(log)}")
        time.sleep(0.3)


def wait_for_coordinator(site: SiteConfig, insecure: bool, say: Callable[[str], None], interval: float = 2.0) -> None:
    """Return once [superlink].address is reachable and speaks what this site speaks (TLS or not), saying
    "waiting for the coordinator at HOST:PORT (cause, N tries)" now and then meanwhile; raise SuperNodeError
    when retrying cannot help (TLS at one end only, a certificate the federation CA does not vouch for)."""
    tries, said = 0, 0.0
    while not (reach := probe_superlink(site, insecure)).ok:
        if reach.fatal:
            raise SuperNodeError(reach.reason)
        tries += 1
        if tries == 1 or time.monotonic() - said >= WAIT_REPORT:
            said = time.monotonic()
            say(f"waiting for the coordinator at {site.superlink} ({reach.reason}, {_tries(tries)})")
        time.sleep(interval)
    if tries:
        say(f"reached the coordinator at {site.superlink}")
