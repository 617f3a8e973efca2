"""TPM 2.0 key backend on tpm2-pytss (ESAPI).

A ``tpm2:`` URI names a signing key that lives in the TPM:

- ``tpm2:handle=0x81000010``: a persistent object in the owner hierarchy;
- ``tpm2:path=/var/lib/device-sdk/key.tss2.pem``: a TSS2 PEM key blob (the format of tpm2-openssl
  and tpm2-tss-engine), whose private part only the TPM that made it can load.

The TCTI comes from the URI's ``?tcti=`` query, else from ``$TPM2TOOLS_TCTI``, ``$TSS2_TCTI`` or
``$TCTI``, else the kernel resource manager ``device:/dev/tpmrm0``.

Keys are children of a storage primary key in the owner hierarchy, made from :func:`srk_template`.
tpm2-openssl and tpm2-tss-engine derive the same primary key for a TSS2 PEM blob whose parent is
the owner, so the same blob also works in OpenSSL. A signing key is
fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth and sign, with an empty authorization
and without noDA: the TPM's dictionary-attack lockout applies to it.

Every transient object (the primary key, a loaded blob) is flushed after each operation, because
swtpm and ``/dev/tpm0`` have no resource manager and only a few object slots.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from device_sdk.errors import (
    ConfigError,
    KeyExistsError,
    KeyNotFoundError,
    KeyPolicyError,
    TPMError,
)
from device_sdk.keys.base import PublicKey
from device_sdk.keys.signing import AnyHardwareKey, hardware_key_for
from device_sdk.keys.tpm_connection import (
    DEFAULT_TCTI,
    INSTALL_HINT,
    TpmConnection,
    close_connections,
    connection_for,
    is_link_failure,
    resolve_tcti,
)
from device_sdk.keys.uri import Tpm2URI

try:
    from tpm2_pytss import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_ECC,
        TPM2_RH,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPMS_CONTEXT,
        TPMS_ECC_PARMS,
        TPMS_RSA_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_RSA_SCHEME,
        TPMT_SIG_SCHEME,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_PARMS,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
    )
    from tpm2_pytss.tsskey import TSSPrivKey
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ModuleNotFoundError(INSTALL_HINT, name="tpm2_pytss") from exc


__all__ = [
    "ALGORITHMS",
    "BACKEND",
    "REQUIRED_ATTRIBUTES",
    "TpmSigner",
    "DEFAULT_KEY_PATH",
    "KEY_PATH_ENV",
    "close_connections",
    "default_key_uri",
    "delete_key",
    "generate_key",
    "open_key",
    "resolve_tcti",
    "srk_template",
]

log = logging.getLogger(__name__)

BACKEND = "tpm"

# Attributes a key needs before the SDK uses it. fixedTPM and fixedParent keep it in this TPM,
# sensitiveDataOrigin means the TPM made the private part (so it was never imported).
REQUIRED_ATTRIBUTES = {
    "fixedTPM": TPMA_OBJECT.FIXEDTPM,
    "fixedParent": TPMA_OBJECT.FIXEDPARENT,
    "sensitiveDataOrigin": TPMA_OBJECT.SENSITIVEDATAORIGIN,
    "sign": TPMA_OBJECT.SIGN_ENCRYPT,
}

# Where ``device-sdk provision --auto`` keeps the key blob, unless $DEVICE_SDK_TPM_KEY_PATH says.
# A blob file, unlike a persistent handle, cannot collide with another program's TPM object.
DEFAULT_KEY_PATH = "/var/lib/device-sdk/device-key.tss2.pem"
KEY_PATH_ENV = "DEVICE_SDK_TPM_KEY_PATH"

_SIGNING_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)

_HASH_BY_DIGEST_SIZE = {32: TPM2_ALG.SHA256, 48: TPM2_ALG.SHA384, 64: TPM2_ALG.SHA512}
_HASH_BY_NAME = {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384, "sha512": TPM2_ALG.SHA512}


@dataclass(frozen=True)
class _Algorithm:
    curve: int | None = None
    rsa_bits: int | None = None


ALGORITHMS: dict[str, _Algorithm] = {
    "ec-p256": _Algorithm(curve=TPM2_ECC.NIST_P256),
    "ec-p384": _Algorithm(curve=TPM2_ECC.NIST_P384),
    "rsa-pss-2048": _Algorithm(rsa_bits=2048),
}


def srk_template() -> TPMT_PUBLIC:
    """Return the ECC P-256 storage key template with an empty unique field.

    It equals the parent template in tpm2-pytss 3.0's ``tsskey`` module, which tpm2-openssl and
    tpm2-tss-engine also use. So all three derive the same primary key from the owner seed.
    """
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(
                    algorithm=TPM2_ALG.AES,
                    keyBits=TPMU_SYM_KEY_BITS(aes=128),
                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                ),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            ),
        ),
    )


def _signing_template(spec: _Algorithm) -> TPMT_PUBLIC:
    # The scheme stays NULL so each sign picks the hash (and, for RSA, PSS or PKCS #1 v1.5).
    if spec.curve is not None:
        parameters = TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=spec.curve,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )
        )
        key_type = TPM2_ALG.ECC
    else:
        assert spec.rsa_bits is not None
        parameters = TPMU_PUBLIC_PARMS(
            rsaDetail=TPMS_RSA_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                keyBits=spec.rsa_bits,
                exponent=0,
            )
        )
        key_type = TPM2_ALG.RSA
    return TPMT_PUBLIC(
        type=key_type,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=_SIGNING_ATTRIBUTES,
        authPolicy=b"",
        parameters=parameters,
    )


# --- key sources: where the key object comes from for each operation -------------------------


class _PersistentSource:
    """A key at a persistent handle: nothing to load or flush."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def acquire(self, connection: TpmConnection, location: str) -> tuple[Any, bool]:
        return connection.persistent(self.handle, location), False


