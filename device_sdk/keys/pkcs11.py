"""PKCS#11 key backend on python-pkcs11: open, generate and certify keys by ``pkcs11:`` URI.

``open_key(uri)`` returns a ``cryptography`` private key (see :mod:`device_sdk.keys.signing`)
whose signatures are made on the token, safely from several threads, after ``fork()`` and after
the token is unplugged and plugged back in. :mod:`device_sdk.keys.pkcs11_session` contains
the process-wide module, session and login state behind it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11 as p11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e

from device_sdk.errors import (
    AmbiguousKeyError,
    ConfigError,
    KeyExistsError,
    KeyPolicyError,
    MechanismNotSupportedError,
    PinError,
    SoftHSMError,
)
from device_sdk.keys import softhsm
from device_sdk.keys.base import PublicKey
from device_sdk.keys.pkcs11_session import (
    BACKEND_PKCS11,
    BACKEND_SOFTHSM,
    ED25519_PARAMS,
    P256_PARAMS,
    P384_PARAMS,
    KeyCriteria,
    LoadedModule,
    Pkcs11Signer,
    TokenCriteria,
    TokenSession,
    check_key_policy,
    describe_object,
    find_objects,
    is_loaded,
    module_for,
    pkcs11_error,
    read_attribute,
    read_public_key,
    reinitialize_module,
    token_for,
)
from device_sdk.keys.signing import AnyHardwareKey, hardware_key_for
from device_sdk.keys.uri import Pkcs11URI, read_pin, resolve_module

__all__ = [
    "ALGORITHMS",
    "BACKEND_PKCS11",
    "BACKEND_SOFTHSM",
    "MODULE_ENV",
    "Pkcs11Signer",
    "find_certificate",
    "generate_key",
    "key_policy",
    "open_key",
    "reinitialize_module",
    "store_certificate",
]

log = logging.getLogger(__name__)

MODULE_ENV = "DEVICE_SDK_PKCS11_MODULE"


# --- opening keys -----------------------------------------------------------------------------

def _parse(uri: str | Pkcs11URI) -> Pkcs11URI:
    parsed = uri if isinstance(uri, Pkcs11URI) else Pkcs11URI.parse(uri)
    parsed.require_recognized_path_attributes()
    return parsed


def _module_path(uri: Pkcs11URI) -> str:
    path = resolve_module(uri)
    if path is not None:
        return path
    override = os.environ.get(MODULE_ENV)
    if override:
        if not os.path.isfile(override):
            raise ConfigError(f"{MODULE_ENV}={override} does not name a file")
        return override
    try:
        return softhsm.find_library()
    except SoftHSMError as exc:
        raise ConfigError(
            f"{uri} names no PKCS#11 module and {MODULE_ENV} is not set; add "
            "module-path=/path/to/module.so to the URI"
        ) from exc


def _criteria(uri: Pkcs11URI) -> tuple[TokenCriteria, KeyCriteria]:
    if uri.type not in (None, "private"):
        raise ConfigError(
            f"{uri} names a {uri.type!r} object; a signing key URI needs type=private"
        )
    token = TokenCriteria(
        label=uri.token,
        serial=uri.serial,
        manufacturer=uri.manufacturer,
        model=uri.model,
        slot_id=uri.slot_id,
    )
    return token, KeyCriteria(label=uri.object, key_id=uri.id)


def _load_module(uri: Pkcs11URI) -> LoadedModule:
    path = _module_path(uri)
    if softhsm.is_softhsm(path) and not is_loaded(path):
        softhsm.check_environment()
    module = module_for(path)
    module.check_softhsm_config()
    return module


def open_key(uri: str | Pkcs11URI) -> AnyHardwareKey:
    """Open the private key that a ``pkcs11:`` URI names; return it as a ``cryptography`` key.

    The PIN comes from the URI's pin-source or pin-value. Raises KeyNotFoundError,
    AmbiguousKeyError, TokenNotPresentError, PinError or KeyPolicyError (an exportable key).
    """
    parsed = _parse(uri)
    module = _load_module(parsed)
    token_criteria, key_criteria = _criteria(parsed)
    signer = Pkcs11Signer(module, token_criteria, key_criteria, lambda: read_pin(parsed))

    def inspect(handle: Any) -> PublicKey:
        assert signer._state is not None
        check_key_policy(signer._state, handle)
        return read_public_key(signer._state, handle)

    public_key = signer.run("C_FindObjects", inspect)
    backend = BACKEND_SOFTHSM if module.is_softhsm else BACKEND_PKCS11
    key = hardware_key_for(
        signer,
        public_key,
        uri=str(parsed),
        backend=backend,
        hardware_backed=not module.is_softhsm,
    )
    if module.is_softhsm:
        log.warning(
            "key %s is in SoftHSM, a software token: its private key is a file on this host, "
            "not protected by hardware; use it for development and tests only",
            key.uri,
        )
    return key


def key_policy(key: AnyHardwareKey) -> dict[str, bool | None]:
    """Return the key's protection attributes as read from the token (None where unreadable)."""
    signer = key.signer
    if not isinstance(signer, Pkcs11Signer):
        raise TypeError(f"{key!r} is not a PKCS#11 key")
    values = signer.attributes(
        Attribute.NEVER_EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.SENSITIVE,
        Attribute.LOCAL,
    )
    return {
        "never_extractable": _bool_or_none(values[Attribute.NEVER_EXTRACTABLE]),
        "always_sensitive": _bool_or_none(values[Attribute.ALWAYS_SENSITIVE]),
        "extractable": _bool_or_none(values[Attribute.EXTRACTABLE]),
        "sensitive": _bool_or_none(values[Attribute.SENSITIVE]),
        "local": _bool_or_none(values[Attribute.LOCAL]),
    }


