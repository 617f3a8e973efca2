"""pytest plugin of the hardware-in-the-loop rig: ``pytest hil --rig rig.toml``.

Options: ``--rig`` (the inventory, required), ``--report-dir`` (JUnit XML, JSON, Markdown and
the latency plot; default ``reports/hil``), ``--sign-count`` and ``--connect-count``.

Every scenario that takes the ``device`` fixture runs once per inventory device. A scenario marked
``@pytest.mark.needs("power")`` is skipped on a device without that capability, and the skip
reason names the capability and how to provide it. This directory is not under ``tests/``, so
the main test suite collects it only when asked.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.inventory import Inventory, InventoryError, load_inventory
from hil.report import write_reports
from hil.rig import DEFAULT_CONNECT_COUNT, DeviceHandle, Rig

logger = logging.getLogger(__name__)

INVENTORY_KEY = pytest.StashKey[Inventory]()
RIG_KEY = pytest.StashKey[Rig]()

CAPABILITY_HINTS = {
    "power": "add a 'power' table to the device and set capabilities.power = true",
    "unplug": (
        "needs power control that cuts the token itself (a relay or a switched USB port) and "
        "capabilities.unplug = true"
    ),
    "attestation": "set capabilities.attestation = true for a token that attests its keys",
    "counter": "set capabilities.counter = true for a token with a monotonic counter",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop rig")
    group.addoption("--rig", metavar="TOML", help="inventory of the bench (see docs/hil.md)")
    group.addoption(
        "--report-dir",
        metavar="DIR",
        default="reports/hil",
        help="directory for junit.xml, report.json, report.md and latency.svg "
        "(default: reports/hil)",
    )
    group.addoption(
        "--sign-count",
        type=int,
        metavar="N",
        help="signatures per device in the sign latency scenario (default: the inventory's "
        "[rig] sign_count, else 200)",
    )
    group.addoption(
        "--connect-count",
        type=int,
        metavar="N",
        default=DEFAULT_CONNECT_COUNT,
        help="logins per device in the connect latency scenario "
        f"(default: {DEFAULT_CONNECT_COUNT})",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(capability): the scenario needs that capability")
    config.addinivalue_line(
        "markers", "destructive: the scenario creates keys and needs a blank or disposable token"
    )
    rig_path = config.getoption("--rig")
    if rig_path is None:
        raise pytest.UsageError(
            "the rig needs an inventory: run `pytest hil --rig hil/sim-rig.toml` (see docs/hil.md)"
        )
    try:
        config.stash[INVENTORY_KEY] = load_inventory(rig_path)
    except InventoryError as exc:
        raise pytest.UsageError(str(exc)) from None

    report_dir = Path(config.getoption("--report-dir")).absolute()
    report_dir.mkdir(parents=True, exist_ok=True)
    # tryfirst: this runs before the junitxml plugin reads the option in its own configure hook.
    if not config.option.xmlpath:
        config.option.xmlpath = str(report_dir / "junit.xml")

    inventory = config.stash[INVENTORY_KEY]
    config.stash[RIG_KEY] = Rig(
        inventory=inventory,
        report_dir=report_dir,
        sign_count=config.getoption("--sign-count") or inventory.sign_count,
        connect_count=config.getoption("--connect-count"),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" not in metafunc.fixturenames:
        return
    names = [device.name for device in metafunc.config.stash[INVENTORY_KEY].devices]
    metafunc.parametrize("device", names, indirect=True, ids=names)


@pytest.fixture(scope="session")
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The running rig: servers and simulators started, one handle per device."""
    instance = request.config.stash[RIG_KEY]
    instance.directory = tmp_path_factory.mktemp("rig")
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        _keep_logs(instance)


def _keep_logs(instance: Rig) -> None:
    """Copy server and simulator logs into the report directory, for debugging a failure."""
    logs = instance.report_dir / "logs"
    logs.mkdir(exist_ok=True)
    for path in instance.directory.rglob("*.log"):
        shutil.copy(path, logs / f"{path.parent.name}-{path.name}")


@pytest.fixture
def device(request: pytest.FixtureRequest) -> DeviceHandle:
    """The device this scenario runs on; skipped when it lacks a capability the scenario needs.

    The capability check comes before the rig starts, so a run of skipped scenarios starts no
    server and no simulator.
    """
    inventory = request.config.stash[INVENTORY_KEY]
    spec = inventory.device(request.param)
    for marker in request.node.iter_markers("needs"):
        for capability in marker.args:
            if not spec.capabilities.has(capability):
                pytest.skip(
                    f"device {spec.name} lacks capability '{capability}': "
                    f"{CAPABILITY_HINTS.get(capability, '')}"
                )
    rig: Rig = request.getfixturevalue("rig")
    if request.param in rig.setup_errors:
        pytest.fail(f"device {spec.name} could not be set up: {rig.setup_errors[request.param]}")
    return rig.handles[request.param]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome: Any = yield
    report = outcome.get_result()
    instance = item.config.stash[RIG_KEY]
    callspec = getattr(item, "callspec", None)
    if callspec is None or "device" not in callspec.params:
        return
    device_name = callspec.params["device"]
    scenario = item.name.split("[")[0].removeprefix("test_")
    extra = [value for key, value in callspec.params.items() if key != "device"]
    if extra:
        scenario += "[" + "-".join(map(str, extra)) + "]"

    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        instance.set_outcome(device_name, scenario, "skipped", reason.removeprefix("Skipped: "))
    elif report.failed:
        state = "failed" if report.when == "call" else "error"
        message = getattr(report.longrepr, "reprcrash", None)
        detail = message.message if message is not None else str(report.longrepr)[-500:]
        instance.set_outcome(device_name, scenario, state, detail.splitlines()[0][:300])
    elif report.when == "call":
        instance.set_outcome(device_name, scenario, "passed")
    if report.when == "call" or report.skipped or report.failed:
        instance.results[device_name][scenario]["seconds"] = round(report.duration, 3)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    instance = session.config.stash.get(RIG_KEY, None)
    if instance is None:
        # The inventory was invalid, so pytest stopped before any scenario.
        return
    paths = write_reports(instance)
    session.config.stash[REPORT_PATHS_KEY] = paths


REPORT_PATHS_KEY = pytest.StashKey[list[Path]]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    paths = config.stash.get(REPORT_PATHS_KEY, None)
    if not paths:
        return
    terminalreporter.write_sep("-", "HIL rig report")
    for path in paths:
        terminalreporter.write_line(str(path))
