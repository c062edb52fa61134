"""The coordinator's public front: nginx terminating TLS on the federation's address, passing on the Fleet API only.

flwr 1.42's SuperLink serves the Fleet API (what SuperNodes call), the Control API (`flwr ls/run/stop`,
`flwr supernode register`) and the Runtime API (ServerApp processes) on one HTTP port, and its Control API has
no access control of its own. So the SuperLink binds a loopback address only (`[server].control`), and the
address the sites dial (`[server].listen`) is served by nginx, a maintained TLS-terminating reverse proxy, with
a route allow-list: the Fleet routes a registered SuperNode uses, and `GET /health`. Every other request
(Control, Runtime, `/docs`, Fleet self-registration, a wrong method) is answered 403 by nginx itself, never
reaches Flower, and is written to `<state>/front/refused.log` (one JSON line: time, source address, method,
path), which `fedecho server start` copies into the server's access audit log.

nginx re-encrypts to the SuperLink (TLS verified against the federation CA), so the SuperLink keeps its own TLS
and SuperNode authentication: the signed request headers of each SuperNode pass through unchanged.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedecho._proc import spawn
from fedecho.server.config import ServerConfig
from fedecho.storage.files import atomic_write_bytes

# The Fleet routes a SuperNode with a registered key calls (flwr 1.42, flwr.supernode.fleet_http_client).
# register-node / unregister-node are left out: with SuperNode authentication Flower refuses them anyway, and
# adding or removing a site is the coordinator's act (`fedecho server register|unregister`, over loopback).
FLEET_ROUTES = (
    "activate-node",
    "deactivate-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
# Without TLS (--insecure, loopback development) SuperNodes register themselves: the only extra route then.
INSECURE_ROUTES = ("register-node",)
MAX_BODY = "32m"  # Flower sends objects of at most 5 MB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)


class FrontError(RuntimeError):
    """The front could not be configured or started."""


@dataclass(frozen=True)
class Refusal:
    """One request the front refused, as its log line says."""

    time: str
    source: str
    method: str
    path: str


def folder(cfg: ServerConfig) -> Path:
    return cfg.state / "front"


def refused_log(cfg: ServerConfig) -> Path:
    return folder(cfg) / "refused.log"


def nginx_bin(cfg: ServerConfig) -> str:
    """The nginx executable, or a FrontError that says how to install it."""
    # Debian installs it in /usr/sbin, which a non-root PATH often lacks
    found = shutil.which(cfg.nginx) or shutil.which(cfg.nginx, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise FrontError(
            f"[server].nginx = {cfg.nginx!r} in {cfg.path}: no such executable. The coordinator's public front is "
            "nginx: install it (Debian/Ubuntu: `apt-get install nginx-light`) or set [server].nginx to its path"
        )
    return found


def _worker_user() -> str:
    """Started as root, nginx's workers (the processes that talk to the network) run as `nobody`."""
    if os.geteuid() != 0:
        return ""
    try:
        group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    except KeyError:
        return ""
    return f"user nobody {group};\n"


