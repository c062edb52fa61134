"""A hospital site's processes, with real ones on loopback: one coordinator (nginx front + SuperLink with TLS and node
authentication) shared by the module, and `fedecho client start` run as an operator runs it.

- A site killed outright (SIGKILL, all its processes) and started again at once is back within seconds: the
  coordinator still counts it online, so the site releases its own node and says so, instead of failing.
- Stopping `fedecho client start` (Ctrl-C, SIGTERM, its process group, even SIGKILL) leaves no process of the site.
- A second site sharing the first one's state folder, cache folder, private key or SuperNode port refuses to start,
  naming the field, the path or port and the site holding it; the first site's files are untouched.
- A plaintext site against the TLS coordinator, a TLS site against a plaintext one, an unregistered site: one clear
  message each, and the site stops instead of retrying.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import Deployment, free_port, kill_group, make_deployment

from fedecho._proc import cmdline, read_lock, rotate_log, stop, wait_for
from fedecho.client.config import SiteConfig, load_site_config
from fedecho.client.runtime import SUPERNODE_HEARTBEAT_INTERVAL
from fedecho.client.supernode import (
    LOCK_NAME,
    SiteClash,
    SuperNodeWatch,
    claim_site,
    probe_superlink,
)

pytestmark = pytest.mark.slow
FEDECHO = str(Path(sys.executable).parent / "fedecho")
CONNECTED = re.compile(r"connected as node (\d+)")


@pytest.fixture(scope="module")
def dep(federated_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One coordinator for the module; sites site01 and site02 registered, mallory not (none started). Their data
    must exist (`fedecho client start` checks it); no run is submitted, so it is never read."""
    dep = make_deployment(tmp_path_factory.mktemp("sites"), min_sites=1)
    try:
        for name in ("site01", "site02"):
            dep.add_site(name, federated_phantom / name)
        dep.add_site("mallory", federated_phantom / "site01", register=False)
        dep.start_superlink()
        dep.register()
        yield dep
    finally:
        dep.close()


