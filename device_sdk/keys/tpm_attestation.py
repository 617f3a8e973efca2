"""Device side of TPM key attestation: EK certificate, attestation key, credential and certify.

The verifier side, with the protocol, is :mod:`device_sdk.verifier.tpm_attestation`. Here:

- :func:`attestation_request` reads the RSA 2048 endorsement key (EK) certificate from its NV
  index and derives the attestation key (AK), a restricted ECDSA P-256 signing key made as a
  primary key in the endorsement hierarchy. The same TPM always derives the same AK, so nothing is
  stored between the rounds.
- :func:`answer_challenge` recovers the verifier's secret with TPM2_ActivateCredential and has the
  AK certify the device key (TPM2_Certify) with the verifier's nonce as qualifying data.

Messages are dicts of base64url strings, ready for JSON.
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from device_sdk.auth.encoding import b64url_decode, b64url_encode
from device_sdk.errors import KeyNotFoundError, KeyStoreError, TPMError
from device_sdk.keys.tpm import TpmSigner
from device_sdk.keys.tpm_connection import TpmConnection

try:
    from tpm2_pytss import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_ECC,
        TPM2_SE,
        TPM2B_ENCRYPTED_SECRET,
        TPM2B_ID_OBJECT,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPMS_ECC_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SIG_SCHEME,
        TPMT_SYM_DEF,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_PARMS,
        TSS2_Exception,
    )
    from tpm2_pytss.utils import NoSuchIndex, create_ek_template
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from device_sdk.keys.tpm_connection import INSTALL_HINT

    raise ModuleNotFoundError(INSTALL_HINT, name="tpm2_pytss") from exc

__all__ = ["EK_HANDLE", "ak_template", "answer_challenge", "attestation_request"]

log = logging.getLogger(__name__)

# Persistent handle of the RSA 2048 EK on TPMs and in swtpm_setup's output.
EK_HANDLE = 0x81010001
EK_TYPE = "EK-RSA2048"
NV_CHUNK = 512  # bytes per TPM2_NV_Read, below every TPM's TPM2_PT_NV_BUFFER_MAX


def ak_template() -> TPMT_PUBLIC:
    """Return the attestation key template: restricted ECDSA P-256 with SHA-256, never decrypts."""
    scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=scheme,
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )
        ),
    )


def _signer(key: Any) -> TpmSigner:
    signer = getattr(key, "signer", None)
    if not isinstance(signer, TpmSigner):
        raise KeyStoreError(f"{key!r} is not a TPM key; only TPM keys can be attested this way")
    return signer


def _read_nv(connection: TpmConnection, index: int) -> bytes:
    context = connection.context
    try:
        handle = context.tr_from_tpmpublic(index)
    except TSS2_Exception as exc:
        raise NoSuchIndex(index) from exc
    try:
        public, _ = connection.call("TPM2_NV_ReadPublic", context.nv_read_public, handle)
        size = int(public.nvPublic.dataSize)
        data = b""
        while len(data) < size:
            chunk = connection.call(
                "TPM2_NV_Read",
                context.nv_read,
                handle,
                min(NV_CHUNK, size - len(data)),
                len(data),
                ESYS_TR.RH_OWNER,
            )
            data += bytes(chunk)
        return data
    finally:
        context.tr_close(handle)


def _ek_certificate_and_template(connection: TpmConnection) -> tuple[bytes, Any]:
    try:
        certificate, template = create_ek_template(
            EK_TYPE, lambda index: _read_nv(connection, int(index))
        )
    except (NoSuchIndex, ValueError) as exc:
        raise KeyNotFoundError(
            f"the TPM on TCTI {connection.tcti} has no {EK_TYPE} EK certificate in NV; "
            "attestation needs one from the TPM maker (or swtpm_setup --create-ek-cert)"
        ) from exc
    if not certificate:
        raise KeyNotFoundError(f"the TPM on TCTI {connection.tcti} has no EK certificate")
    return certificate, template


def _create_ak(connection: TpmConnection) -> tuple[Any, TPM2B_PUBLIC]:
    handle, public, _, _, _ = connection.call(
        "TPM2_CreatePrimary",
        connection.context.create_primary,
        TPM2B_SENSITIVE_CREATE(),
        TPM2B_PUBLIC(publicArea=ak_template()),
        ESYS_TR.RH_ENDORSEMENT,
    )
    return handle, public


def attestation_request(key: Any) -> dict[str, str]:
    """Return round one for ``key``'s TPM: ``ek_certificate`` (DER), ``ak_public``, ``key_public``.

    ``key_public`` is the TPMT_PUBLIC of ``key``, which the verifier binds the challenge to.
    """
    signer = _signer(key)
    connection = signer.connection
    with connection.lock:
        certificate, _ = _ek_certificate_and_template(connection)
        ak, ak_public = _create_ak(connection)
        connection.flush("TPM2_CreatePrimary", ak)
    return {
        "ek_certificate": b64url_encode(_strip_padding(certificate)),
        "ak_public": b64url_encode(ak_public.publicArea.marshal()),
        "key_public": b64url_encode(signer.public_area.marshal()),
    }


def _strip_padding(der: bytes) -> bytes:
    """Cut an NV certificate to its DER length; some TPM makers pad the NV area."""
    if len(der) < 4 or der[0] != 0x30 or der[1] != 0x82:
        return der
    return der[: 4 + int.from_bytes(der[2:4], "big")]


def answer_challenge(key: Any, challenge: dict[str, str]) -> dict[str, str]:
    """Return round two: the activated credential secret and a TPM2_Certify of ``key`` by the AK.

    ``challenge`` is the verifier's ``CredentialChallenge.to_json()``.
    """
    signer = _signer(key)
    connection = signer.connection
    credential_blob = b64url_decode(challenge["credential_blob"])
    encrypted_secret = b64url_decode(challenge["encrypted_secret"])
    nonce = b64url_decode(challenge["nonce"])

    with connection.lock:
        secret = _activate_credential(connection, credential_blob, encrypted_secret)

        def certify(key_handle: Any) -> Any:
            ak, _ = _create_ak(connection)
            with connection.transient("TPM2_Certify", ak):
                return connection.context.certify(
                    key_handle, ak, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
                )

        attest, signature = signer.run("TPM2_Certify", certify)

    r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
    log.info("TPM2_Certify of %s done for attestation", signer.location)
    return {
        "credential_secret": b64url_encode(secret),
        "key_public": b64url_encode(signer.public_area.marshal()),
        "certify_info": b64url_encode(bytes(attest)),
        "signature": b64url_encode(encode_dss_signature(r, s)),
    }


def _activate_credential(
    connection: TpmConnection, credential_blob: bytes, encrypted_secret: bytes
) -> bytes:
    context = connection.context
    _, template = _ek_certificate_and_template(connection)
    ek, ek_transient = _endorsement_key(connection, template)
    ak, _ = _create_ak(connection)
    session = None
    try:
        # The EK's policy is PolicySecret(TPM_RH_ENDORSEMENT): a policy session must carry it.
        session = connection.call(
            "TPM2_StartAuthSession",
            context.start_auth_session,
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        connection.call("TPM2_PolicySecret", context.policy_secret, ESYS_TR.RH_ENDORSEMENT, session)
        secret = connection.call(
            "TPM2_ActivateCredential",
            context.activate_credential,
            ak,
            ek,
            TPM2B_ID_OBJECT(credential=credential_blob),
            TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret),
            ESYS_TR.PASSWORD,
            session,
        )
    finally:
        connection.flush("TPM2_ActivateCredential", session)
        connection.flush("TPM2_ActivateCredential", ak)
        if ek_transient:
            connection.flush("TPM2_ActivateCredential", ek)
    return bytes(secret)


def _endorsement_key(connection: TpmConnection, template: Any) -> tuple[Any, bool]:
    """Return the EK's ESYS_TR: the persistent one, or a transient one made from the template."""
    try:
        return connection.persistent(EK_HANDLE, f"the EK at 0x{EK_HANDLE:08x}"), False
    except KeyNotFoundError:
        pass
    try:
        handle, _, _, _, _ = connection.call(
            "TPM2_CreatePrimary",
            connection.context.create_primary,
            TPM2B_SENSITIVE_CREATE(),
            template,
            ESYS_TR.RH_ENDORSEMENT,
        )
    except TPMError as exc:
        raise TPMError(f"cannot create the EK from its template: {exc}") from exc
    return handle, True
