"""Deployment credentials made with `cryptography`: an operator CA, the SuperLink's TLS
certificate, and SuperNode key pairs for Flower's node authentication.

One CA for everything the operator certifies. Its key is Ed25519, so that the same key signs
X.509 certificates (TLS: the SuperLink's certificate, `ca.crt` on every node) and, in the raw
32-byte layout of fedge's secure-aggregation PKI (`ca.key`, `ca.pub`; docs/deployment.md), the
devices' secure-aggregation signing keys. The SuperLink's own key is EC P-256 (any TLS 1.2/1.3
client speaks it); only the CA's signature on it is Ed25519, which OpenSSL >= 1.1.1 verifies.

Files of `init_certificates(DIR)`:
- `ca.crt`: the CA certificate (PEM): every SuperNode's `--root-certificates`, the
  SuperLink's `--ssl-ca-certfile`, the `flwr` connection's `root-certificates`;
- `ca.key` (0600): the CA's raw Ed25519 private key, the operator's, never on a server;
- `ca.pub`: its raw public key (what secure aggregation's `secagg-pki` directory holds);
- `superlink.crt`, `superlink.key` (0600): the SuperLink's `--ssl-certfile/--ssl-keyfile`.

Secure-aggregation device keys (`secagg_device_credential(CA_DIR, DIR, NAME)`): `DIR/devices/
NAME.key` (0600, raw Ed25519) and `NAME.cert`, certified by the same CA (`ca.key`).

Node keys (`node_key(NAME)`): `NAME` (0600), an EC P-384 private key in OpenSSH format (the
only format `flower-supernode --auth-supernode-private-key` reads), and `NAME.pub`, its
`ecdsa-sha2-nistp384 ...` public key, the file `flwr supernode register` takes.

Nothing is overwritten unless `force` is given: a CA replaced by mistake would lock every
deployed node out.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import FedgeError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class CertificateFiles:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def ca_pub(self) -> Path:
        return self.directory / "ca.pub"

    @property
    def server_cert(self) -> Path:
        return self.directory / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "superlink.key"

    def all(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.ca_key, self.ca_pub, self.server_cert, self.server_key)


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FedgeError(f"{existing[0]} exists: not overwritten (pass --force to replace it)")


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write `data`; a private key is created 0600 from the start (never readable by others,
    not even between create and chmod)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses as IPAddress entries, everything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise FedgeError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    if not names:
        raise FedgeError("--host: at least one host name or address is needed")
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(ca_key: Ed25519PrivateKey, now: dt.datetime | None = None) -> x509.Certificate:
    now = now or dt.datetime.now(dt.UTC)
    public = ca_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name("fedge operator CA"))
        .issuer_name(_name("fedge operator CA"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(ca_key, None)  # Ed25519 hashes internally
    )


def make_server_certificate(
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    server_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The SuperLink's certificate: serverAuth only, for exactly `hosts`."""
    now = now or dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name("fedge SuperLink"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(subject_alternative_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, None)
    )


def init_certificates(
    directory: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, force: bool = False
) -> CertificateFiles:
    """A fresh CA and a SuperLink certificate for `hosts` in `directory` (see the module doc)."""
    files = CertificateFiles(Path(directory))
    _refuse_overwrite(files.all(), force)
    subject_alternative_names(hosts)  # a bad --host fails before anything is written

    ca_key = Ed25519PrivateKey.generate()
    ca_cert = make_ca(ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = make_server_certificate(ca_key, ca_cert, server_key, hosts)
    _write(files.ca_key, ca_key.private_bytes_raw(), private=True)
    _write(files.ca_pub, ca_key.public_key().public_bytes_raw(), private=False)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        private=True,
    )
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def load_ca_key(directory: str | Path) -> Ed25519PrivateKey:
    path = CertificateFiles(Path(directory)).ca_key
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FedgeError(f"cannot read the CA key {path}: {exc}") from None
    if len(raw) != 32:
        raise FedgeError(f"{path} is not a raw 32-byte Ed25519 key (made by `fedge certs init`?)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def node_key(path: str | Path, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode key pair: `path` (OpenSSH EC P-384 private key, 0600) and `path.pub`."""
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    _refuse_overwrite((private_path, public_path), force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True)
    _write(public_path, public + b"\n", private=False)
    return private_path, public_path


def secagg_device_credential(
    ca_directory: str | Path, directory: str | Path, name: str, force: bool = False
) -> tuple[Path, Path]:
    """A certified secure-aggregation signing key for device `name`, issued by the operator CA in
    `ca_directory` (its `ca.key`) with `federation.secagg.pki.issue`: `directory/devices/<name>.key`
    (raw Ed25519, 0600: that device only) and `<name>.cert`, the layout `pki.load_credential`
    reads. The device finds them through its node config (`secagg-device-name`,
    `secagg-credentials=directory`)."""
    from federation.secagg import pki

    if not name or "/" in name or name.startswith("."):
        raise FedgeError(f"device name {name!r} is not a valid file name")
    base = Path(directory) / "devices"
    key_path, cert_path = base / f"{name}.key", base / f"{name}.cert"
    _refuse_overwrite((key_path, cert_path), force)
    credential = pki.issue(load_ca_key(ca_directory).private_bytes_raw(), name)
    _write(key_path, credential.private, private=True)
    _write(cert_path, credential.certificate, private=False)
    return key_path, cert_path


def verify_server_certificate(files: CertificateFiles) -> x509.Certificate:
    """The SuperLink certificate, checked to be signed by the CA in the same folder."""
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    return cert
