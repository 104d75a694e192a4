"""Certified device keys for secure aggregation against a malicious server (Ed25519).

Bonawitz et al. (CCS 2017, §4 "active adversary") and Bell et al. (CCS 2020) assume a public-key
infrastructure: without one, the server that relays every public key can hand a device keys of
its own making for all its "neighbours" and open everything the device seals or masks (a
man-in-the-middle, or a group of Sybils). Here an operator's certificate authority (CA), kept
away from the server, certifies one Ed25519 signing key per device; devices sign their round
keys and their view of the survivors with it, and check their neighbours' signatures against
the CA's public key, which they get out of band (a file named in the run config).

- certificate: `name`, the device's Ed25519 public key, and the CA's signature over both
  (domain-separated with `context.pack_fields`);
- round-keys statement: (params digest, protocol id, c public key, s public key);
- survivors statement: (params digest, protocol id, the sorted survivor ids).
The params digest binds run, round, group, group size, graph seed and every other public
parameter, so no signature is valid in another round, run or group.

Files (`create_fleet_pki`): `ca.pub` (32 raw bytes; everyone may read it), `ca.key` (the CA's
private key: the operator's, never the server's), `devices/<name>.key` and `.cert` (a device's
own). In a simulation the runner's directory holds every device's files; in a deployment each
device gets only its own, through its node config.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .context import pack_fields

__all__ = [
    "CertificateError",
    "DeviceCredential",
    "create_fleet_pki",
    "device_name_for",
    "issue",
    "load_ca_public",
    "load_credential",
    "round_keys_statement",
    "sign",
    "survivors_statement",
    "verify",
    "verify_certificate",
]

SIG_BYTES = 64
KEY_BYTES = 32


class CertificateError(ValueError):
    """A certificate or signature does not verify against the CA / the certified key."""


@dataclass(frozen=True)
class DeviceCredential:
    name: str
    private: bytes  # raw Ed25519 private key (32 bytes): stays on the device
    certificate: bytes

    def public(self) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).public_key().public_bytes_raw()


def _cert_statement(name: str, device_public: bytes) -> bytes:
    return pack_fields("device-certificate", name, device_public)


def issue(ca_private: bytes, name: str) -> DeviceCredential:
    """A fresh device signing key and its certificate: len(name) || name || key || CA signature."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    encoded = name.encode("utf-8")
    body = struct.pack(">H", len(encoded)) + encoded + public
    signature = Ed25519PrivateKey.from_private_bytes(ca_private).sign(_cert_statement(name, public))
    return DeviceCredential(name, key.private_bytes_raw(), body + signature)


def verify_certificate(ca_public: bytes, certificate: bytes) -> tuple[str, bytes]:
    """(device name, device public key) of a certificate the CA signed; CertificateError otherwise."""
    cert = bytes(certificate)
    if len(cert) < 2 + KEY_BYTES + SIG_BYTES:
        raise CertificateError(f"certificate truncated ({len(cert)} bytes)")
    (name_len,) = struct.unpack_from(">H", cert)
    if len(cert) != 2 + name_len + KEY_BYTES + SIG_BYTES:
        raise CertificateError("certificate is malformed")
    try:
        name = cert[2 : 2 + name_len].decode("utf-8")
    except UnicodeDecodeError:
        raise CertificateError("certificate name is not UTF-8") from None
    public = cert[2 + name_len : 2 + name_len + KEY_BYTES]
    if not verify(ca_public, _cert_statement(name, public), cert[-SIG_BYTES:]):
        raise CertificateError(f"certificate of {name!r} is not signed by the operator's CA")
    return name, public


def sign(private: bytes, statement: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(bytes(private)).sign(bytes(statement))


def verify(public: bytes, statement: bytes, signature: bytes) -> bool:
    """Whether `signature` is the holder of `public`'s Ed25519 signature on `statement`."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), bytes(statement))
    except (InvalidSignature, ValueError):
        return False
    return True


def round_keys_statement(params_digest: bytes, my_id: int, c_public: bytes, s_public: bytes) -> bytes:
    return pack_fields("round-keys", params_digest, my_id, bytes(c_public), bytes(s_public))


def survivors_statement(params_digest: bytes, my_id: int, survivors: Iterable[int]) -> bytes:
    ids = sorted(survivors)
    return pack_fields("survivors", params_digest, my_id, len(ids), *ids)


def device_name_for(partition_id: int) -> str:
    """A simulated device's certified name (a deployment names its devices as it likes)."""
    return f"partition-{int(partition_id)}"


def create_fleet_pki(directory: str | Path, names: Sequence[str]) -> Path:
    """Write a fresh CA and one credential per device name under `directory` (see module doc)."""
    root = Path(directory)
    (root / "devices").mkdir(parents=True, exist_ok=True)
    ca = Ed25519PrivateKey.generate()
    (root / "ca.key").write_bytes(ca.private_bytes_raw())
    (root / "ca.pub").write_bytes(ca.public_key().public_bytes_raw())
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"device name {name!r} is not a valid file name")
        cred = issue(ca.private_bytes_raw(), name)
        (root / "devices" / f"{name}.key").write_bytes(cred.private)
        (root / "devices" / f"{name}.cert").write_bytes(cred.certificate)
    return root


def load_ca_public(directory: str | Path) -> bytes:
    path = Path(directory) / "ca.pub"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read the CA public key {path}: {exc}") from None
    if len(data) != KEY_BYTES:
        raise CertificateError(f"{path} is not a raw 32-byte Ed25519 public key")
    return data


def load_credential(directory: str | Path, name: str) -> DeviceCredential:
    """A device's own key and certificate from `directory/devices/<name>.{key,cert}`."""
    base = Path(directory) / "devices"
    try:
        private = (base / f"{name}.key").read_bytes()
        certificate = (base / f"{name}.cert").read_bytes()
    except OSError as exc:
        raise CertificateError(f"no secure-aggregation credential for device {name!r}: {exc}") from None
    cred = DeviceCredential(name, private, certificate)
    if len(private) != KEY_BYTES or certificate[2 + len(name.encode()) :][:KEY_BYTES] != cred.public():
        raise CertificateError(f"credential of device {name!r} does not match its certificate")
    return cred


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m federation.secagg.pki DIR N`: a CA and credentials for partitions 0..N-1."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or not args[1].isdigit():
        raise SystemExit("usage: python -m federation.secagg.pki DIRECTORY NUM_DEVICES")
    root = create_fleet_pki(args[0], [device_name_for(p) for p in range(int(args[1]))])
    print(f"CA and {args[1]} device credentials written to {root} (keep ca.key away from the server)")


if __name__ == "__main__":
    main()
