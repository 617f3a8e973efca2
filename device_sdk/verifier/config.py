"""Configuration of a :class:`~device_sdk.verifier.core.Verifier`."""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sdk.auth.assertion import is_tls_audience
from device_sdk.auth.challenge import MAX_CHALLENGE_LIFETIME
from device_sdk.auth.channel_binding import tls_server_end_point
from device_sdk.auth.flows import TOKEN_PATH
from device_sdk.errors import ConfigError
from device_sdk.verifier.device_ca import DEFAULT_CERTIFICATE_LIFETIME
from device_sdk.verifier.jws import MAX_ASSERTION_BYTES
from device_sdk.verifier.ratelimit import RateLimit
from device_sdk.verifier.signatures import SUPPORTED_ALGORITHMS

MAX_LEEWAY = 300
MAX_ACCESS_TOKEN_LIFETIME = 3600


def channel_bindings_from_pem(*paths: str | Path) -> frozenset[bytes]:
    """Return the ``tls-server-end-point`` values of the certificates in PEM files.

    Give every certificate the server may present, the old and the new one during a rotation.
    Only the first certificate of each file (the leaf) is used; the rest is the chain.
    """
    values = set()
    for path in paths:
        try:
            certificate = x509.load_pem_x509_certificates(Path(path).read_bytes())[0]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read a PEM certificate from {path}: {exc}") from None
        values.add(tls_server_end_point(certificate.public_bytes(serialization.Encoding.DER)))
    return frozenset(values)


def ek_certificates_from_pem(
    *paths: str | Path,
) -> tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]]:
    """Return the trusted EK roots and intermediate CAs in PEM files, for TPM attestation.

    Self-signed certificates are the roots; every other certificate is an intermediate CA that
    must chain to a root. A file may contain several certificates.
    """
    roots: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for path in paths:
        try:
            certificates = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read EK CA certificates from {path}: {exc}") from None
        for certificate in certificates:
            if certificate.issuer == certificate.subject:
                roots.append(certificate)
            else:
                intermediates.append(certificate)
    if paths and not roots:
        raise ConfigError(
            f"{', '.join(str(path) for path in paths)} contain no self-signed root CA "
            "certificate; add the EK root of the TPM maker"
        )
    return tuple(roots), tuple(intermediates)


def _check_audience_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ConfigError(f"{what} {url!r} is not an absolute URL such as https://host:port")


def _check_topic_prefix(prefix: str) -> None:
    """Raise :class:`ConfigError` unless ``prefix`` is a topic subtree with plain {device_id}."""
    example = "devices/{device_id}/"
    try:
        parts = list(string.Formatter().parse(prefix))
    except ValueError:
        parts = [("", "?", None, None)]
    fields = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
    literal = "".join(text for text, _, _, _ in parts)
    if not fields or any(field != ("device_id", "", None) for field in fields):
        raise ConfigError(
            f"device topic prefix {prefix!r} must contain the field {{device_id}}, with no "
            f"other field, index, conversion or format, as in {example}"
        )
    if "{" in literal or "}" in literal:
        raise ConfigError(f"device topic prefix {prefix!r} contains a literal brace")
    if not prefix.endswith("/"):
        raise ConfigError(f"device topic prefix {prefix!r} must end with '/', as in {example}")
    if prefix.startswith("$") or any(char in literal for char in "+#") or any(
        ord(char) < 0x20 or ord(char) == 0x7F for char in literal
    ):
        raise ConfigError(
            f"device topic prefix {prefix!r} starts with '$' or contains an MQTT wildcard "
            "(+ or #) or a control character"
        )


def broker_name(url: str) -> str:
    """Return the name of a broker audience in webhook paths: its host and port, lower case.

    ``mqtts://Broker.example.com:8883`` is ``broker.example.com:8883``.
    """
    return urlsplit(url).netloc.lower()


