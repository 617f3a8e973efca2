"""Shared test set-up.

Under ``DEVICE_SDK_REQUIRE_SERVICES=1`` (set by ``.ci/run``) a skipped test counts as a failure,
so CI never passes by skipping a real component. A skip whose reason starts with
``not applicable:`` is exempt: use it only where the case cannot exist on this machine kind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = [
    "fixtures_services",
    "fixtures_verifier",
    "fixtures_softhsm",
    "fixtures_provision",
    "fixtures_login",
    "fixtures_tpm",
    "fixtures_serial",
]

REQUIRE_SERVICES = os.environ.get("DEVICE_SDK_REQUIRE_SERVICES") == "1"
NOT_APPLICABLE = "not applicable:"

# Wycheproof vectors (C2SP/wycheproof, testvectors_v1) are never copied into the repository:
# they are read from DEVICE_SDK_VECTORS_DIR, or from ../shared/vectors beside the checkout.
VECTORS_DIR = Path(
    os.environ.get("DEVICE_SDK_VECTORS_DIR")
    or Path(__file__).resolve().parent.parent.parent / "shared" / "vectors"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_SERVICES and report.skipped):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if reason.removeprefix("Skipped: ").startswith(NOT_APPLICABLE):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped under DEVICE_SDK_REQUIRE_SERVICES=1, which forbids skips: {reason}"
