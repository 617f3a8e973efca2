"""Device certificates: stored on the token with the key's CKA_ID, and reported by `info`."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import textwrap

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fixtures_provision import ProvisionLab

from device_sdk.config import DeviceConfig, load_config, save_config

# Runs in a child process with the lab's SOFTHSM2_CONF, so this test process never loads SoftHSM.
STORE_CERTIFICATE = textwrap.dedent(
    """
    import datetime, json, sys
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from pathlib import Path
    from device_sdk.keys import pkcs11
    from device_sdk.provisioning import keystore

    ref = keystore.KeyReference.parse(sys.argv[1])
    key = keystore.find_key(ref)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.device_id)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    before = keystore.find_certificate_location(ref, Path("/nonexistent.pem"))
    keystore.store_certificate(ref, der)
    keystore.store_certificate(ref, der)
    after = keystore.find_certificate_location(ref, Path("/nonexistent.pem"))
    stored = pkcs11.find_certificate(ref.text)
    print(json.dumps({
        "before": before,
        "after": after,
        "same": stored.public_bytes(serialization.Encoding.DER) == der,
    }))
    """
)


def test_certificate_stored_on_token(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    provisioned = lab.run(
        *lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file())
    )
    assert provisioned.returncode == 0, provisioned.stderr

    completed = subprocess.run(
        [sys.executable, "-c", STORE_CERTIFICATE, load_config(config_path).key_uri],
        env=lab.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["before"] is None
    assert result["after"].startswith("token (pkcs11:token=edge-01;")
    assert result["same"] is True
    assert lab.count_objects(token) == {"private_keys": 1, "certificates": 1}

    info = lab.run("info", "--config", str(config_path), "--json")
    assert info.returncode == 0, info.stderr
    certificate = json.loads(info.stdout)["certificate"]
    assert certificate["location"] == "token"
    assert 29.9 < certificate["days_left"] <= 30.0


def test_info_reads_certificate_file(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    provisioned = lab.run(
        *lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file())
    )
    assert provisioned.returncode == 0, provisioned.stderr
    config = load_config(config_path)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, config.device_id)])
    expired_at = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(expired_at - datetime.timedelta(days=1))
        .not_valid_after(expired_at)
        .sign(key, hashes.SHA256())
    )
    cert_path = lab.directory / "device.cert.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    fields = {f: getattr(config, f) for f in DeviceConfig.__dataclass_fields__}
    save_config(DeviceConfig(**{**fields, "certificate_path": cert_path}), config_path)

    info = lab.run("info", "--config", str(config_path), "--json")

    assert info.returncode == 1
    report = json.loads(info.stdout)
    assert report["certificate"]["location"] == str(cert_path)
    assert report["certificate"]["not_after"] == "2024-01-01T00:00:00+00:00"
    assert report["certificate"]["days_left"] < 0
    assert report["problems"] == ["the device certificate expired on 2024-01-01T00:00:00+00:00"]
