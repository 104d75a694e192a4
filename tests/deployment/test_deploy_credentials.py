"""Certified secure-aggregation device keys for a deployment, issued from `fedge certs init`'s CA:
what `fedge deploy up` writes for each device, what each SuperNode is told, and what a run on
the deployment is configured with. (The deployment test in test_deploy_local.py runs a secure
round with them end to end.)"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from federation.errors import FedgeError
from federation.secagg import pki
from simulations.credentials import init_certificates, secagg_device_credential
from simulations.deploy import DeploymentState, NodeSpec


def test_a_device_credential_is_certified_by_the_operator_ca_and_private(tmp_path: Path) -> None:
    certs = init_certificates(tmp_path / "certs")
    key, cert = secagg_device_credential(certs.directory, tmp_path / "dep", "sensor-1")
    assert key == tmp_path / "dep" / "devices" / "sensor-1.key" and cert.name == "sensor-1.cert"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    credential = pki.load_credential(tmp_path / "dep", "sensor-1")  # the layout the device reads
    name, public = pki.verify_certificate(certs.ca_pub.read_bytes(), credential.certificate)
    assert (name, public) == ("sensor-1", credential.public())
    # another CA's devices are not this CA's
    other = init_certificates(tmp_path / "other")
    with pytest.raises(pki.CertificateError):
        pki.verify_certificate(other.ca_pub.read_bytes(), credential.certificate)


def test_a_device_credential_is_never_overwritten_without_force(tmp_path: Path) -> None:
    certs = init_certificates(tmp_path / "certs")
    key, _ = secagg_device_credential(certs.directory, tmp_path, "tv-0")
    before = key.read_bytes()
    with pytest.raises(FedgeError, match="not overwritten"):
        secagg_device_credential(certs.directory, tmp_path, "tv-0")
    assert key.read_bytes() == before
    secagg_device_credential(certs.directory, tmp_path, "tv-0", force=True)
    assert key.read_bytes() != before
    with pytest.raises(FedgeError, match="not a valid file name"):
        secagg_device_credential(certs.directory, tmp_path, "../tv-0")


def test_without_the_ca_key_no_credential_is_issued(tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match="cannot read the CA key"):
        secagg_device_credential(tmp_path / "no-ca", tmp_path, "phone-0")
    assert not (tmp_path / "devices" / "phone-0.key").exists()


def test_a_secure_deployment_names_each_nodes_credential_and_requires_certified_keys(tmp_path: Path) -> None:
    state = DeploymentState(str(tmp_path), "deploy-check", 9999, insecure=False, token="t")
    spec = NodeSpec("sensor-2", "device-class='sensor' partition-id=2 tier='high'")
    node_config = state.node_config(spec)
    assert node_config.startswith(spec.node_config)
    assert f"secagg-device-name='sensor-2' secagg-credentials='{tmp_path}'" in node_config
    config = state.run_config({"scenario": "deploy-check"})
    assert config["secagg-pki"] == str(tmp_path / "certs")
    assert state.run_config({"secagg-pki": "/elsewhere"})["secagg-pki"] == "/elsewhere"  # explicit wins
    plain = DeploymentState(str(tmp_path), "deploy-check", 9999, insecure=True, token="t")
    assert plain.node_config(spec) == spec.node_config and "secagg-pki" not in plain.run_config({})


def test_fedge_secagg_key_issues_a_device_credential_from_the_ca(tmp_path: Path) -> None:
    """The command a multi-host operator runs per device (docs/deployment.md)."""
    fedge = str(Path(sys.executable).parent / "fedge")
    certs = init_certificates(tmp_path / "creds")
    args = [fedge, "secagg-key", "watch-3", "--ca", str(certs.directory), "--out", str(tmp_path / "watch-3")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "secagg-device-name='watch-3'" in done.stdout
    credential = pki.load_credential(tmp_path / "watch-3", "watch-3")
    assert pki.verify_certificate(certs.ca_pub.read_bytes(), credential.certificate)[0] == "watch-3"
    again = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 2 and "not overwritten" in again.stderr
