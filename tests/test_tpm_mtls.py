"""MQTT over mutual TLS to Mosquitto with a TPM-held client key, through tpm2-openssl.

The client certificate is the one the verifier issued when the key enrolled, and Mosquitto
trusts the verifier's device CA (its ``cafile``). swtpm sits behind tpm2-abrmd, because the tpm2
provider keeps the key loaded for the context's lifetime. The MQTT client runs in a subprocess:
OpenSSL reads OPENSSL_CONF when Python starts.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import ssl
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from fixtures_services import Mosquitto, TestPKI
from fixtures_tpm import Abrmd, require_tpm_stack
from fixtures_verifier import verifier_config
from test_verifier_device_ca import write_ca

from device_sdk.errors import ConfigError
from device_sdk.provisioning.csr import build_csr
from device_sdk.verifier import Verifier
from device_sdk.verifier.app import create_app
from device_sdk.verifier.device_ca import DeviceCA

try:
    from device_sdk.keys import tpm, tpm_tls
except ImportError:
    # The autouse fixture below skips every test, with the install command as the reason.
    pass

TPM2_PROVIDER = Path("/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so")

CLIENT = textwrap.dedent(
    """
    import json, ssl, sys, time
    import paho.mqtt.client as mqtt
    from device_sdk.keys import tpm_tls

    certificate, key_uri, ca_file, port, tls_version = sys.argv[1:6]
    context = tpm_tls.client_context(certificate, key_uri, ca_file)
    if tls_version == "1.2":
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    result = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tpm-device")
    client.tls_set_context(context)
    client.on_connect = lambda c, u, f, reason, p: result.update(reason=str(reason))
    started = time.monotonic()
    try:
        client.connect("127.0.0.1", int(port), keepalive=30)
        deadline = time.monotonic() + 20
        while "reason" not in result and time.monotonic() < deadline:
            client.loop(timeout=0.2)
        result["tls_version"] = client.socket().version() if client.socket() else None
        result["seconds"] = time.monotonic() - started
        client.disconnect()
    except (ssl.SSLError, OSError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))
    """
)


@pytest.fixture(autouse=True)
def _tpm_stack() -> None:
    require_tpm_stack()
    if not TPM2_PROVIDER.exists():
        pytest.skip(
            "the OpenSSL tpm2 provider is not installed; install it with: apt install tpm2-openssl"
        )
    if shutil.which("tpm2-abrmd") is None:
        pytest.skip("tpm2-abrmd is not installed; install it with: apt install tpm2-abrmd")


@dataclass
class DeviceTLS:
    key_uri: str
    device_id: str
    certificate: Path
    openssl_conf: Path
    device_ca: Path


def enroll_for_certificate(key: object, directory: Path) -> str:
    """Enroll ``key`` with a verifier that is a device CA; return the certificate it issued."""
    ca_cert, ca_key = write_ca(directory)
    verifier = Verifier.open(
        directory / "verifier.db", verifier_config(), device_ca_cert=ca_cert, device_ca_key=ca_key
    )
    try:
        token = verifier.create_enrollment_tokens()[0]
        csr = build_csr(key, key.device_id)  # type: ignore[arg-type, attr-defined]
        with TestClient(create_app(verifier)) as client:
            response = client.post(
                "/v1/enroll",
                json={
                    "csr": csr, "enrollment_token": token, "backend": "tpm",
                    "hardware_backed": True,
                },
            )  # fmt: skip
    finally:
        verifier.close()
    assert response.status_code == 201, response.text
    certificate: str = response.json()["certificate"]
    return certificate


@pytest.fixture(scope="module")
def device_tls(tpm_abrmd: Abrmd, tmp_path_factory: pytest.TempPathFactory) -> DeviceTLS:
    directory = tmp_path_factory.mktemp("device-tls")
    key_uri = f"tpm2:path={directory / 'device.tss2.pem'}?tcti={tpm_abrmd.tcti}"
    key = tpm.generate_key(key_uri, "ec-p256")
    certificate = directory / "device.crt"
    certificate.write_text(enroll_for_certificate(key, directory))
    openssl_conf = tpm_tls.write_openssl_config(directory / "openssl.cnf")
    return DeviceTLS(key_uri, key.device_id, certificate, openssl_conf, directory / "device-ca.pem")


@pytest.fixture
def mtls_port(mosquitto: Mosquitto, test_pki: TestPKI, device_tls: DeviceTLS) -> int:
    port = mosquitto.add_tls_listener(
        test_pki.server.cert_pem,
        test_pki.server.key_pem,
        ca_pem=device_tls.device_ca.read_bytes(),
        require_certificate=True,
    )
    mosquitto.restart()
    return port


def run_client(
    device: DeviceTLS, abrmd: Abrmd, pki: TestPKI, port: int, tls_version: str = "1.3"
) -> dict[str, object]:
    env = abrmd.environment()
    env.update(tpm_tls.openssl_environment(device.openssl_conf, abrmd.tcti))
    completed = subprocess.run(
        [
            sys.executable, "-c", CLIENT, str(device.certificate), device.key_uri,
            str(pki.ca.cert_path), str(port), tls_version,
        ],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    result: dict[str, object] = json.loads(completed.stdout)
    return result


def test_mtls_connect_with_tpm_key(
    device_tls: DeviceTLS, tpm_abrmd: Abrmd, test_pki: TestPKI, mosquitto: Mosquitto, mtls_port: int
) -> None:
    result = run_client(device_tls, tpm_abrmd, test_pki, mtls_port)

    assert result.get("error") is None
    assert result["reason"] == "Success"
    assert result["tls_version"] == "TLSv1.3"
    certificate = x509.load_pem_x509_certificate(device_tls.certificate.read_bytes())
    issuer = x509.load_pem_x509_certificate(device_tls.device_ca.read_bytes())
    assert certificate.issuer == issuer.subject
    # use_identity_as_username: the broker names the client by its certificate's CN.
    assert f"u'{device_tls.device_id}'" in mosquitto.log_tail()


def test_mtls_certificate_of_other_ca_refused(
    device_tls: DeviceTLS,
    tpm_abrmd: Abrmd,
    test_pki: TestPKI,
    mosquitto: Mosquitto,
    mtls_port: int,
    tmp_path: Path,
) -> None:
    # The same TPM key, certified by a CA that Mosquitto's cafile does not contain.
    other_cert, other_key = write_ca(tmp_path)
    key = tpm.open_key(device_tls.key_uri)
    csr = x509.load_pem_x509_csr(build_csr(key, device_tls.device_id).encode("ascii"))  # type: ignore[arg-type]
    certificate = DeviceCA.from_pem_files(other_cert, other_key).issue(
        csr, device_tls.device_id, int(time.time())
    )
    foreign = dataclasses.replace(device_tls, certificate=tmp_path / "foreign.crt")
    foreign.certificate.write_text(certificate)

    result = run_client(foreign, tpm_abrmd, test_pki, mtls_port)

    # With TLS 1.3 the client learns of the rejection only when the broker closes the socket.
    assert "reason" not in result
    assert result["tls_version"] is None
    assert "certificate verify failed" in mosquitto.log_tail()


def test_mtls_tls12_fails(
    device_tls: DeviceTLS, tpm_abrmd: Abrmd, test_pki: TestPKI, mtls_port: int
) -> None:
    result = run_client(device_tls, tpm_abrmd, test_pki, mtls_port, tls_version="1.2")

    assert "reason" not in result
    assert "SSLError" in str(result["error"])


def test_without_client_certificate_refused(
    test_pki: TestPKI, mosquitto: Mosquitto, mtls_port: int
) -> None:
    context = ssl.create_default_context(cafile=str(test_pki.ca.cert_path))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="no-certificate")
    client.tls_set_context(context)
    connected: list[object] = []
    client.on_connect = lambda c, u, f, reason, p: connected.append(reason)

    with pytest.raises((ssl.SSLError, OSError)):
        client.connect("127.0.0.1", mtls_port, keepalive=30)
        for _ in range(50):
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                raise OSError("the broker closed the connection")

    assert connected == []


def test_client_context_needs_openssl_conf(
    device_tls: DeviceTLS, test_pki: TestPKI, monkeypatch: pytest.MonkeyPatch, tpm_abrmd: Abrmd
) -> None:
    monkeypatch.delenv("OPENSSL_CONF", raising=False)
    monkeypatch.setenv("TPM2OPENSSL_TCTI", tpm_abrmd.tcti)

    with pytest.raises(ConfigError, match="OPENSSL_CONF is not set"):
        tpm_tls.client_context(device_tls.certificate, device_tls.key_uri, test_pki.ca.cert_path)


def test_client_context_rejects_handle_uri(test_pki: TestPKI, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the key as a TSS2 PEM blob"):
        tpm_tls.client_context(tmp_path / "c.pem", "tpm2:handle=0x81000001", test_pki.ca.cert_path)


def test_client_context_rejects_other_tcti(
    device_tls: DeviceTLS, test_pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TPM2OPENSSL_TCTI", "device:/dev/tpmrm0")

    with pytest.raises(ConfigError, match="TPM2OPENSSL_TCTI is 'device:/dev/tpmrm0'"):
        tpm_tls.client_context(device_tls.certificate, device_tls.key_uri, test_pki.ca.cert_path)
