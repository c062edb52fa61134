"""Certificates and site keys: openssl accepts the chain, the SANs hold the address, keys are private."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from fedecho.cli import app
from fedecho.security.certs import (
    CertError,
    certificate_sans,
    create_site_keys,
    init_certs,
    load_site_public_key,
    split_host_port,
    verify_server_certificate,
)

OPENSSL = shutil.which("openssl")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize(
    ("address", "san"),
    [("superlink.hospital-net.org:9093", "superlink.hospital-net.org"), ("10.1.2.3:9093", "10.1.2.3"),
     ("[2001:db8::7]:9093", "2001:db8::7"), ("superlink.example", "superlink.example")],
)  # fmt: skip
def test_server_certificate_carries_the_address(tmp_path: Path, address: str, san: str) -> None:
    made = init_certs(tmp_path, address)
    sans = certificate_sans(made.server_cert)
    assert san in sans and "127.0.0.1" in sans and "localhost" in sans
    verify_server_certificate(made.ca_cert, made.server_cert, san)  # chain + hostname, as a TLS client
    with pytest.raises(Exception, match=r"(?i)mismatch|no matching|subject|san"):
        verify_server_certificate(made.ca_cert, made.server_cert, "evil.example.org")
    for key in (made.ca_key, made.server_key):
        assert _mode(key) == 0o600
    assert _mode(made.ca_cert) == 0o644


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_verifies_the_chain_and_hostname(tmp_path: Path) -> None:
    made = init_certs(tmp_path, "superlink.hospital-net.org:9093", extra_sans=("10.0.0.5",))
    for extra in ([], ["-verify_hostname", "superlink.hospital-net.org"], ["-verify_ip", "10.0.0.5"]):
        res = subprocess.run(
            [OPENSSL, "verify", "-x509_strict", "-CAfile", str(made.ca_cert), *extra, str(made.server_cert)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.returncode == 0 and ": OK" in res.stdout, (extra, res.stdout, res.stderr)
    res = subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(made.ca_cert), "-verify_hostname", "other.org", str(made.server_cert)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    other = init_certs(tmp_path / "other", "superlink.hospital-net.org")
    res = subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(other.ca_cert), str(made.server_cert)], capture_output=True, check=False
    )
    assert res.returncode != 0  # another federation's CA does not vouch for this server


def test_site_keys_are_what_flower_node_auth_loads(tmp_path: Path) -> None:
    keys = create_site_keys(tmp_path, "site01")
    assert _mode(keys.private_key) == 0o600
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)  # what flower-supernode does
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = load_site_public_key(keys.public_key)  # what `flwr supernode register` accepts
    assert public.public_numbers() == private.public_key().public_numbers()
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_nothing_is_overwritten_without_force(tmp_path: Path) -> None:
    made = init_certs(tmp_path, "127.0.0.1:9093")
    before = made.ca_key.read_bytes()
    with pytest.raises(CertError, match="already exists"):
        init_certs(tmp_path, "127.0.0.1:9093")
    assert made.ca_key.read_bytes() == before
    init_certs(tmp_path, "127.0.0.1:9093", overwrite=True)
    assert made.ca_key.read_bytes() != before
    create_site_keys(tmp_path, "a")
    with pytest.raises(CertError, match="already exists"):
        create_site_keys(tmp_path, "a")
    with pytest.raises(CertError, match="site name"):
        create_site_keys(tmp_path, "../evil")


def test_bad_addresses_are_named() -> None:
    assert split_host_port("host:1") == ("host", 1)
    assert split_host_port("[::1]:9") == ("::1", 9)
    assert split_host_port("::1") == ("::1", None)
    for bad in ("host:99999", "host:x", "[::1", ""):
        with pytest.raises(CertError):
            split_host_port(bad)


def test_certs_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["certs", "init", str(tmp_path / "c"), "--server-address", "10.9.8.7:9093"])
    assert res.exit_code == 0, res.output
    assert "10.9.8.7" in certificate_sans(tmp_path / "c" / "server.pem")
    res = runner.invoke(app, ["certs", "init", str(tmp_path / "c"), "--server-address", "10.9.8.7:9093"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["certs", "site", str(tmp_path / "k"), "site01"])
    assert res.exit_code == 0 and (tmp_path / "k" / "site01.pub").is_file()
    for args in (["certs"], ["certs", "init"], ["certs", "site"]):
        assert runner.invoke(app, [*args, "--help"]).exit_code == 0
