"""Verifier and device fixtures for the auth and verifier tests.

Devices here hold software keys from ``cryptography``: the protocol code accepts any
``cryptography`` private key, and hardware keys are such keys too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from device_sdk.auth import (
    Challenge,
    b64url_decode,
    b64url_encode,
    build_assertion,
    device_id_of,
)
from device_sdk.auth.assertion import PrivateKey
from device_sdk.verifier import (
    DeviceRegistry,
    MemoryChallengeStore,
    SQLiteDeviceRegistry,
    Verifier,
    VerifierConfig,
)

ISSUER = "https://verifier.test"
TOKEN_URL = ISSUER + "/v1/token"
TLS_BROKER = "mqtts://broker.test:8883"
PLAIN_BROKER = "mqtt://127.0.0.1:1883"
NONCELESS_BROKER = "mqtt://127.0.0.1:1884"

# Stand-ins for tls-server-end-point values: two verifier certificates (a rotation) and one broker.
HTTP_CB = b"\x11" * 32
HTTP_CB_ROTATED = b"\x22" * 48
BROKER_CB = b"\x33" * 32

ALGORITHMS = ("ES256", "ES384", "EdDSA", "PS256")


class ManualClock:
    """A wall clock that tests move by hand; it starts at the real time."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_key(algorithm: str) -> PrivateKey:
    """Return a new software private key for a JWS algorithm."""
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "PS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(algorithm)


def make_csr(key: PrivateKey) -> bytes:
    """Return a PEM CSR signed by ``key``."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id_of(key))])
    )
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest).public_bytes(serialization.Encoding.PEM)


@dataclass
class Device:
    """An enrolled test device."""

    key: PrivateKey
    device_id: str
    algorithm: str


def enroll(verifier: Verifier, algorithm: str = "ES256") -> Device:
    """Create a key and enroll it with ``verifier``."""
    key = make_key(algorithm)
    token = verifier.create_enrollment_tokens()[0]
    record, created = verifier.enroll(make_csr(key), token, "software", False)
    assert created
    return Device(key, record.device_id, record.algorithm)


def verifier_config(**overrides: Any) -> VerifierConfig:
    """Return the test verifier configuration; rate limits are off unless overridden."""
    settings: dict[str, Any] = {
        "issuer": ISSUER,
        "http_channel_bindings": frozenset({HTTP_CB, HTTP_CB_ROTATED}),
        "broker_audiences": {
            TLS_BROKER: frozenset({BROKER_CB}),
            PLAIN_BROKER: frozenset(),
            NONCELESS_BROKER: frozenset(),
        },
        "nonceless_audiences": frozenset({NONCELESS_BROKER}),
        "challenge_limit_per_device": None,
        "challenge_limit_per_address": None,
        "failure_limit_per_device": None,
        "failure_limit_per_address": None,
    }
    settings.update(overrides)
    return VerifierConfig(**settings)


def make_verifier(
    tmp_path: Path,
    clock: ManualClock,
    *,
    registry: DeviceRegistry | None = None,
    **overrides: Any,
) -> Verifier:
    """Return a verifier with an in-memory challenge store and ``registry``.

    The registry defaults to a SQLite one in ``tmp_path``.
    """
    return Verifier(
        verifier_config(**overrides),
        registry=registry or SQLiteDeviceRegistry(tmp_path / "registry.db"),
        challenges=MemoryChallengeStore(clock),
        clock=clock,
    )


def http_assertion(
    verifier: Verifier, device: Device, *, channel_binding: bytes | None = HTTP_CB, **kwargs: Any
) -> str:
    """Fetch a challenge for the issuer and return the signed HTTP login assertion."""
    challenge = Challenge.from_json(verifier.issue_challenge(device.device_id, ISSUER, "192.0.2.1"))
    kwargs.setdefault("htm", "POST")
    kwargs.setdefault("htu", TOKEN_URL)
    return build_assertion(device.key, challenge, channel_binding=channel_binding, **kwargs)


def encode_jws(header: dict[str, Any], payload: dict[str, Any], signature: bytes) -> str:
    """Assemble a compact JWS from arbitrary parts, to build assertions no honest device makes."""
    parts = [
        b64url_encode(json.dumps(header, separators=(",", ":")).encode()),
        b64url_encode(json.dumps(payload, separators=(",", ":")).encode()),
        b64url_encode(signature),
    ]
    return ".".join(parts)


def decode_part(part: str) -> dict[str, Any]:
    """Decode one JSON part of a compact JWS."""
    value: dict[str, Any] = json.loads(b64url_decode(part))
    return value


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


REGISTRY_KINDS = ("sqlite", "postgres")


@pytest.fixture
def registry_kind() -> str:
    """The registry of the ``verifier`` fixture.

    A test module runs its tests on every registry by overriding this fixture with
    ``params=REGISTRY_KINDS``.
    """
    return "sqlite"


@pytest.fixture
def open_registry(
    registry_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[], DeviceRegistry]:
    """Return a function that opens another registry on the test's one database.

    The PostgreSQL database is new for each test, so tests do not see each other's rows.
    """
    if registry_kind == "postgres":
        from device_sdk.verifier.postgres import PostgresDeviceRegistry

        url: str = request.getfixturevalue("postgres_database")
        return lambda: PostgresDeviceRegistry(url)
    if registry_kind == "sqlite":
        return lambda: SQLiteDeviceRegistry(tmp_path / "registry.db")
    raise ValueError(f"unknown registry kind {registry_kind!r}")


@pytest.fixture
def open_verifier(
    registry_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., Verifier]:
    """Return ``open_verifier(config, **options)``: :meth:`Verifier.open` on the test's registry.

    SQLite keeps challenges in its database file. PostgreSQL keeps them in Redis (emptied
    before the test) and the signing key in ``tmp_path``, as ``Verifier.open`` requires.
    """
    if registry_kind == "postgres":
        url: str = request.getfixturevalue("postgres_database")
        request.getfixturevalue("redis_client")
        redis_url: str = request.getfixturevalue("redis_server").url

        def open_postgres(config: VerifierConfig, **options: Any) -> Verifier:
            return Verifier.open(
                None,
                config,
                registry_url=url,
                redis_url=redis_url,
                signing_key_path=tmp_path / "signing-key.pem",
                **options,
            )

        return open_postgres

    def open_sqlite(config: VerifierConfig, **options: Any) -> Verifier:
        return Verifier.open(tmp_path / "verifier.db", config, **options)

    return open_sqlite


@pytest.fixture
def verifier(
    tmp_path: Path, clock: ManualClock, open_registry: Callable[[], DeviceRegistry]
) -> Iterator[Verifier]:
    instance = make_verifier(tmp_path, clock, registry=open_registry())
    yield instance
    instance.close()


@pytest.fixture
def device(verifier: Verifier) -> Device:
    return enroll(verifier, "ES256")