def _check_bindings(url: str, bindings: frozenset[bytes], what: str) -> None:
    if is_tls_audience(url) and not bindings:
        raise ConfigError(
            f"{what} {url} is a TLS URL but no certificate hashes are configured; pass the "
            "tls-server-end-point values of its certificates (channel_bindings_from_pem)"
        )
    if not is_tls_audience(url) and bindings:
        raise ConfigError(f"{what} {url} is not a TLS URL, so it takes no channel bindings")


@dataclass(frozen=True)
class VerifierConfig:
    """Settings of a verifier. Times are in seconds.

    ``issuer`` is the verifier's public URL, which is also the ``aud`` of HTTP login assertions;
    ``http_channel_bindings`` contains the ``tls-server-end-point`` values of every certificate it
    may present (several during a rotation). ``broker_audiences`` maps each broker URL to the
    values of that broker's certificates. A non-TLS URL (``http:``, ``mqtt:``) takes an empty
    set, and its assertions must then carry no ``cb``. ``nonceless_audiences`` lists broker URLs
    that also accept the weaker assertions without a challenge nonce. A rate limit of None is off.
    ``device_topic_prefix``, when set, is the only MQTT topic subtree a device may publish and
    subscribe to, written with ``{device_id}``, for example ``devices/{device_id}/``. The MQTT
    client id of a device must then start with its device id, so that no device can take over
    another one's persistent session and read the messages queued for it.
    """

    issuer: str
    http_channel_bindings: frozenset[bytes] = frozenset()
    broker_audiences: Mapping[str, frozenset[bytes]] = field(default_factory=dict)
    token_url: str | None = None
    leeway: int = 30
    challenge_lifetime: int = 60
    access_token_lifetime: int = 300
    enrollment_token_lifetime: int | None = 7 * 24 * 3600
    algorithms: frozenset[str] = SUPPORTED_ALGORITHMS
    max_assertion_bytes: int = MAX_ASSERTION_BYTES
    challenge_limit_per_device: RateLimit | None = RateLimit(capacity=10, per_second=1 / 6)
    challenge_limit_per_address: RateLimit | None = RateLimit(capacity=60, per_second=1.0)
    # Failed logins whose signature verified (replays, expired, wrong audience ...) count
    # against the device. Every other failure counts against the client address only, because
    # anyone can name a device in kid.
    # NOTE: a replay counts against the device too, so someone who captured a used assertion
    # (from a broker log or a proxy) can still spend this budget without the device key.
    failure_limit_per_device: RateLimit | None = RateLimit(capacity=10, per_second=1 / 30)
    failure_limit_per_address: RateLimit | None = RateLimit(capacity=30, per_second=1.0)
    nonceless_audiences: frozenset[str] = frozenset()
    device_topic_prefix: str | None = None
    # TPM attestation at enrollment: trusted EK CAs (ek_certificates_from_pem), and whether a
    # device without an attested key is rejected with reason attestation_required.
    ek_roots: tuple[x509.Certificate, ...] = ()
    ek_intermediates: tuple[x509.Certificate, ...] = ()
    require_attestation: bool = False
    # Lifetime of the client certificates the device CA issues, in seconds.
    device_certificate_lifetime: int = DEFAULT_CERTIFICATE_LIFETIME

    def __post_init__(self) -> None:
        _check_audience_url(self.issuer, "issuer")
        _check_bindings(self.issuer, self.http_channel_bindings, "issuer")
        for url, bindings in self.broker_audiences.items():
            _check_audience_url(url, "broker audience")
            _check_bindings(url, bindings, "broker audience")
            # The host and port name the broker in webhook paths, which are logged and which
            # the server percent-decodes, so a user, password or escape there would not work.
            if "@" in broker_name(url) or "%" in broker_name(url):
                raise ConfigError(
                    f"broker audience {url!r} has a user, password or %-escape in its host part; "
                    "write it as scheme://host:port"
                )
        if self.issuer in self.broker_audiences:
            raise ConfigError(f"{self.issuer} is both the issuer and a broker audience")
        names: dict[str, str] = {}
        for url in self.broker_audiences:
            other = names.setdefault(broker_name(url), url)
            if other != url:
                raise ConfigError(
                    f"broker audiences {other} and {url} share the host and port "
                    f"{broker_name(url)}, which names a broker in webhook paths; give each "
                    "broker its own host and port"
                )

        if self.device_topic_prefix is not None:
            _check_topic_prefix(self.device_topic_prefix)
        unknown = self.nonceless_audiences - set(self.broker_audiences)
        if unknown:
            raise ConfigError(f"nonceless audiences {sorted(unknown)} are not broker audiences")
        unsupported = self.algorithms - SUPPORTED_ALGORITHMS
        if unsupported or not self.algorithms:
            raise ConfigError(
                f"algorithms {sorted(unsupported)} are not supported; "
                f"choose from {sorted(SUPPORTED_ALGORITHMS)}"
            )

        if not 1 <= self.challenge_lifetime <= MAX_CHALLENGE_LIFETIME:
            raise ConfigError(
                f"challenge lifetime {self.challenge_lifetime} s is outside "
                f"1..{MAX_CHALLENGE_LIFETIME} s"
            )
        if not 0 <= self.leeway <= MAX_LEEWAY:
            raise ConfigError(f"leeway {self.leeway} s is outside 0..{MAX_LEEWAY} s")
        if not 1 <= self.access_token_lifetime <= MAX_ACCESS_TOKEN_LIFETIME:
            raise ConfigError(
                f"access token lifetime {self.access_token_lifetime} s is outside "
                f"1..{MAX_ACCESS_TOKEN_LIFETIME} s"
            )
        if self.require_attestation and not self.ek_roots:
            raise ConfigError(
                "require_attestation needs trusted EK root certificates (--ek-ca PEM); "
                "without them no device can be attested"
            )
        if self.ek_intermediates and not self.ek_roots:
            raise ConfigError("EK intermediate CAs are given, but no EK root CA")
        if self.device_certificate_lifetime < 60:
            raise ConfigError(
                f"device certificate lifetime {self.device_certificate_lifetime} s is below 60 s"
            )
        if self.max_assertion_bytes < 512:
            raise ConfigError(f"max assertion size {self.max_assertion_bytes} is below 512 bytes")

    @property
    def expected_token_url(self) -> str:
        """The ``htu`` an HTTP login assertion must carry: ``token_url`` or issuer + /v1/token."""
        return self.token_url or self.issuer.rstrip("/") + TOKEN_PATH

    def channel_bindings_for(self, audience: str) -> frozenset[bytes] | None:
        """Return the accepted channel bindings of an audience, or None if it is not served."""
        if audience == self.issuer:
            return self.http_channel_bindings
        return self.broker_audiences.get(audience)

    def topic_allowed(self, device_id: str, topic: str) -> bool:
        """Tell whether a device may publish to ``topic`` or subscribe to it as a filter.

        Without ``device_topic_prefix`` every topic is allowed. With it, the topic must start
        with the prefix filled in with ``device_id``. A device id has no ``+``, ``#`` or ``/``,
        so a filter that starts with the filled-in prefix matches only topics below it.
        """
        if self.device_topic_prefix is None:
            return True
        return topic.startswith(self.device_topic_prefix.format(device_id=device_id))

    def client_id_allowed(self, device_id: str, client_id: str | None) -> bool:
        """Tell whether a device may connect with this MQTT client id.

        Without ``device_topic_prefix`` any client id is allowed. With it, the client id must
        start with the device id. Device ids all have 43 characters, so a client id that starts
        with one device's id can never equal one that starts with another's.
        """
        if self.device_topic_prefix is None:
            return True
        return isinstance(client_id, str) and client_id.startswith(device_id)

    def broker_audience_named(self, name: str) -> str | None:
        """Return the broker audience whose :func:`broker_name` is ``name``, or None."""
        for url in self.broker_audiences:
            if broker_name(url) == name:
                return url
        return None

    @property
    def audiences(self) -> Iterable[str]:
        """Every audience this verifier issues challenges for."""
        return (self.issuer, *self.broker_audiences)
