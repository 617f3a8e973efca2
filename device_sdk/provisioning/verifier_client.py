"""The provisioning side of the verifier's HTTP API: enrollment, a device check and a test login.

Wire format: ``docs/protocol.md``, whose Enrollment section covers ``POST /v1/enroll``. Every
call takes the TLS setting ``verify`` as httpx does: True for the system CA store, or the path of
a CA bundle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from device_sdk.auth.assertion import PrivateKey
from device_sdk.auth.flows import CHALLENGE_PATH
from device_sdk.errors import LoginError, ProvisioningError, TransportError
from device_sdk.http import DeviceAuth

logger = logging.getLogger(__name__)

ENROLL_PATH = "/v1/enroll"
ATTESTATION_PATH = "/v1/enroll/attestation"
HEALTH_PATH = "/healthz"
WHOAMI_PATH = "/v1/whoami"
TIMEOUT = 15.0


@dataclass(frozen=True)
class Enrollment:
    """The verifier's enrollment response: the device record and a certificate, if it issued one.

    ``created`` is False when the key was enrolled before.
    """

    device: dict[str, Any]
    certificate_pem: str | None
    created: bool


def _client(verify: bool | str) -> httpx.Client:
    return httpx.Client(verify=verify, timeout=TIMEOUT)


def _url(verifier_url: str, path: str) -> str:
    return verifier_url.rstrip("/") + path


def enroll(
    verifier_url: str,
    *,
    csr_pem: str,
    enrollment_token: str,
    backend: str,
    hardware_backed: bool,
    attestation: dict[str, str] | None = None,
    verify: bool | str = True,
) -> Enrollment:
    """Enroll a key with the verifier by its CSR, spending a one-time enrollment token.

    ``attestation`` is the TPM's response to :func:`start_attestation`'s challenge, if any.
    Raises ProvisioningError when the verifier rejects the token or the CSR, or cannot be
    reached; the message never contains the token.
    """
    url = _url(verifier_url, ENROLL_PATH)
    body: dict[str, Any] = {
        "csr": csr_pem,
        "enrollment_token": enrollment_token,
        "backend": backend,
        "hardware_backed": hardware_backed,
    }
    if attestation is not None:
        body["attestation"] = attestation
    try:
        with _client(verify) as client:
            response = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise ProvisioningError(
            f"cannot reach the verifier at {url}: {exc}; check --verifier and the network",
            step="enroll",
        ) from exc

    if response.status_code == 401:
        # The verifier sends no reason; its audit log has it.
        if attestation is None:
            other = "; or the verifier accepts only TPM-attested keys (--require-attestation)"
        else:
            other = "; or the TPM attestation failed or expired"
        raise ProvisioningError(
            f"the verifier at {url} rejected the enrollment token (HTTP 401): it is unknown, "
            "expired, or was already used by another key; create a new one with "
            f"`device-sdk verifier enrollment-token create` on the verifier{other}",
            step="enroll",
        )
    if response.status_code in (400, 422):
        raise ProvisioningError(
            f"the verifier at {url} rejected the enrollment request (HTTP "
            f"{response.status_code}): {response.text[:200]}",
            step="enroll",
        )
    if response.status_code not in (200, 201):
        raise ProvisioningError(
            f"enrollment at {url} failed with HTTP {response.status_code}: {response.text[:200]}",
            step="enroll",
        )

    try:
        answer = response.json()
        device = answer["device"]
        certificate = answer.get("certificate")
    except (ValueError, KeyError, TypeError) as exc:
        raise ProvisioningError(
            f"the verifier at {url} sent an enrollment response that is not the documented JSON "
            f"object with a 'device' field: {response.text[:200]!r}",
            step="enroll",
        ) from exc
    if not isinstance(device, dict) or not isinstance(certificate, str | None):
        raise ProvisioningError(
            f"the verifier at {url} sent a malformed enrollment response", step="enroll"
        )
    return Enrollment(
        device=device, certificate_pem=certificate, created=response.status_code == 201
    )


def start_attestation(
    verifier_url: str,
    *,
    enrollment_token: str,
    request: dict[str, str],
    verify: bool | str = True,
) -> dict[str, Any] | None:
    """Send round one of TPM attestation; return the verifier's credential challenge.

    ``request`` is :func:`device_sdk.keys.tpm_attestation.attestation_request`'s result.
    Returns None when the verifier does not offer attestation (HTTP 404). Raises
    ProvisioningError when it rejects the request; the message never contains the token.
    """
    url = _url(verifier_url, ATTESTATION_PATH)
    body = {"enrollment_token": enrollment_token, **request}
    try:
        with _client(verify) as client:
            response = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise ProvisioningError(
            f"cannot reach the verifier at {url}: {exc}; check --verifier and the network",
            step="enroll",
        ) from exc

    if response.status_code == 404:
        return None
    if response.status_code == 401:
        raise ProvisioningError(
            f"the verifier at {url} rejected the TPM attestation request (HTTP 401): the "
            "enrollment token is unknown, expired or used by another key, or the TPM's EK "
            "certificate does not chain to a CA the verifier trusts (--ek-ca); its audit log "
            "names the reason",
            step="enroll",
        )
    if response.status_code != 200:
        raise ProvisioningError(
            f"TPM attestation at {url} failed with HTTP {response.status_code}: "
            f"{response.text[:200]}",
            step="enroll",
        )
    try:
        challenge = response.json()
    except ValueError:
        challenge = None
    if not isinstance(challenge, dict):
        raise ProvisioningError(
            f"the verifier at {url} sent an attestation challenge that is not a JSON object",
            step="enroll",
        )
    return challenge


def device_is_enrolled(verifier_url: str, device_id: str, *, verify: bool | str = True) -> bool:
    """Return True when the verifier has ``device_id`` registered as an active device.

    The verifier has no lookup endpoint for devices, so this asks for a login challenge, which
    it issues only to active enrolled devices. The unused challenge expires on its own.
    """
    url = _url(verifier_url, CHALLENGE_PATH)
    body = {"device_id": device_id, "audience": verifier_url.rstrip("/")}
    try:
        with _client(verify) as client:
            response = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise ProvisioningError(
            f"cannot reach the verifier at {url}: {exc}; check --verifier and the network",
            step="enroll",
        ) from exc
    logger.debug("device check for %s at %s: HTTP %d", device_id, url, response.status_code)
    return response.status_code == 200


def login_once(key: PrivateKey, verifier_url: str, *, verify: bool | str = True) -> float:
    """Log in to the verifier over HTTP once with ``key``; return the seconds it took.

    The login is checked end to end: the access token must be accepted by ``GET /v1/whoami``,
    which must name this device. Raises ProvisioningError naming the verifier otherwise.
    """
    auth = DeviceAuth(key, verifier_url)
    url = _url(verifier_url, WHOAMI_PATH)
    started = time.monotonic()
    try:
        with _client(verify) as client:
            response = client.get(url, auth=auth)
    except (LoginError, TransportError) as exc:
        raise ProvisioningError(
            f"test login to {verifier_url} failed: {exc}", step="login"
        ) from exc
    except httpx.HTTPError as exc:
        raise ProvisioningError(
            f"test login to {verifier_url} failed: cannot reach the verifier: {exc}",
            step="login",
        ) from exc
    seconds = time.monotonic() - started

    if response.status_code != 200:
        raise ProvisioningError(
            f"test login to {verifier_url}: the access token was rejected by {url} "
            f"(HTTP {response.status_code})",
            step="login",
        )
    try:
        device_id = response.json().get("device_id")
    except (ValueError, AttributeError):
        device_id = None
    if device_id != auth.device_id:
        raise ProvisioningError(
            f"test login to {verifier_url}: {url} named device {device_id!r}, not {auth.device_id}",
            step="login",
        )
    return seconds