def render_conf(cfg: ServerConfig, insecure: bool = False) -> str:
    """nginx.conf for this server config: one server block on [server].listen, allow-list, refusal log."""
    base = folder(cfg).resolve()
    routes = FLEET_ROUTES + (INSECURE_ROUTES if insecure else ())
    upstream_scheme = "http" if insecure else "https"
    tls_in = (
        ""
        if insecure
        else (
            f"        ssl_certificate {cfg.server_cert.resolve()};\n"
            f"        ssl_certificate_key {cfg.server_key.resolve()};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        )
    )
    tls_out = (
        ""
        if insecure
        else (
            "            proxy_ssl_verify on;\n"
            f"            proxy_ssl_trusted_certificate {cfg.ca_cert.resolve()};\n"
            "            proxy_ssl_name localhost;\n"  # the server certificate always carries localhost
            "            proxy_ssl_session_reuse on;\n"
        )
    )
    # The SuperLink gets the path nginx matched (normalised: no dot segments, no encoded slashes), never the
    # request's raw one, so the allow-list and Flower's router cannot read one request two ways.
    proxy = (
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "            proxy_set_header Host $host;\n"
        "            proxy_request_buffering off;\n"
        "            proxy_buffering off;\n"
        "            proxy_read_timeout 600s;\n"
        "            proxy_send_timeout 600s;\n"
        f"{tls_out}"
    )
    temp = "\n".join(
        f"    {kind}_temp_path {base / 'tmp' / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        "# Generated by `fedecho server start` from "
        f"{cfg.path}; rewritten at every start (edit the server config, not this file).\n"
        f"{_worker_user()}"
        "worker_processes 1;\n"
        "daemon off;\n"
        "master_process on;\n"
        f"pid {base / 'nginx.pid'};\n"
        "error_log stderr warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    server_tokens off;\n"
        "    access_log off;\n"
        f"{temp}\n"
        "    log_format fedecho_refused escape=json "
        '\'{"time":"$time_iso8601","source":"$remote_addr","method":"$request_method","path":"$uri"}\';\n'
        f"    upstream superlink {{ server {cfg.control}; keepalive 16; }}\n"
        "    server {\n"
        f"        listen {cfg.listen}{'' if insecure else ' ssl'};\n"
        f"{tls_in}"
        f"        client_max_body_size {MAX_BODY};\n"
        "        set $fedecho_refused 0;\n"
        f"        access_log {refused_log(cfg).resolve()} fedecho_refused if=$fedecho_refused;\n"
        "        location = /health {\n"
        "            if ($request_method != GET) { set $fedecho_refused 1; return 403; }\n"
        f"            proxy_pass {upstream_scheme}://superlink/health;\n"
        f"{proxy}"
        "        }\n"
        f"        location ~ ^/v1/fleet/(?<fleet_route>{'|'.join(routes)})$ {{\n"
        "            if ($request_method != POST) { set $fedecho_refused 1; return 403; }\n"
        f"            proxy_pass {upstream_scheme}://superlink/v1/fleet/$fleet_route;\n"
        f"{proxy}"
        "        }\n"
        "        location / {\n"
        "            set $fedecho_refused 1;\n"
        "            default_type text/plain;\n"
        '            return 403 "refused by the fedecho front: only the Fleet API is served here\\n";\n'
        "        }\n"
        "    }\n"
        "}\n"
    )


def write_conf(cfg: ServerConfig, insecure: bool = False) -> Path:
    """Write <state>/front/nginx.conf (and the temp folders nginx's worker writes to)."""
    base = folder(cfg)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (base / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and _worker_user():
        nobody = pwd.getpwnam("nobody")
        for p in [base / "tmp", *(base / "tmp").iterdir()]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    path = base / "nginx.conf"
    atomic_write_bytes(path, render_conf(cfg, insecure).encode())
    return path


def check_conf(cfg: ServerConfig, conf: Path) -> None:
    """`nginx -t`: a configuration nginx would not load fails here, with nginx's own words."""
    res = subprocess.run(
        [nginx_bin(cfg), "-e", "stderr", "-p", str(folder(cfg).resolve()), "-c", str(conf.resolve()), "-t", "-q"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30,
    )  # fmt: skip
    if res.returncode != 0:
        raise FrontError(f"nginx refused the generated front configuration {conf}:\n{res.stderr.strip()}")


def start_front(cfg: ServerConfig, insecure: bool = False, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Write and check the configuration, then start nginx in the foreground (its own session)."""
    binary = nginx_bin(cfg)
    conf = write_conf(cfg, insecure)
    check_conf(cfg, conf)
    argv = [binary, "-e", "stderr", "-p", str(folder(cfg).resolve()), "-c", str(conf.resolve())]
    return spawn(argv, dict(os.environ), log or cfg.logs / "front.log", cwd=folder(cfg))


def stop_stale_front(cfg: ServerConfig, grace: float = 10.0) -> None:
    """End an nginx this state folder's front left running (its supervisor was killed outright), so that the new
    one can bind the port: only a process whose command line names this front's folder."""
    import signal
    import time

    try:
        pid = int((folder(cfg) / "nginx.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return
    if "nginx" not in cmdline or str(folder(cfg).resolve()) not in cmdline:
        return
    os.kill(pid, signal.SIGTERM)

    def running() -> bool:  # neither gone nor a zombie waiting for its parent
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2 :].split()[0] != "Z"

    deadline = time.monotonic() + grace
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)


def front_health(cfg: ServerConfig, insecure: bool = False, timeout: float = 2.0) -> bool:
    """True when the public address answers GET /health through the front (TLS checked against our CA)."""
    scheme = "http" if insecure else "https"
    try:
        context = None if insecure else ssl.create_default_context(cafile=str(cfg.ca_cert))
        if context is not None:
            context.check_hostname = False  # the listen address may be a wildcard; the CA check still holds
        url = f"{scheme}://{cfg.listen_local}/health"
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


class RefusalReader:
    """New lines of the front's refusal log since the last read; the offset lives beside the log, so a
    restarted coordinator neither loses nor repeats a refusal."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.log = refused_log(cfg)
        self.mark = self.log.with_suffix(".offset")

    def read_new(self) -> list[Refusal]:
        try:
            offset = int(self.mark.read_text().strip() or 0)
        except (OSError, ValueError):
            offset = 0
        try:
            with open(self.log, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:  # the log was truncated or replaced
                    offset = 0
                f.seek(offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        out: list[Refusal] = []
        for line in data[:end].decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
                out.append(Refusal(str(row["time"]), str(row["source"]), str(row["method"]), str(row["path"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                out.append(Refusal("", "?", "?", f"unreadable refusal log line: {line[:200]!r}"))
        if end:
            atomic_write_bytes(self.mark, str(offset + end).encode())
        return out


def sync_refusals(cfg: ServerConfig) -> int:
    """Copy the refusals logged since the last call into the server's access audit log; returns how many."""
    refusals = RefusalReader(cfg).read_new()
    if not refusals:
        return 0
    from fedecho.storage.store import Store, store_url

    with Store(store_url(cfg.state, cfg.store)) as store:
        for r in refusals:
            kind = api_of(r.path)
            if "register-node" in r.path:
                reason = "adding or removing a site is the coordinator's act, on the coordinator machine"
            elif kind == "fleet":
                reason = "not a Fleet route a registered SuperNode uses, or not its method"
            else:
                reason = f"the {kind} API is not served to the network"
            store.add_access(r.source, kind, f"{r.method} {r.path}", "refused", reason, created=_epoch(r.time))
    return len(refusals)


def _epoch(iso: str) -> float | None:
    """nginx's $time_iso8601 as seconds since the epoch (None when unreadable: the store then takes now)."""
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def watch_refusals(cfg: ServerConfig, interval: float = 1.0) -> None:
    """Forever: sync_refusals every `interval` seconds (the ServerApp runner runs this in a thread)."""
    import logging
    import time

    while True:
        try:
            sync_refusals(cfg)
        except Exception as e:  # a locked or missing store: try again, and say so
            logging.getLogger("fedecho.server.front").warning("refusal log -> audit: %s", e)
        time.sleep(interval)


def api_of(path: str) -> str:
    """Which Flower API a refused path belongs to (for the audit log)."""
    for prefix, name in (("/v1/control/", "control"), ("/v1/runtime/", "runtime"), ("/v1/fleet/", "fleet")):
        if path.startswith(prefix):
            return name
    return "other"
