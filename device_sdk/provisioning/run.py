"""One provisioning run: the seven steps in order, each recorded, under a token and config lock.

Steps, each idempotent and recorded in the state file next to the config:

1. ``key``: open the key the URI names, or create it when the token has none. The key is looked
   up first, so a run killed between C_GenerateKeyPair and the state update finds that key on
   the next run instead of making a second one.
2. ``check``: the key must be non-extractable (CKA_EXTRACTABLE false, CKA_NEVER_EXTRACTABLE and
   CKA_ALWAYS_SENSITIVE true, or the backend's equivalent).
3. ``csr``: a CSR signed inside the token; subject CN and a SAN URI carry the device_id.
4. ``enroll``: ``POST /v1/enroll`` with the one-time enrollment token, read from a file. A key
   found already enrolled (the verifier issues it a login challenge) is reused and the
   enrollment token is left unspent. A TPM key first runs the attestation round
   (``POST /v1/enroll/attestation``) when the TPM has an EK certificate and the verifier offers
   attestation.
5. ``certificate``: the certificate the verifier issued, if any, on the token as a certificate
   object with the key's CKA_ID, or in a PEM file next to the config for other backends.
6. ``config``: the device config, written atomically with mode 0600.
7. ``login``: one HTTP login to the verifier as a self-test.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sdk.auth.origins import require_secure_url
from device_sdk.config import DeviceConfig, load_config, save_config
from device_sdk.errors import ConfigError, DeviceSDKError, KeyNotFoundError, ProvisioningError
from device_sdk.keys.uri import read_secret_file
from device_sdk.provisioning import keystore
from device_sdk.provisioning.csr import algorithm_name, build_csr
from device_sdk.provisioning.files import write_file_atomic
from device_sdk.provisioning.lock import exclusive_lock, lock_path_for
from device_sdk.provisioning.state import (
    STEPS,
    ProvisioningState,
    load_state,
    save_state,
    state_path_for,
)
from device_sdk.provisioning.verifier_client import (
    device_is_enrolled,
    enroll,
    login_once,
    start_attestation,
)

logger = logging.getLogger(__name__)

# Test hook: the name of a step after whose action (before its record) the process kills
# itself with SIGKILL, to test resuming after a crash. Never set it in production.
KILL_AT_ENV = "DEVICE_SDK_TEST_KILL_AT"

DEFAULT_ALGORITHM = "ec-p256"


@dataclass(frozen=True)
class ProvisioningRequest:
    """The device to provision. ``key_uri`` may carry a ``pin-source`` but never a ``pin-value``."""

    key_uri: str
    config_path: Path
    verifier_url: str
    enrollment_token_file: Path | None = None
    algorithm: str = DEFAULT_ALGORITHM
    allow_software_key: bool = False
    broker_url: str | None = None
    ca_bundle: Path | None = None


@dataclass
class StepOutcome:
    """The outcome of one step: ``done``, ``recorded`` (by an earlier run) or ``skipped``."""

    step: str
    status: str
    seconds: float
    detail: str = ""


@dataclass
class ProvisioningResult:
    """The outcome of a successful run."""

    device_id: str
    backend: str
    hardware_backed: bool
    algorithm: str
    key_uri: str
    config_path: Path
    state_path: Path
    key_generated: bool
    reused_key: bool
    already_enrolled: bool
    certificate_location: str | None
    steps: list[StepOutcome] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "device_id": self.device_id,
            "backend": self.backend,
            "hardware_backed": self.hardware_backed,
            "algorithm": self.algorithm,
            "key_uri": self.key_uri,
            "config": str(self.config_path),
            "state": str(self.state_path),
            "key_generated": self.key_generated,
            "reused_key": self.reused_key,
            "already_enrolled": self.already_enrolled,
            "certificate": self.certificate_location,
            "steps": [
                {
                    "step": s.step,
                    "status": s.status,
                    "seconds": round(s.seconds, 4),
                    "detail": s.detail,
                }
                for s in self.steps
            ],
            "messages": self.messages,
        }


StepCallback = Callable[[StepOutcome], None]


def _kill_point(step: str) -> None:
    if os.environ.get(KILL_AT_ENV) == step:
        logger.warning("%s=%s: killing this process for a crash test", KILL_AT_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


def certificate_path_for(config_path: Path) -> Path:
    """Return where a certificate goes when the key's backend cannot hold it."""
    return config_path.with_name(config_path.stem + ".cert.pem")


