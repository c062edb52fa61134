"""A private certificate authority for one federation, the SuperLink's TLS certificate, site key pairs.

Flower's deployment needs three kinds of key material, all created here with `cryptography` so that
no site has to run openssl by hand:

- a CA (``ca.pem``/``ca.key``) that every SuperNode trusts as its root certificate;
- the SuperLink's TLS certificate (``server.pem``/``server.key``), signed by the CA, whose subject
  alternative names hold the address the sites dial (DNS name or IP) plus loopback, so that the
  coordinator's own tools (``flwr``) can reach the SuperLink on 127.0.0.1;
- per site an EC P-384 key pair in OpenSSH format (``NAME.key``/``NAME.pub``): the SuperNode signs
  its requests with the private key, the SuperLink admits only registered public keys.

Private keys are written 0600, atomically, and never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedecho.storage.files import atomic_path

CA_DAYS = 3650
SERVER_DAYS = 825
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class CertError(ValueError):
    """Bad input or existing key material that would be overwritten."""


@dataclass(frozen=True)
class ServerCerts:
    """Where `init_certs` put the CA and the SuperLink's TLS material."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sans: tuple[str, ...]


@dataclass(frozen=True)
class SiteKeys:
    """A site's node-authentication key pair (OpenSSH EC P-384)."""

    name: str
    private_key: Path
    public_key: Path


def split_host_port(address: str) -> tuple[str, int | None]:
    """Split 'host', 'host:port', '[v6]', '[v6]:port' or a bare IPv6 address into (host, port)."""
    address = address.strip()
    if not address:
        raise CertError("empty server address")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep:
            raise CertError(f"unbalanced brackets in address {address!r}")
        port = rest[1:] if rest.startswith(":") else rest
        return host, _port(port, address) if port else None
    if address.count(":") > 1:  # a bare IPv6 address has no port
        return address, None
    host, _, port = address.partition(":")
    return host, _port(port, address) if port else None


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise CertError(f"bad port {text!r} in address {address!r}")
    return int(text)


def _san(host: str) -> x509.GeneralName:
    """An IP SAN for an IP literal (TLS clients match IPs only against IP SANs), else a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?", host):
            raise CertError(f"{host!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(host.lower())


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    os.chmod(path, 0o644)


def _refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise CertError(f"{existing[0]} already exists (pass overwrite/--force to replace it)")


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def init_certs(
    folder: str | os.PathLike[str],
    server_address: str,
    *,
    extra_sans: tuple[str, ...] = (),
    organization: str = "fedecho federation",
    ca_days: int = CA_DAYS,
    server_days: int = SERVER_DAYS,
    overwrite: bool = False,
) -> ServerCerts:
    """Create the federation CA and the SuperLink certificate for `server_address` (HOST[:PORT]).

    The host goes into the certificate's SANs (as an IP SAN if it is an IP literal, DNS otherwise),
    with `extra_sans` and the loopback names. EC P-384 keys, SHA-384 signatures.
    """
    folder = Path(folder)
    host, _ = split_host_port(server_address)
    sans: list[str] = []
    for h in (host, *extra_sans, *LOOPBACK_SANS):
        h = split_host_port(h)[0] if h not in LOOPBACK_SANS else h
        if h not in sans:
            sans.append(h)
    names = [_san(h) for h in sans]
    paths = ServerCerts(folder, folder / "ca.pem", folder / "ca.key", folder / "server.pem", folder / "server.key", ())
    _refuse_overwrite([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], overwrite)
    folder.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew between machines
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name(f"{organization} CA", organization)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host, organization))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=server_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(paths.ca_key, ca_key, serialization.PrivateFormat.PKCS8)
    _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, server_key, serialization.PrivateFormat.PKCS8)
    _write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return ServerCerts(folder, paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, tuple(sans))


def create_site_keys(folder: str | os.PathLike[str], name: str, *, overwrite: bool = False) -> SiteKeys:
    """Create `NAME.key` (0600) and `NAME.pub`: the EC P-384 OpenSSH pair Flower's node auth expects.

    The private key stays at the site; the public key goes to the coordinator's keys folder.
    """
    if not _SITE_NAME.match(name):
        raise CertError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (at most 63 characters)")
    folder = Path(folder)
    keys = SiteKeys(name, folder / f"{name}.key", folder / f"{name}.pub")
    _refuse_overwrite([keys.private_key, keys.public_key], overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(keys.private_key, key, serialization.PrivateFormat.OpenSSH)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(keys.public_key, public + f" fedecho-site-{name}\n".encode())
    return keys


def load_site_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """Read an OpenSSH EC public key as `flwr supernode register` will, with an error naming the file."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise CertError(f"{path}: not a readable OpenSSH public key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{path}: node authentication needs an EC (NIST curve) key, got {type(key).__name__}")
    return key


def certificate_sans(path: str | os.PathLike[str]) -> list[str]:
    """The DNS and IP subject alternative names of a PEM certificate, as strings."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def verify_server_certificate(ca_cert: str | os.PathLike[str], server_cert: str | os.PathLike[str], host: str) -> None:
    """Check the chain and the hostname the way a TLS client would (cryptography's X.509 verifier)."""
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    leaf = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(host))  # type: ignore[assignment]
    except ValueError:
        subject = x509.DNSName(host)  # type: ignore[assignment]
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    verifier.verify(leaf, [])