class _BlobSource:
    """A TSS2 PEM key blob, loaded under its parent for each operation and flushed after it.

    After the first load the object's saved context is kept, because TPM2_ContextLoad is one
    command where CreatePrimary, Load and FlushContext are three. A TPM reset invalidates saved
    contexts; the next operation then loads the blob again.
    """

    def __init__(self, key: TSSPrivKey, path: str) -> None:
        self.key = key
        self.path = path
        self._saved: TPMS_CONTEXT | None = None

    def acquire(self, connection: TpmConnection, location: str) -> tuple[Any, bool]:
        context = connection.context
        if self._saved is not None:
            try:
                return connection.call("TPM2_ContextLoad", context.context_load, self._saved), True
            except TPMError as exc:
                log.info("saved context of %s did not load (%s); loading the blob", location, exc)
                self._saved = None

        handle = load_blob(connection, self.key, location)
        try:
            self._saved = connection.call("TPM2_ContextSave", context.context_save, handle)
        except TPMError as exc:
            log.info("TPM2_ContextSave of %s failed (%s); the blob loads every time", location, exc)
        return handle, True


def _create_srk(connection: TpmConnection) -> Any:
    handle, _, _, _, _ = connection.call(
        "TPM2_CreatePrimary",
        connection.context.create_primary,
        TPM2B_SENSITIVE_CREATE(),
        TPM2B_PUBLIC(publicArea=srk_template()),
        ESYS_TR.RH_OWNER,
    )
    return handle


def load_blob(connection: TpmConnection, key: TSSPrivKey, location: str) -> Any:
    """Load a TSS2 key blob under its parent and return the transient ESYS_TR; flush it later."""
    if int(key.parent) == int(TPM2_RH.OWNER):
        parent = _create_srk(connection)
        with connection.transient("TPM2_Load", parent):
            return connection.call(
                "TPM2_Load", connection.context.load, parent, key.private, key.public
            )
    parent = connection.persistent(int(key.parent), f"the parent of {location}")
    return connection.call("TPM2_Load", connection.context.load, parent, key.private, key.public)


# --- the signer -------------------------------------------------------------------------------


