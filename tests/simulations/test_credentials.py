"""Deployment credentials (`fedge certs init`, `fedge node-key`): formats Flower reads, file
modes, no silent overwrite, and TLS that holds against a server of another CA or name."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.errors import FedgeError
from simulations.credentials import init_certificates, load_ca_key, node_key, verify_server_certificate


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_init_makes_a_ca_and_a_server_certificate_for_the_hosts(tmp_path: Path) -> None:
    files = init_certificates(tmp_path / "certs", ["fl.example.org", "10.0.0.7"])
    assert _mode(files.ca_key) == 0o600 and _mode(files.server_key) == 0o600
    assert _mode(files.ca_cert) & 0o077 != 0o077  # public files stay readable
    cert = verify_server_certificate(files)  # signed by the CA in the same folder
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # one CA: the X.509 root and the raw key secure aggregation's PKI reads are the same key
    raw_public = files.ca_pub.read_bytes()
    assert load_ca_key(files.directory).public_key().public_bytes_raw() == raw_public
    assert isinstance(ca.public_key(), Ed25519PublicKey)
    assert ca.public_key().public_bytes_raw() == raw_public  # type: ignore[union-attr]


def test_default_hosts_are_the_loopback_names(tmp_path: Path) -> None:
    files = init_certificates(tmp_path)
    sans = (
        verify_server_certificate(files).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1")
    }


def test_existing_credentials_are_never_overwritten_without_force(tmp_path: Path) -> None:
    files = init_certificates(tmp_path)
    before = files.ca_key.read_bytes()
    with pytest.raises(FedgeError, match="exists: not overwritten"):
        init_certificates(tmp_path)
    assert files.ca_key.read_bytes() == before
    init_certificates(tmp_path, force=True)
    assert files.ca_key.read_bytes() != before and _mode(files.ca_key) == 0o600
    private, _ = node_key(tmp_path / "node")
    key_before = private.read_bytes()
    with pytest.raises(FedgeError, match="--force"):
        node_key(tmp_path / "node")
    assert private.read_bytes() == key_before


def test_a_bad_host_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match="neither an IP address nor a DNS name"):
        init_certificates(tmp_path / "c", ["fl host/1"])
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_node_key_is_an_openssh_ec_key_pair(tmp_path: Path) -> None:
    private, public = node_key(tmp_path / "keys" / "phone-0")
    assert _mode(private) == 0o600 and public.name == "phone-0.pub"
    key = load_ssh_private_key(private.read_bytes(), password=None)  # what flower-supernode calls
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def _handshake(files_dir: Path, trust: Path, server_hostname: str) -> str:
    """A TLS server with the SuperLink certificate on 127.0.0.1; a client trusting `trust`."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files_dir / "superlink.crt", files_dir / "superlink.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = ssl.create_default_context(cafile=str(trust))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            return tls.recv(2).decode()
    finally:
        thread.join(timeout=10)
        listener.close()


def test_tls_holds_only_for_the_ca_and_the_names_it_certified(tmp_path: Path) -> None:
    ours = init_certificates(tmp_path / "ours")
    theirs = init_certificates(tmp_path / "theirs")
    assert _handshake(ours.directory, ours.ca_cert, "127.0.0.1") == "ok"
    assert _handshake(ours.directory, ours.ca_cert, "localhost") == "ok"
    with pytest.raises(ssl.SSLCertVerificationError):  # a client trusting another CA
        _handshake(ours.directory, theirs.ca_cert, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not carry
        _handshake(ours.directory, ours.ca_cert, "fl.example.org")
