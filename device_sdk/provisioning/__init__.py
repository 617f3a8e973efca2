"""Provisioning: create or find the device key, enroll it, write the device config.

One device::

    result = provision(ProvisioningRequest(key_uri=..., config_path=..., verifier_url=...,
                                           enrollment_token_file=...))

Many devices from a CSV manifest: :func:`read_manifest` and :func:`run_batch`. Each step is
recorded in a state file next to the config, so an interrupted run resumes where it stopped.
"""

from device_sdk.errors import LockHeldError
from device_sdk.provisioning.batch import (
    BatchReport,
    ManifestRow,
    RowOutcome,
    RowResult,
    parse_manifest,
    read_manifest,
    run_batch,
    write_report,
)
from device_sdk.provisioning.info import DeviceInfo, device_info
from device_sdk.provisioning.run import (
    ProvisioningRequest,
    ProvisioningResult,
    StepOutcome,
    provision,
)
from device_sdk.provisioning.select import KeyChoice, choose_key
from device_sdk.provisioning.state import STEPS, ProvisioningState, load_state, state_path_for

__all__ = [
    "STEPS",
    "BatchReport",
    "DeviceInfo",
    "KeyChoice",
    "LockHeldError",
    "ManifestRow",
    "ProvisioningRequest",
    "ProvisioningResult",
    "ProvisioningState",
    "RowOutcome",
    "RowResult",
    "StepOutcome",
    "choose_key",
    "device_info",
    "load_state",
    "parse_manifest",
    "provision",
    "read_manifest",
    "run_batch",
    "state_path_for",
    "write_report",
]