class TpmSigner:
    """Signs digests with a TPM-held key; the backend half of the key objects in keys.signing."""

    def __init__(
        self,
        connection: TpmConnection,
        source: _PersistentSource | _BlobSource,
        public_area: TPMT_PUBLIC,
        location: str,
    ) -> None:
        self.connection = connection
        self.source = source
        self.public_area = public_area
        self.location = location
        # Built once: cffi structures cost more to make than a sign on swtpm can spare.
        self._ecdsa_schemes: dict[int, TPMT_SIG_SCHEME] = {}
        self._width = 0
        if int(public_area.type) == int(TPM2_ALG.ECC):
            curve = int(public_area.parameters.eccDetail.curveID)
            bits = {int(TPM2_ECC.NIST_P256): 256, int(TPM2_ECC.NIST_P384): 384}.get(curve, 521)
            self._width = (bits + 7) // 8
            for size, hash_alg in _HASH_BY_DIGEST_SIZE.items():
                scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
                scheme.details.ecdsa.hashAlg = hash_alg
                self._ecdsa_schemes[size] = scheme

    def run(self, command: str, action: str | Callable[..., Any], *args: Any) -> Any:
        """Run ``action(key_handle, *args)`` under the connection lock with the key loaded.

        ``action`` is the name of an ESAPI method, or a function that reads
        ``connection.context`` when it is called.

        After a broken link (a restarted simulator, a reset TPM device) the connection opens
        again and the command runs once more; every TPM command this backend runs is safe to
        repeat.
        """
        connection = self.connection
        with connection.lock:
            try:
                return self._run_once(command, action, *args)
            except TPMError as exc:
                if not is_link_failure(exc):
                    raise
                log.warning("%s: %s; reconnecting and trying once more", self.location, exc)
            return self._run_once(command, action, *args)

    def _run_once(self, command: str, action: str | Callable[..., Any], *args: Any) -> Any:
        connection = self.connection
        handle, transient = self.source.acquire(connection, self.location)
        function = getattr(connection.context, action) if isinstance(action, str) else action
        if not transient:
            return connection.call(command, function, handle, *args)
        with connection.transient(command, handle):
            return connection.call(command, function, handle, *args)

    def sign_ecdsa_digest(self, digest: bytes) -> bytes:
        scheme = self._ecdsa_schemes.get(len(digest))
        if scheme is None:
            raise UnsupportedAlgorithm(
                f"a {len(digest)}-byte digest has no TPM hash; use SHA-256, SHA-384 or SHA-512"
            )
        signature = self.run("TPM2_Sign", "sign", digest, scheme)

        # The TPM returns r and s as TPM2B_ECC_PARAMETER, possibly without leading zeros.
        ecdsa = signature.signature.ecdsa
        r = int.from_bytes(bytes(ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(ecdsa.signatureS), "big")
        return r.to_bytes(self._width, "big") + s.to_bytes(self._width, "big")

    def sign_eddsa(self, data: bytes) -> bytes:
        raise UnsupportedAlgorithm(f"{self.location} is not an Ed25519 key; TPM 2.0 has no EdDSA")

    def sign_rsa_digest(
        self,
        digest: bytes,
        algorithm: hashes.HashAlgorithm,
        pad: padding.AsymmetricPadding,
        salt_length: int | None,
    ) -> bytes:
        hash_alg = _HASH_BY_NAME.get(algorithm.name)
        if hash_alg is None:
            raise UnsupportedAlgorithm(
                f"hash {algorithm.name} is not offered by the TPM; use SHA-256, SHA-384 or SHA-512"
            )
        if salt_length is None:
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.RSASSA)
            scheme.details.rsassa.hashAlg = hash_alg
        else:
            # The TPM picks the PSS salt length itself: swtpm 0.7.1 uses the digest length,
            # which the tests verify. A caller asking for another length cannot get it.
            if salt_length != algorithm.digest_size:
                raise UnsupportedAlgorithm(
                    f"the TPM signs PSS with a salt as long as the digest ({algorithm.digest_size} "
                    f"bytes), not {salt_length}; use padding.PSS.DIGEST_LENGTH"
                )
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.RSAPSS)
            scheme.details.rsapss.hashAlg = hash_alg
        signature = self.run("TPM2_Sign", "sign", digest, scheme)
        if salt_length is None:
            return bytes(signature.signature.rsassa.sig)
        return bytes(signature.signature.rsapss.sig)


# --- opening keys -----------------------------------------------------------------------------