class _Run:
    """The mutable context of one run; each step is one method."""

    def __init__(self, request: ProvisioningRequest, on_step: StepCallback | None) -> None:
        self.request = request
        self.on_step = on_step
        self.config_path = request.config_path.absolute()
        self.state_path = state_path_for(self.config_path)
        self.key_ref = keystore.KeyReference.parse(request.key_uri)
        self.state = ProvisioningState(key_uri=self.key_ref.public_uri)
        self.outcomes: list[StepOutcome] = []
        self.messages: list[str] = []
        self.key: keystore.DeviceKey | None = None
        # The key was on the token before this config's provisioning began.
        self.key_found = False
        self.key_generated_now = False
        # Read before any step, so a bad token file stops the run before a key is made.
        self.enrollment_token: str | None = None
        if request.enrollment_token_file is not None:
            self.enrollment_token = _read_enrollment_token(request.enrollment_token_file)

    # --- bookkeeping --------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        logger.info("%s", message)
        self.messages.append(message)

    def _record(self, step: str, status: str, started: float, detail: str = "") -> None:
        if status != "recorded":
            _kill_point(step)
        self.state.mark_done(step)
        save_state(self.state_path, self.state)
        outcome = StepOutcome(step, status, time.monotonic() - started, detail)
        self.outcomes.append(outcome)
        if self.on_step is not None:
            self.on_step(outcome)

    def _load_state(self) -> None:
        previous = load_state(self.state_path)
        if previous is None:
            return
        if previous.key_uri != self.key_ref.public_uri:
            self._say(
                f"state file {self.state_path} records key {previous.key_uri}, not "
                f"{self.key_ref.public_uri}; starting over for the new key"
            )
            return
        self.state = previous
        if previous.finished:
            self._say(
                f"{self.config_path} was provisioned before; checking the key and logging in again"
            )
        elif previous.completed:
            self._say(f"resuming: steps already done: {', '.join(previous.completed)}")

    # --- steps --------------------------------------------------------------------------------

    def step_key(self) -> None:
        started = time.monotonic()
        keystore.check_software_key_allowed(self.key_ref, self.request.allow_software_key)

        key = keystore.find_key(self.key_ref)
        if key is None and self.enrollment_token is None:
            # A new key is never enrolled yet, so it needs the token: fail before making it.
            _read_enrollment_token(self.request.enrollment_token_file)
        if key is None:
            # Record the intent first: a key found by a later run after a crash here is ours.
            self.state.key_generated = True
            save_state(self.state_path, self.state)
            key = keystore.generate_key(self.key_ref, self.request.algorithm)
            self.key_generated_now = True
            self._say(f"created a new {self.request.algorithm} key: {self.key_ref.public_uri}")
        elif self.state.device_id is not None and self.state.device_id != key.device_id:
            raise ProvisioningError(
                f"the key at {self.key_ref.public_uri} has device_id {key.device_id}, but state "
                f"file {self.state_path} records {self.state.device_id}: the token was "
                "changed; delete the state file to provision the new key",
                step="key",
            )
        elif self.state.key_generated:
            self._say(f"found the key created by an earlier run: {self.key_ref.public_uri}")
        else:
            self.state.key_generated = False
            self.key_found = True
            self._say(f"token already holds key {self.key_ref.public_uri}: reusing it")

        keystore.check_software_key_allowed(self.key_ref, self.request.allow_software_key, key=key)
        self.key = key
        self.state.device_id = key.device_id
        self.state.backend = key.backend
        self.state.hardware_backed = key.hardware_backed
        self.state.algorithm = algorithm_name(key)
        if not key.hardware_backed:
            self._say(
                f"the key is a software key ({key.backend}), accepted because software keys "
                "were allowed; it is recorded as hardware_backed = false"
            )
        self._record("key", "done", started, "generated" if self.key_generated_now else "found")

    def step_check(self) -> None:
        started = time.monotonic()
        assert self.key is not None
        keystore.check_non_extractable(self.key)
        self._record("check", "done", started)

    def step_csr(self) -> None:
        started = time.monotonic()
        if self.state.is_done("csr") and self.state.csr_pem:
            self._record("csr", "recorded", started)
            return
        assert self.key is not None and self.state.device_id is not None
        self.state.csr_pem = build_csr(self.key, self.state.device_id)
        self._record("csr", "done", started)

    def step_enroll(self) -> None:
        started = time.monotonic()
        if self.state.is_done("enroll") and self.state.device is not None:
            self._record("enroll", "recorded", started)
            return
        assert self.key is not None
        assert self.state.device_id
        assert self.state.csr_pem
        verify = _verify_setting(self.request.ca_bundle)

        # A key that was on the token before this config existed may be enrolled already. So
        # may a key whose enrollment finished just before a crash. A key made now is not.
        if not self.key_generated_now and device_is_enrolled(
            self.request.verifier_url, self.state.device_id, verify=verify
        ):
            self.state.device = {"device_id": self.state.device_id, "status": "active"}
            self.state.already_enrolled = self.key_found
            if self.key_found:
                self._say(
                    f"device {self.state.device_id} is already enrolled with "
                    f"{self.request.verifier_url}: reusing the enrolled key; the enrollment "
                    "token was not used"
                )
            self._record("enroll", "done", started, "already enrolled")
            return

        token = self.enrollment_token or _read_enrollment_token(
            self.request.enrollment_token_file
        )
        evidence = self._attest(token, verify) if self.key.backend == "tpm" else None
        enrollment = enroll(
            self.request.verifier_url,
            csr_pem=self.state.csr_pem,
            enrollment_token=token,
            backend=self.key.backend,
            hardware_backed=self.key.hardware_backed,
            attestation=evidence,
            verify=verify,
        )
        if enrollment.device.get("device_id") != self.state.device_id:
            raise ProvisioningError(
                f"the verifier returned device_id {enrollment.device.get('device_id')!r} "
                f"for key {self.state.device_id}",
                step="enroll",
            )
        self.state.device = enrollment.device
        self.state.certificate_pem = enrollment.certificate_pem
        detail = "created" if enrollment.created else "existing record"
        if not enrollment.created:
            self.state.already_enrolled = self.key_found
            self._say(f"the verifier already had device {self.state.device_id}: reusing it")
        else:
            self._say(f"enrolled device {self.state.device_id} with {self.request.verifier_url}")
        self._record("enroll", "done", started, detail)

    def _attest(self, token: str, verify: bool | str) -> dict[str, str] | None:
        """Run TPM attestation's first round and return the TPM's evidence, or None if skipped.

        Attestation is skipped when the TPM has no EK certificate or the verifier does not
        offer it. A verifier that requires it then rejects the enrollment.
        """
        from device_sdk.keys import tpm_attestation

        try:
            request = tpm_attestation.attestation_request(self.key)
        except KeyNotFoundError as exc:
            self._say(f"enrolling without TPM attestation: {exc}")
            return None
        challenge = start_attestation(
            self.request.verifier_url, enrollment_token=token, request=request, verify=verify
        )
        if challenge is None:
            self._say(
                f"enrolling without TPM attestation: {self.request.verifier_url} does not offer it"
            )
            return None
        evidence = tpm_attestation.answer_challenge(self.key, challenge)
        self._say("the TPM answered the verifier's attestation challenge")
        return evidence

    def step_certificate(self) -> None:
        started = time.monotonic()
        if self.state.is_done("certificate"):
            self._record("certificate", "recorded", started)
            return
        assert self.key is not None

        pem = self.state.certificate_pem
        if pem is None:
            self.state.certificate_location = keystore.find_certificate_location(
                self.key_ref, certificate_path_for(self.config_path)
            )
            self._record("certificate", "skipped", started, "the verifier issued none")
            return

        der = x509.load_pem_x509_certificate(pem.encode("ascii")).public_bytes(
            serialization.Encoding.DER
        )
        if keystore.can_store_certificate(self.key_ref):
            keystore.store_certificate(self.key_ref, der)
            self.state.certificate_location = f"token ({self.key_ref.public_uri})"
        else:
            path = certificate_path_for(self.config_path)
            write_file_atomic(path, pem.encode("ascii"), mode=0o644)
            self.state.certificate_location = str(path)
        self._record("certificate", "done", started, self.state.certificate_location)

    def step_config(self) -> None:
        started = time.monotonic()
        assert self.key is not None
        assert self.state.device_id
        assert self.state.algorithm
        if self.state.is_done("config") and self._config_is_current():
            self._record("config", "recorded", started)
            return

        location = self.state.certificate_location
        certificate_path = Path(location) if location and location.startswith("/") else None
        config = DeviceConfig(
            device_id=self.state.device_id,
            key_uri=self.key.uri,
            pin_source=self.key_ref.pin_source,
            backend=self.key.backend,
            hardware_backed=self.key.hardware_backed,
            algorithm=self.state.algorithm,
            verifier_url=self.request.verifier_url,
            broker_url=self.request.broker_url,
            ca_bundle=self.request.ca_bundle.absolute() if self.request.ca_bundle else None,
            certificate_path=certificate_path,
            software_key_allowed=self.request.allow_software_key,
            softhsm2_conf=self._softhsm2_conf(),
        )
        save_config(config, self.config_path)
        self._record("config", "done", started, str(self.config_path))

    def _softhsm2_conf(self) -> Path | None:
        """Return the config file of a SoftHSM key's token store; None for other backends."""
        assert self.key is not None
        conf = os.environ.get("SOFTHSM2_CONF")
        if self.key.backend != "softhsm" or not conf:
            return None
        return Path(conf).absolute()

    def _config_is_current(self) -> bool:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self._say(f"config {self.config_path} must be written again: {exc}")
            return False
        return (
            config.device_id == self.state.device_id
            and config.verifier_url == self.request.verifier_url
            and config.broker_url == self.request.broker_url
            and config.softhsm2_conf == self._softhsm2_conf()
        )

    def step_login(self) -> None:
        started = time.monotonic()
        assert self.key is not None
        seconds = login_once(
            self.key,
            self.request.verifier_url,
            verify=_verify_setting(self.request.ca_bundle),
        )
        self._say(f"test login to {self.request.verifier_url} succeeded in {seconds * 1000:.0f} ms")
        self._record("login", "done", started)

    # --- driver -------------------------------------------------------------------------------

    def run(self) -> ProvisioningResult:
        prepare_config_directory(self.config_path)
        with (
            exclusive_lock(lock_path_for(self.key_ref.lock_name), what=self.key_ref.describe()),
            exclusive_lock(
                lock_path_for(f"config-{self.config_path}"), what=f"config {self.config_path}"
            ),
        ):
            self._load_state()
            for step in STEPS:
                method = getattr(self, f"step_{step}")
                try:
                    method()
                except ProvisioningError:
                    raise
                except DeviceSDKError as exc:
                    raise ProvisioningError(str(exc), step=step) from exc

        assert self.key is not None
        assert self.state.device_id
        assert self.state.algorithm
        return ProvisioningResult(
            device_id=self.state.device_id,
            backend=self.key.backend,
            hardware_backed=self.key.hardware_backed,
            algorithm=self.state.algorithm,
            key_uri=self.key_ref.public_uri,
            config_path=self.config_path,
            state_path=self.state_path,
            key_generated=bool(self.state.key_generated),
            reused_key=self.key_found,
            already_enrolled=self.state.already_enrolled,
            certificate_location=self.state.certificate_location,
            steps=self.outcomes,
            messages=self.messages,
        )


