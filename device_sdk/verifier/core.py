"""The verifier: issues challenges, checks assertions, signs access tokens, enrolls devices.

Pure Python with no web framework: the ASGI app, the broker plugins and the CLI call this class.
Every decision is written to the audit log (:mod:`device_sdk.verifier.audit`), and every
rejection raises :class:`~device_sdk.errors.VerificationError` whose ``reason`` is one of the
codes in ``docs/protocol.md``. Callers on the network must only ever see a plain 401.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.auth.assertion import ASSERTION_TYPE, MAX_ASSERTION_LIFETIME, new_jti
from device_sdk.auth.challenge import NONCE_BYTES, Challenge
from device_sdk.auth.encoding import b64url_decode, b64url_encode
from device_sdk.auth.flows import MAX_NONCELESS_LIFETIME
from device_sdk.errors import ConfigError, ProtocolError, VerificationError
from device_sdk.verifier.audit import log_decision
from device_sdk.verifier.config import VerifierConfig
from device_sdk.verifier.device_ca import DeviceCA
from device_sdk.verifier.enrollment import (
    Enrollment,
    begin_attestation,
    finish_attestation,
    issue_certificate,
    record_from_csr,
)
from device_sdk.verifier.jws import CompactJWS, parse_compact_jws
from device_sdk.verifier.ratelimit import RateLimit, RateLimiter, TokenBucketLimiter
from device_sdk.verifier.registry import (
    ACTIVE,
    REVOKED,
    DeviceRecord,
    DeviceRegistry,
    SQLiteDeviceRegistry,
    hash_enrollment_token,
)
from device_sdk.verifier.signatures import (
    PublicKey,
    SignatureCheck,
    signature_check,
)
from device_sdk.verifier.stores import ChallengeStore, RedisChallengeStore, SQLiteChallengeStore
from device_sdk.verifier.tokens import (
    decode_access_token,
    load_or_create_signing_key,
    public_jwk,
    sign_access_token,
)
from device_sdk.verifier.tpm_attestation import TpmAttestationVerifier

AudienceKind = Literal["http", "mqtt"]

# A device id is unpadded base64url of a SHA-256 digest: exactly 43 characters.
_DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{43}")
ENROLLMENT_TOKEN_BYTES = 32
_KEY_CACHE_SIZE = 10_000
_HEADER_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class VerifiedAssertion:
    """An assertion that passed every check; its nonce (or ``jti``) is now spent."""

    device_id: str
    jti: str
    audience: str
    nonce: str | None
    issued_at: int
    expires_at: int
    algorithm: str
    record: DeviceRecord


_REQUIRED_STRING_CLAIMS = ("iss", "sub", "aud", "jti")
_OPTIONAL_STRING_CLAIMS = ("nonce", "cb", "htm", "htu")
_INTEGER_CLAIMS = ("iat", "exp")


def _check_claim_types(payload: dict[str, Any]) -> None:
    """Check the type of every claim the verifier reads; raise ``malformed`` otherwise."""
    for name in _REQUIRED_STRING_CLAIMS:
        value = payload.get(name)
        if type(value) is not str or not value:
            raise VerificationError("malformed", f"claim {name!r} must be a non-empty string")
    for name in _OPTIONAL_STRING_CLAIMS:
        value = payload.get(name)
        if value is not None and (type(value) is not str or not value):
            raise VerificationError("malformed", f"claim {name!r} must be a non-empty string")
    # Both are base64url. The stores key on them, and cannot encode a lone surrogate ("\ud800"
    # is valid JSON), so a value that is not ASCII is malformed.
    for name in ("nonce", "jti"):
        value = payload.get(name)
        if value is not None and not value.isascii():
            raise VerificationError("malformed", f"claim {name!r} must be ASCII")
    for name in _INTEGER_CLAIMS:
        # type() and not isinstance(): JSON true is a Python int, but it is not a time.
        if type(payload.get(name)) is not int:
            raise VerificationError("malformed", f"claim {name!r} must be an integer")


def _check_postgres_settings(
    redis_url: str | None, signing_key_path: str | Path | None
) -> None:
    """Raise ConfigError unless a PostgreSQL registry has what several replicas must share."""
    if not redis_url:
        raise ConfigError(
            "a PostgreSQL registry is for several verifier replicas, which must share their "
            "challenges too; pass a Redis URL for the challenges (--redis redis://host:6379/0)"
        )
    if signing_key_path is None:
        raise ConfigError(
            "a PostgreSQL registry has no database file to keep the access-token signing key "
            "beside; pass the path of a key file that every replica reads (--signing-key PATH)"
        )


class Verifier:
    """Server side of the device login protocol.

    ``registry`` stores device records and enrollment tokens, ``challenges`` the issued
    challenges. ``signing_key`` signs access tokens; without one, a fresh key is generated and
    lives only as long as this object (use :meth:`open` to keep it in a file). ``device_ca``,
    if given, issues a client certificate to every enrolled device. ``limiter_factory(limit,
    name)`` makes the rate limiters, in process memory by default; ``Verifier.open`` makes them
    in Redis when the challenges are there, so replicas share the limits. ``clock`` returns Unix
    time and exists for tests. All methods are safe to call from several threads.
    """

    def __init__(
        self,
        config: VerifierConfig,
        *,
        registry: DeviceRegistry,
        challenges: ChallengeStore,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        device_ca: DeviceCA | None = None,
        clock: Callable[[], float] = time.time,
        limiter_factory: Callable[[RateLimit, str], RateLimiter] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.challenges = challenges
        self._clock = clock
        self.device_ca = device_ca
        self._attestation = (
            TpmAttestationVerifier(config.ek_roots, config.ek_intermediates)
            if config.ek_roots
            else None
        )
        self._token_url = config.expected_token_url
        self._signing_key = signing_key or ec.generate_private_key(ec.SECP256R1())
        self._jwk = public_jwk(self._signing_key.public_key())
        self._checks: dict[tuple[str, str, str], SignatureCheck] = {}
        self._checked_headers: dict[str, tuple[str, str]] = {}
        self._checks_lock = threading.Lock()

        make_limiter = limiter_factory or (lambda limit, _name: TokenBucketLimiter(limit))
        self._challenge_per_device = (
            make_limiter(config.challenge_limit_per_device, "challenges-per-device")
            if config.challenge_limit_per_device
            else None
        )
        self._challenge_per_address = (
            make_limiter(config.challenge_limit_per_address, "challenges-per-address")
            if config.challenge_limit_per_address
            else None
        )
        self._failures_per_device = (
            make_limiter(config.failure_limit_per_device, "failures-per-device")
            if config.failure_limit_per_device
            else None
        )
        self._failures_per_address = (
            make_limiter(config.failure_limit_per_address, "failures-per-address")
            if config.failure_limit_per_address
            else None
        )

    @classmethod
    def open(
        cls,
        db_path: str | Path | None,
        config: VerifierConfig,
        *,
        registry_url: str | None = None,
        redis_url: str | None = None,
        signing_key_path: str | Path | None = None,
        device_ca_cert: str | Path | None = None,
        device_ca_key: str | Path | None = None,
    ) -> Verifier:
        """Open a verifier on a SQLite database or a PostgreSQL registry.

        With ``db_path``, the registry is in that SQLite file and challenges are in it or in
        Redis (``redis_url``). With ``registry_url`` (``postgresql://user@host/dbname``) in place
        of ``db_path``, the registry is in PostgreSQL, for several replicas. Replicas must then
        share challenges too, so ``redis_url`` is required, and so is ``signing_key_path``, a
        key file that every replica reads. Raises :class:`ConfigError` for other combinations.

        The access-token signing key is read from ``signing_key_path``, by default
        ``<db stem>-signing-key.pem`` beside the SQLite database, and created there (mode 0600)
        if absent. ``device_ca_cert`` and ``device_ca_key`` (PEM files, the key of mode 0600)
        make the verifier a device CA (:class:`~device_sdk.verifier.device_ca.DeviceCA`).
        """
        if (db_path is None) == (registry_url is None):
            raise ConfigError(
                "Verifier.open needs exactly one device registry: a SQLite database path or a "
                "PostgreSQL registry URL"
            )
        if registry_url is not None:
            _check_postgres_settings(redis_url, signing_key_path)
        if (device_ca_cert is None) != (device_ca_key is None):
            raise ConfigError("the device CA needs both its certificate and its key, or neither")
        device_ca = None
        if device_ca_cert is not None and device_ca_key is not None:
            device_ca = DeviceCA.from_pem_files(
                device_ca_cert, device_ca_key, config.device_certificate_lifetime
            )

        registry: DeviceRegistry
        challenges: ChallengeStore
        if registry_url is not None:
            from device_sdk.verifier.postgres import PostgresDeviceRegistry

            assert redis_url is not None, "checked by _check_postgres_settings"
            registry = PostgresDeviceRegistry(registry_url)
            challenges = RedisChallengeStore.from_url(redis_url)
        else:
            assert db_path is not None
            db_path = Path(db_path)
            sqlite_registry = SQLiteDeviceRegistry(db_path)
            registry = sqlite_registry
            if redis_url:
                challenges = RedisChallengeStore.from_url(redis_url)
            else:
                # One connection per thread for both stores, so the registry's record cache is
                # invalidated by other processes' commits only, not by this one's nonce
                # consumes. check_device_status lets a successful nonce consume prove the
                # device active.
                challenges = SQLiteChallengeStore(
                    sqlite_registry.connections, check_device_status=True
                )
            if signing_key_path is None:
                signing_key_path = db_path.with_name(db_path.stem + "-signing-key.pem")
        assert signing_key_path is not None
        try:
            signing_key = load_or_create_signing_key(signing_key_path)
        except BaseException:
            challenges.close()
            registry.close()
            raise
        # Replicas that share the challenges in Redis share the rate limits there too.
        shared_limits = (
            challenges.rate_limiter if isinstance(challenges, RedisChallengeStore) else None
        )
        return cls(
            config,
            registry=registry,
            challenges=challenges,
            signing_key=signing_key,
            device_ca=device_ca,
            limiter_factory=shared_limits,
        )

    def close(self) -> None:
        """Close the stores' connections."""
        self.challenges.close()
        self.registry.close()

    def now(self) -> int:
        """Return the verifier's time in integer Unix seconds."""
        return int(self._clock())

    # Challenges

    def issue_challenge(
        self, device_id: str, audience: str, client_address: str | None = None
    ) -> dict[str, Any]:
        """Issue a single-use challenge for a device and audience; return the JSON response.

        Raises :class:`VerificationError`: ``rate_limited`` (with ``retry_after``),
        ``wrong_audience`` for an audience this verifier does not serve, ``unknown_device``,
        ``revoked_device`` or ``malformed``.
        """
        try:
            challenge = self._issue_challenge(device_id, audience, client_address)
        except VerificationError as exc:
            log_decision(
                "challenge",
                "reject",
                reason=exc.reason,
                device_id=device_id if isinstance(device_id, str) else None,
                client_address=client_address,
                detail=exc.detail,
            )
            raise
        log_decision(
            "challenge",
            "accept",
            device_id=device_id,
            client_address=client_address,
            audience=audience,
        )
        return challenge.to_json()

    def _issue_challenge(
        self, device_id: str, audience: str, client_address: str | None
    ) -> Challenge:
        if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
            raise VerificationError("malformed", "device_id is not 43 base64url characters")
        if not isinstance(audience, str):
            raise VerificationError("malformed", "audience is not a string")
        if self._challenge_per_address is not None and client_address:
            wait = self._challenge_per_address.try_acquire(client_address)
            if wait is not None:
                raise VerificationError(
                    "rate_limited", "too many challenges for this address", retry_after=wait
                )
        if self.config.channel_bindings_for(audience) is None:
            raise VerificationError("wrong_audience", "audience is not served by this verifier")
        # A store that checks device status rejects the challenge below if the device is not
        # active, so a cached record is enough here.
        self._active_record(device_id, unconfirmed=self.challenges.checks_device_status)
        if self._challenge_per_device is not None:
            # Keyed on the device and the address together: the endpoint takes no credentials,
            # so a budget per device alone would let anyone spend the device's challenges.
            key = f"{device_id} {client_address}" if client_address else device_id
            wait = self._challenge_per_device.try_acquire(key)
            if wait is not None:
                raise VerificationError(
                    "rate_limited", "too many challenges for this device", retry_after=wait
                )

        now = self.now()
        challenge = Challenge(
            nonce=b64url_encode(secrets.token_bytes(NONCE_BYTES)),
            device_id=device_id,
            audience=audience,
            server_time=now,
            expires_at=now + self.config.challenge_lifetime,
        )
        if not self.challenges.put(challenge):
            # A revocation committed after the registry read above. The fresh read raises for it.
            self._active_record(device_id)
            raise VerificationError(
                "revoked_device", "device was revoked while its challenge was issued"
            )
        return challenge

    def _active_record(self, device_id: str, *, unconfirmed: bool = False) -> DeviceRecord:
        if unconfirmed:
            record = self.registry.get_unconfirmed(device_id)
        else:
            record = self.registry.get(device_id)
        if record is None:
            raise VerificationError("unknown_device", "device is not enrolled", device_id=device_id)
        if record.status != ACTIVE:
            raise VerificationError("revoked_device", "device is revoked", device_id=device_id)
        return record

    # Assertions

    def verify_assertion(
        self,
        token: str,
        *,
        audience_kind: AudienceKind,
        client_address: str | None = None,
        expected_device_id: str | None = None,
        expected_htm: str = "POST",
        expected_htu: str | None = None,
        limit_address: bool = True,
        expected_audience: str | None = None,
    ) -> VerifiedAssertion:
        """Check an assertion completely and spend its nonce.

        ``audience_kind`` ``http`` expects ``aud`` = the issuer and ``htm``/``htu`` of the token
        request (``expected_htu`` defaults to the configured token URL); ``mqtt`` expects one of
        the broker audiences, or exactly ``expected_audience`` when the caller knows which
        broker checks the login. ``expected_device_id`` is the MQTT username, when there is one.
        A failure whose signature verified is charged to the device's failure budget, any other
        to ``client_address``'s, unless ``limit_address`` is False (when the address is a
        broker's, not the device's). Raises :class:`VerificationError` with the reason code; the
        assertion is never logged.
        """
        context: dict[str, Any] = {"device_id": None, "signed": False}
        address_limiter = self._failures_per_address if limit_address and client_address else None
        try:
            if address_limiter is not None and client_address:
                wait = address_limiter.retry_after(client_address)
                if wait is not None:
                    raise VerificationError(
                        "rate_limited",
                        "too many failed assertions from this address",
                        retry_after=wait,
                    )
            verified = self._verify(
                token,
                audience_kind,
                expected_device_id,
                expected_htm,
                expected_htu or self._token_url,
                expected_audience,
                context,
            )
        except VerificationError as exc:
            device_id = exc.device_id or context["device_id"]
            # Only the holder of the device key can make a signed assertion fail, so only such
            # failures may lock the device out. Anyone can name a device in kid.
            if exc.reason != "rate_limited":
                if context["signed"]:
                    if self._failures_per_device is not None:
                        self._failures_per_device.try_acquire(device_id)
                elif address_limiter is not None and client_address:
                    address_limiter.try_acquire(client_address)
            log_decision(
                "assertion",
                "reject",
                reason=exc.reason,
                device_id=device_id,
                client_address=client_address,
                detail=exc.detail,
                kind=audience_kind,
            )
            if exc.device_id is None and device_id is not None:
                exc.device_id = device_id
            raise
        log_decision(
            "assertion",
            "accept",
            device_id=verified.device_id,
            client_address=client_address,
            kind=audience_kind,
            jti=verified.jti,
        )
        return verified

    def _verify(
        self,
        token: str,
        audience_kind: AudienceKind,
        expected_device_id: str | None,
        expected_htm: str,
        expected_htu: str,
        expected_audience: str | None,
        context: dict[str, Any],
    ) -> VerifiedAssertion:
        jws = parse_compact_jws(token, self.config.max_assertion_bytes)
        algorithm, device_id = self._checked_header(jws)
        context["device_id"] = device_id
        claims = jws.payload
        _check_claim_types(claims)
        if claims["iss"] != device_id or claims["sub"] != device_id:
            raise VerificationError("wrong_device", "iss or sub differs from kid")

        if expected_device_id is not None and expected_device_id != device_id:
            raise VerificationError("wrong_device", "kid differs from the MQTT username")
        if self._failures_per_device is not None:
            wait = self._failures_per_device.retry_after(device_id)
            if wait is not None:
                raise VerificationError(
                    "rate_limited", "too many failed assertions for this device", retry_after=wait
                )

        # The key and algorithm of a device never change, so a cached record serves the
        # signature check. Whether the device is still active is settled after the nonce or jti
        # is spent (below), so that a revocation committed before the spend is never missed.
        record = self._active_record(device_id, unconfirmed=True)
        if algorithm != record.algorithm:
            raise VerificationError(
                "algorithm_mismatch", f"alg {algorithm} but the device enrolled {record.algorithm}"
            )
        # The signature is checked before the claims, so that every later failure is known to
        # come from the device key and may be charged to the device (see verify_assertion).
        self._signature_check(record)(jws.signing_input, jws.signature)
        context["signed"] = True

        audience = claims["aud"]
        self._check_audience(audience, audience_kind, expected_audience)
        now = self.now()
        self._check_times(claims["iat"], claims["exp"], now)
        self._check_channel_binding(audience, claims.get("cb"))
        if audience_kind == "http":
            self._check_http_binding(
                claims.get("htm"), claims.get("htu"), expected_htm, expected_htu
            )

        nonce = claims.get("nonce")
        if nonce is None:
            self._spend_jti(claims["jti"], audience, claims["iat"], claims["exp"])
        else:
            self._consume_nonce(nonce, device_id, audience, now)
        # A successful consume in a store that checks device status proves the device active
        # at that moment. A jti, or another store, proves nothing about it: read the registry.
        if nonce is None or not self.challenges.checks_device_status:
            record = self._active_record(device_id)

        return VerifiedAssertion(
            device_id=device_id,
            jti=claims["jti"],
            audience=audience,
            nonce=nonce,
            issued_at=claims["iat"],
            expires_at=claims["exp"],
            algorithm=algorithm,
            record=record,
        )

    def _checked_header(self, jws: CompactJWS) -> tuple[str, str]:
        # The result depends only on the header text and this verifier's configuration, and a
        # device sends the same header every time, so results are kept by the exact text.
        checked = self._checked_headers.get(jws.header_text)
        if checked is None:
            checked = self._check_header(jws.header)
            with self._checks_lock:
                if len(self._checked_headers) >= _HEADER_CACHE_SIZE:
                    self._checked_headers.clear()
                self._checked_headers[jws.header_text] = checked
        return checked

    def _check_header(self, header: Mapping[str, Any]) -> tuple[str, str]:
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise VerificationError("malformed", "header has no alg string")
        # VerifierConfig admits only ES256, ES384, EdDSA and PS256, so none and HS* end here.
        if algorithm not in self.config.algorithms:
            raise VerificationError(
                "unsupported_algorithm", f"alg {algorithm[:16]!r} is not allowed"
            )
        if header.get("typ") != ASSERTION_TYPE:
            raise VerificationError("bad_type", f"typ is not {ASSERTION_TYPE}")
        # A critical extension would change how the JWS must be read; none is defined here.
        if "crit" in header:
            raise VerificationError(
                "malformed", "header has crit, which this verifier does not support"
            )
        device_id = header.get("kid")
        if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
            raise VerificationError("malformed", "kid is not a device id")
        return algorithm, device_id

    def _check_audience(
        self, audience: str, audience_kind: AudienceKind, expected_audience: str | None
    ) -> None:
        if audience_kind == "http":
            if audience != self.config.issuer:
                raise VerificationError("wrong_audience", "aud is not this verifier's issuer")
        elif audience not in self.config.broker_audiences:
            raise VerificationError("wrong_audience", "aud is not a configured broker")
        elif expected_audience is not None and audience != expected_audience:
            # A password minted for one broker must not log in at another, even if the first
            # broker, having seen it, replays it there.
            raise VerificationError(
                "wrong_audience", "aud is another broker than the one checking the login"
            )

    def _check_times(self, issued_at: int, expires_at: int, now: int) -> None:
        leeway = self.config.leeway
        if expires_at <= issued_at:
            raise VerificationError("malformed", "exp is not after iat")
        lifetime = expires_at - issued_at
        if lifetime > MAX_ASSERTION_LIFETIME:
            raise VerificationError(
                "lifetime_too_long",
                f"exp is {lifetime} s after iat, more than {MAX_ASSERTION_LIFETIME} s",
            )
        if issued_at > now + leeway:
            raise VerificationError(
                "iat_in_future",
                f"iat is {issued_at - now} s ahead of the verifier clock (leeway {leeway} s)",
            )
        if expires_at + leeway < now:
            raise VerificationError(
                "expired", f"exp passed {now - expires_at} s ago (leeway {leeway} s)"
            )

    def _check_channel_binding(self, audience: str, cb: str | None) -> None:
        accepted = self.config.channel_bindings_for(audience) or frozenset()
        if not accepted:
            if cb is not None:
                raise VerificationError(
                    "channel_binding_mismatch", "cb present for an audience without TLS"
                )
            return
        if cb is None:
            raise VerificationError("missing_channel_binding", "cb is absent")
        try:
            value = b64url_decode(cb)
        except ProtocolError:
            raise VerificationError("malformed", "cb is not base64url") from None
        if value not in accepted:
            raise VerificationError(
                "channel_binding_mismatch", "cb matches none of this server's certificates"
            )

    def _check_http_binding(
        self, htm: str | None, htu: str | None, expected_htm: str, expected_htu: str
    ) -> None:
        if htm is None or htu is None:
            raise VerificationError("malformed", "htm or htu is absent from an HTTP assertion")
        if htm != expected_htm or htu != expected_htu:
            raise VerificationError("wrong_audience", "htm or htu is not the token request")

    def _signature_check(self, record: DeviceRecord) -> SignatureCheck:
        # Loading a PEM key costs about as much as a verification, so keys are kept, by the
        # exact record contents so that a changed record never uses an old key.
        cache_key = (record.device_id, record.algorithm, record.public_key_pem)
        check = self._checks.get(cache_key)
        if check is not None:
            return check
        public_key = serialization.load_pem_public_key(record.public_key_pem.encode("ascii"))
        if not isinstance(public_key, PublicKey):
            raise VerificationError("unsupported_algorithm", "stored key type is not supported")
        check = signature_check(record.algorithm, public_key)
        with self._checks_lock:
            if len(self._checks) >= _KEY_CACHE_SIZE:
                self._checks.clear()
            self._checks[cache_key] = check
        return check

    def _consume_nonce(self, nonce: str, device_id: str, audience: str, now: int) -> None:
        if self.challenges.consume(nonce, device_id, audience, now):
            return
        # The store left the challenge as it was; find out why, for the reason code. A device
        # revoked meanwhile is reported as such, even if that also deleted its challenge.
        self._active_record(device_id)
        found = self.challenges.find(nonce)
        if found is None:
            raise VerificationError("unknown_nonce", "no challenge has this nonce")
        challenge, consumed = found
        if consumed:
            raise VerificationError("replayed", "nonce was already used")
        if challenge.device_id != device_id:
            raise VerificationError("wrong_device", "challenge was issued to another device")
        if challenge.audience != audience:
            raise VerificationError("wrong_audience", "challenge was issued for another audience")
        if now > challenge.expires_at:
            raise VerificationError(
                "challenge_expired", f"challenge expired {now - challenge.expires_at} s ago"
            )
        # Unreachable unless the store broke its contract, and then the assertion must fail.
        raise VerificationError("unknown_nonce", "the challenge store did not spend the nonce")

    def _spend_jti(self, jti: str, audience: str, issued_at: int, expires_at: int) -> None:
        if audience not in self.config.nonceless_audiences:
            raise VerificationError("unknown_nonce", "nonce is absent and this audience needs one")
        if expires_at - issued_at > MAX_NONCELESS_LIFETIME:
            raise VerificationError(
                "lifetime_too_long",
                f"an assertion without nonce may live {MAX_NONCELESS_LIFETIME} s at most",
            )
        if not self.challenges.remember_jti(jti, expires_at + self.config.leeway):
            raise VerificationError("replayed", "jti was already used")

    # Access tokens

    def issue_access_token(self, verified: VerifiedAssertion) -> dict[str, Any]:
        """Sign a short-lived access token for a verified HTTP assertion; return the response."""
        now = self.now()
        lifetime = self.config.access_token_lifetime
        claims = {
            "iss": self.config.issuer,
            "sub": verified.device_id,
            "aud": self.config.issuer,
            "iat": now,
            "exp": now + lifetime,
            "jti": new_jti(),
        }
        token = sign_access_token(self._signing_key, self._jwk["kid"], claims)
        log_decision("access_token", "accept", device_id=verified.device_id, expires_in=lifetime)
        return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}

    def verify_access_token(self, token: str) -> dict[str, Any]:
        """Check an access token signed by this verifier; return its claims.

        Also rejects tokens of devices revoked since the token was issued. Raises
        :class:`VerificationError` (``malformed``, ``bad_type``, ``bad_signature``, ``expired``,
        ``wrong_audience``, ``unknown_device``, ``revoked_device``).
        """
        claims = decode_access_token(
            token,
            self._signing_key.public_key(),
            kid=self._jwk["kid"],
            issuer=self.config.issuer,
            leeway=self.config.leeway,
            max_length=self.config.max_assertion_bytes,
        )
        self._active_record(str(claims["sub"]))
        return claims

    def jwks(self) -> dict[str, Any]:
        """Return the JWKS with the public key that signs access tokens."""
        return {"keys": [dict(self._jwk)]}

    # Enrollment and device management

    def create_enrollment_tokens(
        self, count: int = 1, *, lifetime: int | None = None, never_expire: bool = False
    ) -> list[str]:
        """Create one-time enrollment tokens; only their hashes are stored.

        ``lifetime`` is in seconds, by default the configured one; ``never_expire`` makes tokens
        that stay valid until used. The tokens are secrets: hand them to provisioning through a
        file of mode 0600.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if lifetime is None and not never_expire:
            lifetime = self.config.enrollment_token_lifetime
        if never_expire:
            lifetime = None
        now = self.now()
        expires_at = None if lifetime is None else now + lifetime
        tokens = []
        for _ in range(count):
            token = b64url_encode(secrets.token_bytes(ENROLLMENT_TOKEN_BYTES))
            self.registry.add_enrollment_token(hash_enrollment_token(token), now, expires_at)
            tokens.append(token)
        log_decision("enrollment_token", "accept", count=count, expires_at=expires_at)
        return tokens

    def enroll(
        self,
        csr_pem: str | bytes,
        enrollment_token: str,
        backend: str,
        hardware_backed: bool,
        client_address: str | None = None,
    ) -> tuple[DeviceRecord, bool]:
        """Register the key of a CSR as a device, spending a one-time enrollment token.

        Returns the record and whether it was created now; :meth:`enroll_device` also returns
        the device certificate and takes TPM attestation evidence.
        """
        enrollment = self.enroll_device(
            csr_pem, enrollment_token, backend, hardware_backed, client_address
        )
        return enrollment.record, enrollment.created

    @property
    def offers_attestation(self) -> bool:
        """True when EK roots are configured, so :meth:`start_attestation` can be called."""
        return self._attestation is not None

    def start_attestation(
        self,
        enrollment_token: str,
        request: dict[str, Any],
        client_address: str | None = None,
    ) -> dict[str, Any]:
        """Run round one of TPM attestation for an enrollment; return the credential challenge.

        ``request`` has ``ek_certificate``, ``ak_public`` and ``key_public``. The verifier keeps
        the state for ``challenge_lifetime`` seconds, bound to the enrollment token, which must
        be unspent (or spent by this key). Raises :class:`VerificationError` with the token
        reasons of :meth:`enroll_device` or an ``attestation_*`` reason.
        """
        device_id = None
        try:
            if self._attestation is None:
                raise VerificationError(
                    "attestation_unavailable", "this verifier has no trusted EK roots"
                )
            if not isinstance(enrollment_token, str) or not enrollment_token:
                raise VerificationError("enrollment_token_invalid", "enrollment token is empty")
            challenge, state, device_id = begin_attestation(self._attestation, request)
            token_hash = hash_enrollment_token(enrollment_token)
            now = self.now()
            self.registry.check_enrollment_token(token_hash, device_id, now)
            expires_at = now + self.config.challenge_lifetime
            self.registry.put_pending_attestation(token_hash, state, expires_at, now)
        except VerificationError as exc:
            log_decision(
                "attestation_challenge",
                "reject",
                reason=exc.reason,
                device_id=device_id,
                client_address=client_address,
                detail=exc.detail,
            )
            raise
        log_decision(
            "attestation_challenge", "accept", device_id=device_id, client_address=client_address
        )
        return {**challenge, "expires_at": expires_at}

    def enroll_device(
        self,
        csr_pem: str | bytes,
        enrollment_token: str,
        backend: str,
        hardware_backed: bool,
        client_address: str | None = None,
        *,
        attestation: dict[str, Any] | None = None,
    ) -> Enrollment:
        """Register the key of a CSR as a device, spending a one-time enrollment token.

        The CSR must be signed by the key it names. ``attestation`` is the device's response to
        :meth:`start_attestation`'s challenge; the record is ``attested`` when it passes. With a
        device CA, the device gets a client certificate, the same one on every enrollment of the
        key. The same key presenting its spent token again gets its record back, ``created``
        False. Raises :class:`VerificationError` with ``bad_csr``, ``unsupported_algorithm``,
        ``enrollment_token_invalid``, ``enrollment_token_used``, ``revoked_device``,
        ``attestation_required`` or an ``attestation_*`` reason of the checks.
        """
        device_id = None
        try:
            now = self.now()
            record = record_from_csr(
                csr_pem, backend, hardware_backed, self.config.algorithms, now
            )
            device_id = record.device_id
            if not isinstance(enrollment_token, str) or not enrollment_token:
                raise VerificationError("enrollment_token_invalid", "enrollment token is empty")
            token_hash = hash_enrollment_token(enrollment_token)
            if attestation is not None:
                self._check_attestation(token_hash, attestation, record, now)
                record = replace(record, attested=True)
            elif self.config.require_attestation:
                raise VerificationError(
                    "attestation_required", "this verifier enrolls only TPM-attested keys"
                )
            stored, created = self.registry.enroll(token_hash, record, now)
            certificate = self._device_certificate(csr_pem, stored, now)
        except VerificationError as exc:
            log_decision(
                "enroll",
                "reject",
                reason=exc.reason,
                device_id=device_id,
                client_address=client_address,
                detail=exc.detail,
            )
            raise
        log_decision(
            "enroll",
            "accept",
            device_id=stored.device_id,
            client_address=client_address,
            created=created,
            backend=stored.backend,
            hardware_backed=stored.hardware_backed,
            attested=stored.attested,
            certificate=certificate is not None,
        )
        return Enrollment(stored, created, certificate)

    def _check_attestation(
        self, token_hash: str, evidence: dict[str, Any], record: DeviceRecord, now: int
    ) -> None:
        if self._attestation is None:
            raise VerificationError(
                "attestation_unavailable", "evidence was sent, but this verifier has no EK roots"
            )
        pending = self.registry.take_pending_attestation(token_hash)
        if pending is None:
            raise VerificationError(
                "attestation_unknown",
                "no attestation was started with this enrollment token, or it was used",
            )
        state, expires_at = pending
        if now > expires_at:
            raise VerificationError(
                "attestation_expired", f"the attestation challenge expired {now - expires_at} s ago"
            )
        public_key = serialization.load_pem_public_key(record.public_key_pem.encode("ascii"))
        if not isinstance(public_key, PublicKey):
            raise VerificationError("unsupported_algorithm", "CSR key type is not supported")
        finish_attestation(self._attestation, state, evidence, public_key)

    def _device_certificate(
        self, csr_pem: str | bytes, record: DeviceRecord, now: int
    ) -> str | None:
        if self.device_ca is None:
            return None
        stored = self.registry.device_certificate(record.device_id)
        if stored is not None:
            return stored
        certificate = issue_certificate(self.device_ca, csr_pem, record.device_id, now)
        return self.registry.store_device_certificate(record.device_id, certificate, now)

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """Return a device record, or None if the device was never enrolled."""
        return self.registry.get(device_id)

    def list_devices(self) -> list[DeviceRecord]:
        """Return every device record."""
        return self.registry.list_devices()

    def revoke(self, device_id: str) -> DeviceRecord:
        """Revoke a device and delete its pending challenges; its access tokens stop working.

        Raises :class:`VerificationError` ``unknown_device`` if the device was never enrolled.
        """
        record = self.registry.set_status(device_id, REVOKED, self.now())
        if record is None:
            raise VerificationError("unknown_device", "no such device", device_id=device_id)
        purged = self.challenges.purge_device(device_id)
        log_decision("revoke", "accept", device_id=device_id, purged_challenges=purged)
        return record