def _parse(uri: str | Tpm2URI) -> Tpm2URI:
    return uri if isinstance(uri, Tpm2URI) else Tpm2URI.parse(uri)


def _location(parsed: Tpm2URI, tcti: str) -> str:
    name = f"handle 0x{parsed.handle:08x}" if parsed.handle is not None else f"blob {parsed.path}"
    return f"TPM key {name} (TCTI {tcti})"


def _public_key(public_area: TPMT_PUBLIC) -> PublicKey:
    key = serialization.load_der_public_key(public_area.to_der())
    return key  # type: ignore[return-value]


def check_attributes(public_area: TPMT_PUBLIC, location: str) -> None:
    """Raise KeyPolicyError unless the key is TPM-generated, non-duplicable and a plain signer."""
    attributes = public_area.objectAttributes
    missing = [name for name, flag in REQUIRED_ATTRIBUTES.items() if not attributes & flag]
    if missing:
        raise KeyPolicyError(
            f"{location} lacks {', '.join(missing)}: it may be duplicated, imported or unable "
            "to sign. Create a new key with device-sdk provision or tpm.generate_key"
        )
    if attributes & TPMA_OBJECT.RESTRICTED:
        raise KeyPolicyError(
            f"{location} is a restricted key, which signs only TPM-made data; use an "
            "unrestricted signing key"
        )
    if int(public_area.type) not in (int(TPM2_ALG.ECC), int(TPM2_ALG.RSA)):
        raise KeyPolicyError(f"{location} is not an ECC or RSA key")


def _read_blob(path: str) -> TSSPrivKey:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise KeyNotFoundError(
            f"TPM key blob {path} does not exist; create it with device-sdk provision"
        ) from exc
    except OSError as exc:
        raise TPMError(f"cannot read TPM key blob {path}: {exc.strerror}") from exc
    try:
        key = TSSPrivKey.from_pem(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not a TSS2 PEM key blob (-----BEGIN TSS2 PRIVATE KEY-----): {exc}"
        ) from exc
    if not key.empty_auth:
        raise KeyPolicyError(
            f"TPM key blob {path} needs an authorization value, which device-sdk does not "
            "support; generate a key with an empty authorization"
        )
    return key


def open_key(uri: str | Tpm2URI) -> AnyHardwareKey:
    """Open the TPM key named by a ``tpm2:`` URI.

    Returns a ``cryptography`` private key (EC or RSA) whose ``sign()`` runs in the TPM, with
    ``backend`` "tpm" and ``hardware_backed`` True. Raises KeyNotFoundError when the handle is
    empty or the blob file is missing, KeyPolicyError for a key that may leave the TPM.
    """
    parsed = _parse(uri)
    tcti = resolve_tcti(parsed.tcti)
    connection = connection_for(tcti)
    location = _location(parsed, tcti)

    source: _PersistentSource | _BlobSource
    with connection.lock:
        if parsed.handle is not None:
            source = _PersistentSource(parsed.handle)
            handle = connection.persistent(parsed.handle, location)
            public, _, _ = connection.call(
                "TPM2_ReadPublic", connection.context.read_public, handle
            )
            public_area = public.publicArea
        else:
            assert parsed.path is not None
            blob = _read_blob(parsed.path)
            source = _BlobSource(blob, parsed.path)
            public_area = blob.public.publicArea

    check_attributes(public_area, location)
    signer = TpmSigner(connection, source, public_area, location)
    return hardware_key_for(
        signer, _public_key(public_area), uri=str(parsed), backend=BACKEND, hardware_backed=True
    )


# --- creating and deleting keys ---------------------------------------------------------------


def default_key_uri() -> Tpm2URI:
    """Return the key URI that ``provision --auto`` uses on a TPM: a blob at the default path.

    A TCTI set in the environment is written into the URI, so the device config keeps working
    without that environment.
    """
    path = os.environ.get(KEY_PATH_ENV) or DEFAULT_KEY_PATH
    tcti = resolve_tcti(None)
    return Tpm2URI(path=path, tcti=None if tcti == DEFAULT_TCTI else tcti)


