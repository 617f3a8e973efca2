"""The provisioning state record: which steps of a run are done, kept in a JSON file.

The record sits next to the device config (``device.toml`` gets ``device.toml.provisioning.json``)
and is rewritten atomically after every step, so a run killed at any point resumes from the last
recorded step. Every step is idempotent on its own as well. The record saves work and keeps what
earlier steps learned (device_id, CSR, device record). A step whose effect happened before a crash
but was never recorded is run again and finds its earlier result.

The record holds no secret: no PIN, no enrollment token, no private key.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from device_sdk.errors import ProvisioningError
from device_sdk.provisioning.files import write_file_atomic

logger = logging.getLogger(__name__)

# The steps of one provisioning run, in order.
STEPS = ("key", "check", "csr", "enroll", "certificate", "config", "login")

STATE_SUFFIX = ".provisioning.json"
STATE_VERSION = 1


def state_path_for(config_path: Path) -> Path:
    """Return the path of the state record that belongs to a device config file."""
    return config_path.with_name(config_path.name + STATE_SUFFIX)


@dataclass
class ProvisioningState:
    """The progress of provisioning one device config: the steps done and what they learned."""

    key_uri: str = ""
    completed: list[str] = field(default_factory=list)
    device_id: str | None = None
    backend: str | None = None
    hardware_backed: bool | None = None
    algorithm: str | None = None
    # True when some run generated the key, False when the key was already on the token.
    key_generated: bool | None = None
    # True when the key was already enrolled before this config was provisioned.
    already_enrolled: bool = False
    csr_pem: str | None = None
    device: dict[str, Any] | None = None
    certificate_pem: str | None = None
    certificate_location: str | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def is_done(self, step: str) -> bool:
        return step in self.completed

    @property
    def finished(self) -> bool:
        return all(step in self.completed for step in STEPS)

    def mark_done(self, step: str) -> None:
        if step not in STEPS:
            raise ValueError(f"unknown provisioning step {step!r}; expected one of {STEPS}")
        if step not in self.completed:
            self.completed.append(step)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def load_state(path: Path) -> ProvisioningState | None:
    """Read a state record, or return None when there is none.

    Raises ProvisioningError when the file exists but is not a state record, because silently
    starting over could hide a second device behind the same config.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProvisioningError(
            f"cannot read state file {path}: {exc.strerror}; make it readable by this user, "
            "or delete it to start provisioning over",
            step="state",
        ) from None

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProvisioningError(
            f"state file {path} is not valid JSON ({exc}); delete it to start provisioning over",
            step="state",
        ) from exc
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        raise ProvisioningError(
            f"state file {path} has an unknown format (expected version {STATE_VERSION}); "
            "delete it to start provisioning over",
            step="state",
        )

    known = {f.name for f in fields(ProvisioningState)}
    return ProvisioningState(**{k: v for k, v in raw.items() if k in known})


def save_state(path: Path, state: ProvisioningState) -> None:
    """Write the state record atomically with mode 0600; raises ProvisioningError on failure."""
    state.updated_at = time.time()
    try:
        write_file_atomic(path, state.to_json().encode("utf-8"), mode=0o600)
    except OSError as exc:
        raise ProvisioningError(
            f"cannot write state file {path}: {exc.strerror}; make {path.parent} writable by "
            "this user, or pass --config with a path in a writable directory",
            step="state",
        ) from None
    logger.debug("saved provisioning state %s: completed %s", path, state.completed)