def _site_pids(site: SiteConfig) -> list[int]:
    """Live processes of the site: every process `fedecho client start` starts has FLWR_HOME in its state folder."""
    marker = f"FLWR_HOME={site.flwr_home.resolve()}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                stat = (proc / "stat").read_text()
                if stat[stat.rindex(")") + 2 :].split()[0] != "Z" and marker in (proc / "environ").read_bytes().split(
                    b"\0"
                ):
                    pids.append(int(proc.name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class Cli:
    """`fedecho client start` in a session of its own (as from its own terminal), output to a file."""

    def __init__(self, site: SiteConfig, out: Path, *args: str) -> None:
        self.site, self.out = site, out
        env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
        with open(out, "wb") as f:
            self.proc = subprocess.Popen(
                [FEDECHO, "client", "start", "--site", str(site.path), *args], stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, env=env,
            )  # fmt: skip
        self.started = time.monotonic()

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_connected(self, timeout: float = 90.0) -> int:
        ok = wait_for(lambda: CONNECTED.search(self.text()) or self.proc.poll() is not None, timeout, interval=0.1)
        match = CONNECTED.search(self.text())
        assert ok and match, self.text()
        return int(match.group(1))

    def close(self) -> None:
        kill_group(self.proc)
        _kill(_site_pids(self.site))


def _spare_runner_up(site: SiteConfig) -> bool:
    return any("flwr-clientapp" in cmdline(pid) for pid in _site_pids(site))


def test_flower_hooks_still_exist() -> None:
    """A flwr upgrade that moves what the site's SuperNode wrapper hooks fails here, not silently at a site."""
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL

    from fedecho.fl.flower_patches import check

    check()
    assert SUPERNODE_HEARTBEAT_INTERVAL == HEARTBEAT_MIN_INTERVAL


def test_a_site_killed_outright_is_back_at_once_and_told_why(dep: Deployment, tmp_path: Path) -> None:
    site = dep.sites["site01"]
    first = Cli(site, tmp_path / "first.txt")
    second: Cli | None = None
    try:
        node_id = first.wait_connected()
        assert wait_for(lambda: _spare_runner_up(site), 60.0), _site_pids(site)
        # a crash: every process of the site at once, no goodbye to the coordinator (it still counts the site online)
        os.killpg(first.proc.pid, signal.SIGKILL)
        _kill(_site_pids(site))
        assert wait_for(lambda: not _site_pids(site), 10.0)
        second = Cli(site, tmp_path / "second.txt")
        assert second.wait_connected(60.0) == node_id
        took = time.monotonic() - second.started
        out = second.text()
        released = f"the coordinator still counted site site01 online from its previous start; released node {node_id}"
        assert released in out.replace("\n", " "), out
        assert out.index("released node") < out.index("connected as node"), out  # judged from this start's lines
        assert "registered" not in out and "error" not in out, out
        # Flower alone refused it until the node's heartbeat lapsed (60 s with its defaults)
        assert took < 20.0, (took, out)
        assert (site.logs / "supernode.log.1").is_file()  # the crashed start's log, kept aside

        os.killpg(second.proc.pid, signal.SIGTERM)  # SIGTERM to its process group
        assert second.proc.wait(timeout=60) == 0, second.text()
        assert wait_for(lambda: not _site_pids(site), 15.0), [cmdline(p) for p in _site_pids(site)]
    finally:
        first.close()
        if second is not None:
            second.close()


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_client_start_leaves_no_process_of_the_site(dep: Deployment, tmp_path: Path, how: str) -> None:
    site = dep.sites["site02"]
    cli = Cli(site, tmp_path / "out.txt")
    try:
        cli.wait_connected()
        assert wait_for(lambda: _spare_runner_up(site), 60.0), _site_pids(site)  # launcher, SuperNode, spare runner
        assert len(_site_pids(site)) >= 3
        if how == "ctrl-c":
            os.killpg(cli.proc.pid, signal.SIGINT)
        elif how == "sigterm":
            os.kill(cli.proc.pid, signal.SIGTERM)
        else:
            os.kill(cli.proc.pid, signal.SIGKILL)
        code = cli.proc.wait(timeout=60)
        assert wait_for(lambda: not _site_pids(site), 15.0), [cmdline(p) for p in _site_pids(site)]
        if how != "sigkill":
            assert code == 0 and "SuperNode of site site02 stopped" in cli.text(), cli.text()
        claim_site(site).release()  # its locks died with it: the site may start again
    finally:
        cli.close()


def _variant(site: SiteConfig, name: str, **fields: object) -> SiteConfig:
    """A copy of site's file under another name, with some of its [site]/[superlink]/[supernode] fields replaced."""
    text = site.path.read_text().replace(f'name = "{site.name}"', f'name = "{name}"')
    for key, value in fields.items():
        line = f"{key} = {value}" if isinstance(value, int) else f'{key} = "{value}"'
        text, n = re.subn(rf"(?m)^{key} = .*$", line, text)
        assert n == 1, key
    path = site.path.with_name(f"{name}.toml")
    path.write_text(text)
    return load_site_config(path)


def test_a_second_site_sharing_a_folder_key_or_port_refuses_to_start(dep: Deployment, tmp_path: Path) -> None:
    one, two = dep.sites["site01"], dep.sites["site02"]
    proc = dep.start_supernode("site01")
    try:
        before = {p: p.read_bytes() for p in (one.state / "node-config.toml", one.logs / "supernode.log")}
        launcher = read_lock(one.state.resolve() / LOCK_NAME)
        assert launcher["pid"] == proc.pid and launcher["site"] == "site01"  # the launcher holds the site's locks

        # `fedecho client start` with site02's file pointing at site01's state folder, through a symlink
        alias = tmp_path / "alias"
        alias.symlink_to(one.state.resolve(), target_is_directory=True)
        clash = _variant(two, "site02-state", state=alias)
        res = subprocess.run(
            [FEDECHO, "client", "start", "--site", str(clash.path)], capture_output=True, text=True, timeout=120,
            env={**os.environ, "COLUMNS": "400"},
        )  # fmt: skip
        err = " ".join(res.stderr.split())
        assert res.returncode == 2, res.stdout + res.stderr
        expect = f"[site].state = {one.state.resolve()} is in use by site site01 ({one.path}, pid {proc.pid})"
        assert expect in err and "as its state folder" in err, err

        cases = {
            "cache": (_variant(two, "site02-cache", cache=one.cache), "[site].cache", "as its cache folder"),
            "cache-is-state": (_variant(two, "site02-x", cache=one.state), "[site].cache", "as its state folder"),
            "key": (_variant(two, "site02-key", private_key=one.private_key), "[superlink].private_key", "private key"),
        }
        for case, (cfg, field, role) in cases.items():
            with pytest.raises(SiteClash) as e:
                claim_site(cfg)
            text = str(e.value)
            assert f"{cfg.path}: {field} = " in text and "site site01" in text and role in text, (case, text)
        started = time.monotonic()
        with pytest.raises(SiteClash, match=rf"site site01 is already running from {re.escape(str(one.path))} "):
            claim_site(one)  # the same site twice
        assert time.monotonic() - started < 2  # refused at once: its holder is alive and not stopping
        port = _variant(two, "site02-port", port=one.supernode_port)
        wait_for(lambda: _port_listening(one.supernode_port), 60.0)
        with pytest.raises(SiteClash) as e:
            claim_site(port)
        assert f"[supernode].port = {one.supernode_port} on 127.0.0.1 is in use by site site01" in str(e.value)

        assert {p: p.read_bytes() for p in before} == before  # site01's node config and log untouched
        assert proc.poll() is None
    finally:
        stop(proc)
    claim_site(_variant(two, "site02-after", state=one.state)).release()  # free again once site01 stopped


def _port_listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_a_plaintext_site_against_the_tls_coordinator_stops_with_one_clear_error(dep: Deployment) -> None:
    site = dep.sites["mallory"]
    started = time.monotonic()
    res = subprocess.run(
        [FEDECHO, "client", "start", "--site", str(site.path), "--insecure"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    took = time.monotonic() - started
    err = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"the coordinator at {site.superlink} speaks TLS, but this site was started with --insecure" in err, err
    assert err.count("error:") == 1 and "retry" not in (res.stdout + err).lower(), res.stdout + err
    assert took < 60, took
    assert not _site_pids(site)


def test_a_tls_site_against_a_plaintext_coordinator_and_an_unreachable_one(dep: Deployment, tmp_path: Path) -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        site = _variant(dep.sites["mallory"], "tls-vs-plain", address=f"127.0.0.1:{plain.server_address[1]}")
        reach = probe_superlink(site)
        assert not reach.ok and reach.fatal, reach
        assert f"the coordinator at {site.superlink} speaks plain HTTP" in reach.reason, reach
    finally:
        plain.shutdown()
    down = _variant(dep.sites["mallory"], "down", address=f"127.0.0.1:{free_port()}")
    reach = probe_superlink(down)
    assert not reach.ok and not reach.fatal and reach.reason == "connection refused", reach

    # Flower's retries, as a SuperNode logs them while the coordinator is down: one line, address and cause
    log = tmp_path / "supernode.log"
    log.write_text("WARNING :   Connection attempt failed, retrying in 0.95 seconds\n" * 5)
    events = SuperNodeWatch(down, log).poll()
    assert [e.text for e in events] == [f"waiting for the coordinator at {down.superlink} (connection refused, 1 try)"]


def test_an_unregistered_site_gets_one_clear_message(dep: Deployment) -> None:
    site = dep.sites["mallory"]
    res = subprocess.run(
        [FEDECHO, "client", "start", "--site", str(site.path)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 1, out
    assert f"the coordinator at {site.superlink} refused site mallory: its public key is not registered there" in out
    assert out.count("error:") == 1, out
    for noise in ("Connection successful", "could not establish", "Connection attempt failed", "connected as node"):
        assert noise not in out, (noise, out)
    assert not _site_pids(site)


def test_rotate_log_keeps_earlier_starts(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    for n in range(7):
        log.write_text(f"start {n}\n")
        rotate_log(log, keep=5)
    assert not log.exists()
    assert [(tmp_path / f"supernode.log.{k}").read_text() for k in range(1, 6)] == [
        f"start {n}\n" for n in (6, 5, 4, 3, 2)
    ]