def generate_key(uri: str | Tpm2URI, algorithm: str = "ec-p256") -> AnyHardwareKey:
    """Create a signing key in the TPM and make it last: persisted at the handle or saved as a blob.

    ``algorithm`` is a key of :data:`ALGORITHMS`. Raises KeyExistsError when the handle is taken
    or the blob file exists; nothing is overwritten.
    """
    spec = ALGORITHMS.get(algorithm)
    if spec is None:
        raise ConfigError(
            f"the TPM backend cannot create {algorithm!r} keys; choose one of "
            f"{', '.join(ALGORITHMS)}"
        )
    parsed = _parse(uri)
    tcti = resolve_tcti(parsed.tcti)
    connection = connection_for(tcti)
    location = _location(parsed, tcti)

    with connection.lock:
        _check_unused(connection, parsed, location)
        context = connection.context
        primary = _create_srk(connection)
        with connection.transient("TPM2_Create", primary):
            private, public, _, _, _ = connection.call(
                "TPM2_Create",
                context.create,
                primary,
                TPM2B_SENSITIVE_CREATE(),
                TPM2B_PUBLIC(publicArea=_signing_template(spec)),
            )
            if parsed.handle is not None:
                _persist(connection, primary, private, public, parsed.handle)

    if parsed.path is not None:
        blob = TSSPrivKey(private, public, empty_auth=True, parent=TPM2_RH.OWNER)
        _write_new_file(parsed.path, blob.to_pem())

    log.info("generated %s key %s", algorithm, location)
    return open_key(parsed)


def _check_unused(connection: TpmConnection, parsed: Tpm2URI, location: str) -> None:
    if parsed.path is not None:
        if os.path.lexists(parsed.path):
            raise KeyExistsError(
                f"{parsed.path} already exists; open it, or delete it first to make a new key"
            )
        return
    assert parsed.handle is not None
    try:
        connection.persistent(parsed.handle, location)
    except KeyNotFoundError:
        return
    raise KeyExistsError(
        f"persistent handle 0x{parsed.handle:08x} is already in use; choose another handle "
        f"or remove it with tpm2_evictcontrol -C o -c 0x{parsed.handle:08x}"
    )


def _persist(
    connection: TpmConnection, primary: Any, private: Any, public: Any, handle: int
) -> None:
    context = connection.context
    child = connection.call("TPM2_Load", context.load, primary, private, public)
    with connection.transient("TPM2_EvictControl", child):
        persistent = connection.call(
            "TPM2_EvictControl", context.evict_control, ESYS_TR.RH_OWNER, child, handle
        )
    context.tr_close(persistent)
    connection.forget_persistent(handle)


def _write_new_file(path: str, data: bytes) -> None:
    """Write ``data`` to a new file of mode 0600; raise KeyExistsError if the file exists.

    The data goes to a temporary file first, so a crash never leaves a partial key file.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        # link() fails when the target exists, so a key made at the same time is never replaced.
        os.link(temporary, target)
    except FileExistsError as exc:
        raise KeyExistsError(f"{path} already exists; a key was created there meanwhile") from exc
    except OSError as exc:
        raise TPMError(
            f"cannot write the TPM key blob {path}: {exc.strerror}; the key was created in the "
            "TPM but not saved, so nothing uses it"
        ) from exc
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def delete_key(uri: str | Tpm2URI) -> None:
    """Remove a key: evict the persistent object, or delete the blob file.

    A TPM key blob can still be loaded by anyone holding a copy, until the TPM's owner seed
    changes (tpm2_clear).
    """
    parsed = _parse(uri)
    if parsed.path is not None:
        try:
            os.unlink(parsed.path)
        except FileNotFoundError as exc:
            raise KeyNotFoundError(f"TPM key blob {parsed.path} does not exist") from exc
        log.info("deleted TPM key blob %s", parsed.path)
        return

    assert parsed.handle is not None
    tcti = resolve_tcti(parsed.tcti)
    connection = connection_for(tcti)
    with connection.lock:
        handle = connection.persistent(parsed.handle, _location(parsed, tcti))
        connection.call(
            "TPM2_EvictControl",
            connection.context.evict_control,
            ESYS_TR.RH_OWNER,
            handle,
            parsed.handle,
        )
        connection.forget_persistent(parsed.handle, closed=True)
    log.info("evicted TPM key at handle 0x%08x", parsed.handle)
