"""The serial key backend against the firmware simulator on a pseudo-terminal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import termios
import threading

import jwt
import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fixtures_serial import Simulator

from device_sdk.errors import (
    ConfigError,
    KeyExistsError,
    KeyExportError,
    KeyNotFoundError,
    SerialDeviceError,
    SerialLinkError,
)
from device_sdk.keys import compute_device_id
from device_sdk.keys import open_key as open_any_key
from device_sdk.keys import serial as serial_keys
from device_sdk.keys.serial import SerialECKey, generate_key, open_key

ECDSA = ec.ECDSA(hashes.SHA256())


def test_generate_then_open_same_key(serial_simulator: Simulator) -> None:
    created = generate_key(serial_simulator.uri, "ec-p256")
    opened = open_key(serial_simulator.uri)

    assert isinstance(created, ec.EllipticCurvePrivateKey)
    assert isinstance(opened, SerialECKey)
    assert opened.public_key().public_numbers() == created.public_key().public_numbers()
    assert opened.curve.name == "secp256r1"
    assert opened.backend == "serial"
    assert opened.device_id == compute_device_id(created.public_key())
    assert opened.uri == f"serial:{serial_simulator.link}?baud=115200&slot=0"


def test_open_key_dispatches_serial_uri(serial_simulator: Simulator) -> None:
    created = generate_key(serial_simulator.uri, "ec-p256")

    key = open_any_key(serial_simulator.uri)

    assert isinstance(key, SerialECKey)
    assert key.device_id == created.device_id


def test_simulator_key_not_hardware_backed(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    info = key.device_info()

    assert info.element == "software"
    assert info.firmware_version == "1.0.0"
    assert info.protocol_version == 1
    assert info.slot_count == 16
    assert info.max_payload == 240
    assert len(info.serial_number) == 18
    assert key.hardware_backed is False


def test_public_key_matches_state_file(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    pem = (serial_simulator.state_dir / "slot-0.pem").read_bytes()
    private = serialization.load_pem_private_key(pem, password=None)

    assert private.public_key().public_numbers() == key.public_key().public_numbers()


def test_200_signatures_all_verify(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    public = key.public_key()

    for index in range(200):
        message = b"challenge %d" % index
        signature = key.sign(message, ECDSA)
        public.verify(signature, message, ECDSA)


def test_counter_strictly_increasing(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    start = key.counter(increment=False)

    values = [key.counter() for _ in range(20)]

    assert values == list(range(start + 1, start + 21))
    assert key.counter(increment=False) == values[-1]
    assert key.counter(counter_id=1, increment=False) == 0


def test_counter_survives_restart(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    before = [key.counter() for _ in range(3)]

    serial_simulator.stop()
    serial_simulator.start()

    assert key.counter() == before[-1] + 1


def test_lock_refuses_new_key(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")

    assert key.is_locked() is False
    assert key.lock() is True
    assert key.lock() is False
    assert key.is_locked() is True
    with pytest.raises(SerialDeviceError, match="slot 0 .* is locked against new keys") as caught:
        generate_key(serial_simulator.uri, "ec-p256", replace=True)
    assert caught.value.status_name == "SLOT_LOCKED"
    assert caught.value.status == 0x0C

    key.public_key().verify(key.sign(b"still signs", ECDSA), b"still signs", ECDSA)


def test_lock_survives_restart(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    key.lock()

    serial_simulator.stop()
    serial_simulator.start()

    assert key.is_locked() is True
    state = json.loads((serial_simulator.state_dir / "state.json").read_text())
    assert state["locked"] == [0]


def test_lock_empty_slot_rejected(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")

    with pytest.raises(SerialDeviceError, match="SLOT_EMPTY .* locking it would leave it empty"):
        key.link.request(0x06, bytes((3,)), repeatable=False)


def test_generate_on_occupied_slot(serial_simulator: Simulator) -> None:
    first = generate_key(serial_simulator.uri, "ec-p256")

    with pytest.raises(KeyExistsError, match="slot 0 .* already contains a key"):
        generate_key(serial_simulator.uri, "ec-p256")
    replaced = generate_key(serial_simulator.uri, "ec-p256", replace=True)

    assert replaced.device_id != first.device_id


def test_open_empty_slot_not_found(serial_simulator: Simulator) -> None:
    with pytest.raises(KeyNotFoundError, match="slot 5 .* is empty; create one"):
        open_key(serial_simulator.uri_for_slot(5))


def test_slot_out_of_range(serial_simulator: Simulator) -> None:
    with pytest.raises(ConfigError, match="slot 16 .* does not exist: the element has 16 slots"):
        open_key(serial_simulator.uri_for_slot(16))


def test_unknown_algorithm_rejected(serial_simulator: Simulator) -> None:
    with pytest.raises(ConfigError, match="cannot make 'ed25519' keys; use ec-p256"):
        generate_key(serial_simulator.uri, "ed25519")


def test_only_sha256_digests(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")

    with pytest.raises(UnsupportedAlgorithm, match="signs 32-byte digests only, not 48 bytes"):
        key.sign(b"data", ec.ECDSA(hashes.SHA384()))


def test_export_refused(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")

    with pytest.raises(KeyExportError, match="stays inside the serial secure element"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def test_csr_and_jwt_signed_by_key(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    token = jwt.encode({"sub": key.device_id}, key, algorithm="ES256")

    assert csr.is_signature_valid
    assert jwt.decode(token, key.public_key(), algorithms=["ES256"]) == {"sub": key.device_id}


def test_eight_threads_sign_at_once(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    public = key.public_key()
    failures: list[BaseException] = []

    def sign_many(worker: int) -> None:
        try:
            for index in range(25):
                message = b"worker %d message %d" % (worker, index)
                public.verify(key.sign(message, ECDSA), message, ECDSA)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=sign_many, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert failures == []
    assert not any(thread.is_alive() for thread in threads)


def test_restart_between_signs_reconnects(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    public = key.public_key()
    public.verify(key.sign(b"before", ECDSA), b"before", ECDSA)
    old_path = serial_simulator.pty_path
    connections = key.link.connections

    serial_simulator.stop()
    serial_simulator.start()
    signature = key.sign(b"after", ECDSA)

    public.verify(signature, b"after", ECDSA)
    assert key.link.connections == connections + 1
    assert open_key(serial_simulator.uri).device_id == key.device_id
    # Each start opens a new pseudo-terminal; only the --link path stays the same.
    assert serial_simulator.pty_path != old_path or serial_simulator.starts == 2


def test_sign_waits_for_simulator_start(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    serial_simulator.stop()

    starter = threading.Timer(0.5, serial_simulator.start)
    starter.start()
    try:
        signature = key.sign(b"while restarting", ECDSA)
    finally:
        starter.join()

    key.public_key().verify(signature, b"while restarting", ECDSA)


def test_other_device_after_restart_rejected(serial_simulator: Simulator) -> None:
    key = generate_key(serial_simulator.uri, "ec-p256")
    serial_simulator.stop()
    shutil.rmtree(serial_simulator.state_dir)
    serial_simulator.start()
    generate_key(serial_simulator.uri, "ec-p256")

    with pytest.raises(
        SerialLinkError, match="slot 0 .* contains a different key than when it was opened"
    ):
        key.sign(b"to the wrong device", ECDSA)


def test_missing_device_names_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    link = serial_keys.SerialLink(str(tmp_path / "absent"), connect_timeout=0.3)

    with pytest.raises(SerialLinkError, match=r"cannot open serial device .*absent within 0.3 s"):
        link.request(0x01)


def test_baud_mismatch_rejected(serial_simulator: Simulator) -> None:
    generate_key(serial_simulator.uri, "ec-p256")

    with pytest.raises(ConfigError, match="already open at 115200 baud in this process, not 9600"):
        open_key(f"serial:{serial_simulator.link}?baud=9600&slot=0")


def test_simulator_pty_in_raw_mode(serial_simulator: Simulator) -> None:
    descriptor = os.open(serial_simulator.pty_path, os.O_RDWR | os.O_NOCTTY)
    try:
        attributes = termios.tcgetattr(descriptor)
    finally:
        os.close(descriptor)

    assert serial_simulator.pty_path.startswith("/dev/pts/")
    assert attributes[3] & (termios.ECHO | termios.ICANON | termios.ISIG) == 0
    assert attributes[1] & termios.OPOST == 0


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_simulator_stops_on_signal(serial_simulator: Simulator, signal_number: int) -> None:
    process = serial_simulator.process
    assert process is not None

    os.kill(process.pid, signal_number)
    status = process.wait(timeout=10)

    assert status == 0
    assert not serial_simulator.link.exists()
    assert not serial_simulator.link.is_symlink()


def test_second_open_of_port_rejected(serial_simulator: Simulator) -> None:
    first = serial_keys.SerialLink(str(serial_simulator.link))
    second = serial_keys.SerialLink(str(serial_simulator.link), connect_timeout=0.3)
    first.request(0x01)
    try:
        with pytest.raises(SerialLinkError, match="Could not exclusively lock port") as caught:
            second.request(0x01)
        assert "no other process has it open" in str(caught.value)
    finally:
        first.close()
        second.close()