def _bool_or_none(value: Any) -> bool | None:
    return None if value is None else bool(value)


# --- key generation ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Algorithm:
    key_type: KeyType
    generate: Mechanism
    sign: Mechanism
    ec_params: bytes | None = None
    rsa_bits: int | None = None


ALGORITHMS: dict[str, _Algorithm] = {
    "ec-p256": _Algorithm(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA, P256_PARAMS),
    "ec-p384": _Algorithm(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA, P384_PARAMS),
    "ed25519": _Algorithm(
        KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA, ED25519_PARAMS
    ),
    "rsa-pss-2048": _Algorithm(
        KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_PSS, rsa_bits=2048
    ),
    "rsa-pss-3072": _Algorithm(
        KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_PSS, rsa_bits=3072
    ),
}


def _check_mechanisms(state: TokenSession, algorithm_name: str, algorithm: _Algorithm) -> None:
    slot = state.token.slot
    try:
        offered = set(slot.get_mechanisms())
    except p11e.PKCS11Error as exc:
        raise pkcs11_error("C_GetMechanismList", state.label, exc) from exc
    for mechanism in (algorithm.generate, algorithm.sign):
        if mechanism not in offered:
            raise MechanismNotSupportedError(
                f"the token lacks CKM_{mechanism.name} (0x{int(mechanism):X}), which "
                f"{algorithm_name} needs; choose another --algorithm",
                operation="C_GetMechanismList",
                token=state.label,
            )
    if algorithm.rsa_bits is not None:
        info = slot.get_mechanism_info(algorithm.generate)
        if not info.min_key_length <= algorithm.rsa_bits <= info.max_key_length:
            raise MechanismNotSupportedError(
                f"CKM_{algorithm.generate.name} makes keys of {info.min_key_length} to "
                f"{info.max_key_length} bits, not {algorithm.rsa_bits}",
                operation="C_GetMechanismInfo",
                token=state.label,
            )