def prepare_config_directory(config_path: Path) -> None:
    """Create the directory of ``config_path`` (parents too) and check this user can write it.

    Runs before any key is made, so a config path that cannot be written creates nothing.
    Raises ConfigError naming the directory and the fix.
    """
    directory = config_path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(
            (parent for parent in (directory, *directory.parents) if parent.is_file()), directory
        )
        raise ConfigError(
            f"cannot create config directory {directory}: {blocker} is a file, not a "
            "directory; pass --config with a path whose parent is a directory"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot create config directory {directory}: {exc.strerror}; create it, or pass "
            "--config with a path in a directory this user can write"
        ) from None

    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"config directory {directory} is not writable by this user; make it writable, "
            "or pass --config with a path in a directory this user can write"
        )


def _verify_setting(ca_bundle: Path | None) -> bool | str:
    return str(ca_bundle) if ca_bundle is not None else True


def _read_enrollment_token(path: Path | None) -> str:
    if path is None:
        raise ConfigError(
            "missing enrollment token file: pass --enrollment-token-file with a file that "
            "contains the one-time token from `device-sdk verifier enrollment-token create`"
        )
    token = read_secret_file(str(path.absolute()), "enrollment token").strip()
    if not token:
        raise ConfigError(
            f"enrollment token file {path.absolute()} contains only white space; write the "
            "enrollment token to it"
        )
    return token


def provision(
    request: ProvisioningRequest, *, on_step: StepCallback | None = None
) -> ProvisioningResult:
    """Provision one device: run every step not yet recorded, then return what was done.

    ``on_step`` is called after each step, for progress output. Raises ProvisioningError with
    ``step`` set for a step failure (the backend's error is its ``__cause__``), LockHeldError
    when another run holds the token or config, and ConfigError for invalid input. A verifier
    URL on plain http to a host other than loopback is invalid input.
    """
    # The enrollment token is a one-time secret: check before any key is made or file written.
    require_secure_url(request.verifier_url, "verifier URL", "the enrollment token")
    return _Run(request, on_step).run()