def _check_unused(state: TokenSession, label: str, key_id: bytes | None) -> None:
    """Reject a label or id that any key or certificate object on the token already has."""
    clashes = []
    for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.CERTIFICATE):
        by_label = {Attribute.CLASS: object_class, Attribute.LABEL: label}
        found = find_objects(state, by_label, "C_FindObjects")
        if key_id is not None:
            found += find_objects(
                state, {Attribute.CLASS: object_class, Attribute.ID: key_id}, "C_FindObjects"
            )
        clashes += [f"{object_class.name.lower()} {describe_object(obj)}" for obj in found]
    if clashes:
        raise KeyExistsError(
            f"token {state.label!r} already has an object with label {label!r}"
            + (f" or id {key_id.hex()}" if key_id is not None else "")
            + f": {'; '.join(sorted(set(clashes)))}. Choose another object= (and id=), or open "
            "the existing key"
        )


def _templates(
    algorithm: _Algorithm, label: str, key_id: bytes
) -> tuple[dict[Attribute, Any], dict[Attribute, Any]]:
    public: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }
    private: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }
    if algorithm.ec_params is not None:
        public[Attribute.EC_PARAMS] = algorithm.ec_params
    if algorithm.rsa_bits is not None:
        public[Attribute.MODULUS_BITS] = algorithm.rsa_bits
        public[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
    return public, private


@contextlib.contextmanager
def _rw_session(state: TokenSession) -> Iterator[Any]:
    """Open a read-write session; it shares the token's login and closes without logging out."""
    try:
        session = state.token.open(rw=True)
    except p11e.PKCS11Error as exc:
        message = "opening a read-write session failed"
        raise pkcs11_error("C_OpenSession", state.label, exc, message) from exc
    try:
        yield session
    finally:
        with contextlib.suppress(p11e.PKCS11Error):
            session.close()


def generate_key(uri: str | Pkcs11URI, algorithm: str) -> AnyHardwareKey:
    """Generate a key pair on the token and return it opened, with ``id=`` added to its URI.

    ``algorithm`` is a key of :data:`ALGORITHMS`. The URI needs ``object=`` (the label) and a PIN.
    Without ``id=`` a random 16-byte CKA_ID is chosen. The private key is TOKEN, PRIVATE and
    SENSITIVE and not EXTRACTABLE; a key that reads back otherwise is destroyed and rejected.
    """
    spec = ALGORITHMS.get(algorithm)
    if spec is None:
        raise ConfigError(
            f"unknown key algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
        )
    parsed = _parse(uri)
    if not parsed.object:
        raise ConfigError(f"{parsed} has no object= attribute; name the new key with object=LABEL")
    token_criteria, _ = _criteria(parsed)
    key_id = parsed.id if parsed.id else secrets.token_bytes(16)
    module = _load_module(parsed)
    if module.is_softhsm:
        softhsm.check_config(softhsm.check_environment(), writable=True)

    with module.lock:
        state = token_for(module, token_criteria, lambda: read_pin(parsed))
        if not state.logged_in:
            raise PinError(
                "generating a key needs a login; add pin-source=file:/path/to/pin to the URI",
                operation="C_GenerateKeyPair",
                token=state.label,
            )
        _check_mechanisms(state, algorithm, spec)
        _check_unused(state, parsed.object, parsed.id)
        _generate_on_token(state, spec, parsed.object, key_id)

    log.info("generated %s key %r on token %r", algorithm, parsed.object, state.label)
    return open_key(parsed.with_attributes(id=key_id, type="private"))


def _generate_on_token(state: TokenSession, spec: _Algorithm, label: str, key_id: bytes) -> None:
    public_template, private_template = _templates(spec, label, key_id)
    with _rw_session(state) as session:
        try:
            public, private = session.generate_keypair(
                spec.key_type,
                spec.rsa_bits,
                store=True,
                mechanism=spec.generate,
                public_template=public_template,
                private_template=private_template,
            )
        except p11e.PKCS11Error as exc:
            raise pkcs11_error("C_GenerateKeyPair", state.label, exc) from exc

        never_extractable = read_attribute(private, Attribute.NEVER_EXTRACTABLE)
        always_sensitive = read_attribute(private, Attribute.ALWAYS_SENSITIVE)
        if not (never_extractable and always_sensitive):
            for obj in (private, public):
                with contextlib.suppress(p11e.PKCS11Error):
                    obj.destroy()
            raise KeyPolicyError(
                f"token {state.label!r} made a key with CKA_NEVER_EXTRACTABLE={never_extractable} "
                f"and CKA_ALWAYS_SENSITIVE={always_sensitive}; the key was destroyed. This token "
                "cannot hold a device key"
            )


# --- certificates -----------------------------------------------------------------------------

def _open_pkcs11_key(uri: str | Pkcs11URI) -> tuple[AnyHardwareKey, Pkcs11Signer]:
    key = open_key(uri)
    signer = key.signer
    assert isinstance(signer, Pkcs11Signer)
    return key, signer


def find_certificate(uri: str | Pkcs11URI) -> x509.Certificate | None:
    """Return the X.509 certificate stored with the key's CKA_ID, or None if there is none."""
    _, signer = _open_pkcs11_key(uri)

    def find(handle: Any) -> x509.Certificate | None:
        assert signer._state is not None
        key_id = read_attribute(handle, Attribute.ID) or b""
        certificates = find_objects(
            signer._state,
            {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id},
            "C_FindObjects",
        )
        if not certificates:
            return None
        if len(certificates) > 1:
            raise AmbiguousKeyError(
                f"{len(certificates)} certificates have CKA_ID {key_id.hex()} on token "
                f"{signer._state.label!r}; delete the stale ones"
            )
        return x509.load_der_x509_certificate(certificates[0][Attribute.VALUE])

    return signer.run("C_FindObjects", find)


def store_certificate(uri: str | Pkcs11URI, cert_der: bytes, *, replace: bool = False) -> bool:
    """Store an X.509 certificate on the token with the key's CKA_ID and label.

    Returns True if it was written, False if the same certificate is already there. A different
    certificate under the same CKA_ID raises KeyExistsError unless ``replace`` is True. The
    certificate's public key must be the key's.
    """
    key, signer = _open_pkcs11_key(uri)
    certificate = x509.load_der_x509_certificate(cert_der)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise KeyPolicyError(
            f"the certificate for {certificate.subject.rfc4514_string()} does not hold the public "
            f"key of {key.uri}; it belongs to another key"
        )

    def store(handle: Any) -> bool:
        state = signer._state
        assert state is not None
        key_id = read_attribute(handle, Attribute.ID) or b""
        label = read_attribute(handle, Attribute.LABEL) or ""
        same_id = {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id}

        existing = find_objects(state, same_id, "C_FindObjects")
        if len(existing) == 1 and existing[0][Attribute.VALUE] == cert_der:
            return False
        if existing and not replace:
            raise KeyExistsError(
                f"token {state.label!r} already has a different certificate with CKA_ID "
                f"{key_id.hex()}; pass replace=True to replace it"
            )

        template = _certificate_template(certificate, cert_der, key_id, label)
        with _rw_session(state) as session:
            try:
                for old in list(session.get_objects(same_id)):
                    old.destroy()
                session.create_object(template)
            except p11e.PKCS11Error as exc:
                raise pkcs11_error("C_CreateObject", state.label, exc) from exc

        subject = certificate.subject.rfc4514_string()
        log.info("stored certificate %s on token %r", subject, state.label)
        return True

    return signer.run("C_CreateObject", store)


def _certificate_template(
    certificate: x509.Certificate, cert_der: bytes, key_id: bytes, label: str
) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: p11.CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        Attribute.SUBJECT: certificate.subject.public_bytes(),
        Attribute.ISSUER: certificate.issuer.public_bytes(),
        Attribute.SERIAL_NUMBER: _der_integer(certificate.serial_number),
        Attribute.VALUE: cert_der,
    }


def _der_integer(value: int) -> bytes:
    """DER-encode a non-negative INTEGER (for CKA_SERIAL_NUMBER)."""
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    if len(body) < 0x80:
        return b"\x02" + bytes([len(body)]) + body
    length = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return b"\x02" + bytes([0x80 | len(length)]) + length + body
