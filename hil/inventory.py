"""The rig inventory: which devices sit on the bench, how to reach them and what they can do.

A TOML file with an optional ``[rig]`` table, an optional ``[services]`` table and one
``[[device]]`` table per device::

    [rig]
    sign_count = 200                  # signatures per device in the latency scenario

    [services]
    listen = "127.0.0.1"              # address the rig's verifier and broker bind to
    advertise = "127.0.0.1"           # address the devices use to reach them

    [[device]]
    name = "pi-tpm-01"
    key = "tpm2:handle=0x81000010?tcti=device:/dev/tpmrm0"
    access = { kind = "ssh", host = "pi-tpm-01.lab", user = "pi" }
    console = { port = "/dev/ttyUSB0", baud = 115200 }
    power = { kind = "usb-relay", port = "/dev/ttyUSB3", channel = 1 }
    disposable = true
    capabilities = { algorithms = ["ec-p256"], power = true }

Every table is checked strictly: an unknown key or a missing field raises
:class:`InventoryError` naming the device and the field, with the closest known name when the
key looks like a typo.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from device_sdk.config import ALGORITHMS
from device_sdk.errors import ConfigError

__all__ = [
    "ACCESS_KINDS",
    "CAPABILITY_FLAGS",
    "POWER_KINDS",
    "SIM_KINDS",
    "Access",
    "Capabilities",
    "Console",
    "Device",
    "Inventory",
    "InventoryError",
    "Power",
    "Services",
    "Simulation",
    "load_inventory",
    "parse_inventory",
]

ACCESS_KINDS: Final = ("local", "ssh")
POWER_KINDS: Final = ("none", "command", "usb-relay", "uhubctl", "sim")
SIM_KINDS: Final = ("softhsm", "swtpm", "firmware-shim")
CAPABILITY_FLAGS: Final = ("attestation", "counter", "power", "unplug")
DEFAULT_SIGN_COUNT: Final = 200
DEFAULT_BAUD: Final = 115200


class InventoryError(ConfigError):
    """The inventory file is invalid; the message names the device and the field."""


@dataclass(frozen=True)
class Access:
    """Access to a device: ``device-sdk`` runs on this host, or over SSH on ``host``."""

    kind: str = "local"
    host: str | None = None
    user: str | None = None
    port: int = 22
    identity_file: str | None = None
    command: str = "device-sdk"


@dataclass(frozen=True)
class Console:
    """A serial console of the device, listed in the report for debugging a failure."""

    port: str
    baud: int = DEFAULT_BAUD


@dataclass(frozen=True)
class Power:
    """Power control that switches the device (or its token) off and on.

    ``command``: ``on`` and ``off`` are shell commands run on the rig host. ``usb-relay``: a
    serial relay board on ``port``, relay ``channel`` (numbered from 1). ``uhubctl``: the USB hub
    at ``location``, downstream ``port``. ``sim``: the rig stops and restarts the simulated
    device's process.
    """

    kind: str = "none"
    on: str | None = None
    off: str | None = None
    port: str | None = None
    channel: int | None = None
    baud: int = 9600
    location: str | None = None
    hub_port: int | None = None
    settle: float = 1.0

    @property
    def available(self) -> bool:
        return self.kind != "none"


@dataclass(frozen=True)
class Capabilities:
    """Capabilities of the device; each scenario names the capability it needs."""

    algorithms: tuple[str, ...] = ("ec-p256",)
    attestation: bool = False
    counter: bool = False
    power: bool = False
    unplug: bool = False

    def has(self, name: str) -> bool:
        if name not in CAPABILITY_FLAGS:
            raise ValueError(f"unknown capability {name!r}: use one of {CAPABILITY_FLAGS}")
        return bool(getattr(self, name))


@dataclass(frozen=True)
class Simulation:
    """A simulated device the rig starts itself: SoftHSM, swtpm or the firmware-shim simulator.

    ``token`` is the SoftHSM token label; ``slots`` the firmware-shim simulator's key slots.
    """

    kind: str
    token: str = "hil"  # noqa: S105 - a token label, not a secret
    slots: int = 4


@dataclass(frozen=True)
class Device:
    """One device of the bench.

    ``key`` is the key URI; for a simulated device it may contain ``{state}`` (the simulator's
    state directory) and ``{tcti}`` (the swtpm TCTI), filled in when the simulator starts.
    ``reset`` is a shell command that erases the token, for disposable real devices.
    ``workdir`` is where the device keeps its config and files (default: a directory of the
    rig run for local devices, ``.device-sdk-hil`` in the login's home for SSH devices).
    ``software_key`` lets provisioning accept a SoftHSM key (``--allow-software-key``).
    """

    name: str
    key: str
    access: Access
    capabilities: Capabilities
    power: Power = field(default_factory=Power)
    console: Console | None = None
    disposable: bool = False
    reset: str | None = None
    workdir: str | None = None
    software_key: bool = False
    sim: Simulation | None = None


@dataclass(frozen=True)
class Services:
    """Listen address of the rig's verifier and broker, and the address devices use for them."""

    listen: str = "127.0.0.1"
    advertise: str = "127.0.0.1"


@dataclass(frozen=True)
class Inventory:
    path: Path
    devices: tuple[Device, ...]
    services: Services = field(default_factory=Services)
    sign_count: int = DEFAULT_SIGN_COUNT

    def device(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)


# --- checking ---------------------------------------------------------------------------------


class _Table:
    """A TOML table being read: every key must be read or known, and errors name the place."""

    def __init__(self, data: Any, where: str, known: Sequence[str]) -> None:
        if not isinstance(data, Mapping):
            raise InventoryError(f"{where}: expected a table, got {_type_name(data)}")
        self.data = data
        self.where = where
        unknown = [key for key in data if key not in known]
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
            )
            raise InventoryError(f"{where}: unknown field {key!r}{hint}")

    def _get(self, key: str, kind: type | tuple[type, ...], required: bool, default: Any) -> Any:
        if key not in self.data:
            if required:
                raise InventoryError(f"{self.where}: missing field {key!r}")
            return default
        value = self.data[key]
        # bool is an int subclass, so a bare True must not pass where a number is due.
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise InventoryError(
                f"{self.where}: field {key!r} must be {_kind_name(kind)}, got a boolean"
            )
        if not isinstance(value, kind):
            raise InventoryError(
                f"{self.where}: field {key!r} must be {_kind_name(kind)}, got {_type_name(value)}"
            )
        return value

    def text(self, key: str, *, required: bool = False, default: str | None = None) -> Any:
        value = self._get(key, str, required, default)
        if isinstance(value, str) and not value.strip():
            raise InventoryError(f"{self.where}: field {key!r} is empty")
        return value

    def integer(self, key: str, *, required: bool = False, default: int | None = None) -> Any:
        value = self._get(key, int, required, default)
        if value is not None and value <= 0:
            raise InventoryError(f"{self.where}: field {key!r} must be positive, got {value}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self._get(key, (int, float), False, default)
        if value < 0:
            raise InventoryError(f"{self.where}: field {key!r} must not be negative, got {value}")
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        return bool(self._get(key, bool, False, default))

    def choice(self, key: str, choices: Sequence[str], *, default: str | None = None) -> str:
        value = self.text(key, required=default is None, default=default)
        if value not in choices:
            raise InventoryError(
                f"{self.where}: invalid {key} {value!r}: use one of {', '.join(choices)}"
            )
        return str(value)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(names.get(item, item.__name__) for item in _as_tuple(kind))


def _type_name(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _parse_access(data: Any, where: str) -> Access:
    if data == "local":
        return Access()
    if isinstance(data, str):
        raise InventoryError(
            f'{where}: invalid access {data!r}: use "local" or a table '
            '{ kind = "ssh", host = "...", user = "..." }'
        )
    table = _Table(data, where, ("kind", "host", "user", "port", "identity_file", "command"))
    kind = table.choice("kind", ACCESS_KINDS)
    if kind == "local":
        for key in ("host", "user", "port", "identity_file"):
            if key in table.data:
                raise InventoryError(f"{where}: field {key!r} applies to ssh access only")
        return Access(command=table.text("command", default="device-sdk"))
    return Access(
        kind="ssh",
        host=table.text("host", required=True),
        user=table.text("user", required=True),
        port=table.integer("port", default=22),
        identity_file=table.text("identity_file"),
        command=table.text("command", default="device-sdk"),
    )


_POWER_FIELDS: Final = {
    "none": (),
    "command": ("on", "off"),
    "usb-relay": ("port", "channel"),
    "uhubctl": ("location", "port"),
    "sim": (),
}
_POWER_OPTIONAL: Final = {
    "none": (),
    "command": ("settle",),
    "usb-relay": ("baud", "settle"),
    "uhubctl": ("settle",),
    "sim": ("settle",),
}


def _parse_power(data: Any, where: str) -> Power:
    if data is None:
        return Power()
    if not isinstance(data, Mapping) or "kind" not in data:
        _Table(data, where, ("kind",))
        raise InventoryError(f"{where}: missing field 'kind' (one of {', '.join(POWER_KINDS)})")
    kind = _Table({"kind": data["kind"]}, where, ("kind",)).choice("kind", POWER_KINDS)
    required = _POWER_FIELDS[kind]
    table = _Table(data, f"{where} ({kind})", ("kind", *required, *_POWER_OPTIONAL[kind]))
    settle = table.number("settle", 1.0)
    if kind == "command":
        return Power(
            kind=kind,
            on=table.text("on", required=True),
            off=table.text("off", required=True),
            settle=settle,
        )
    if kind == "usb-relay":
        return Power(
            kind=kind,
            port=table.text("port", required=True),
            channel=table.integer("channel", required=True),
            baud=table.integer("baud", default=9600),
            settle=settle,
        )
    if kind == "uhubctl":
        return Power(
            kind=kind,
            location=table.text("location", required=True),
            hub_port=table.integer("port", required=True),
            settle=settle,
        )
    return Power(kind=kind, settle=settle)


def _parse_console(data: Any, where: str) -> Console | None:
    if data is None:
        return None
    if isinstance(data, str):
        return Console(port=data)
    table = _Table(data, where, ("port", "baud"))
    return Console(
        port=table.text("port", required=True), baud=table.integer("baud", default=DEFAULT_BAUD)
    )


def _parse_capabilities(data: Any, where: str) -> Capabilities:
    if data is None:
        return Capabilities()
    table = _Table(data, where, ("algorithms", *CAPABILITY_FLAGS))
    algorithms = table._get("algorithms", list, False, ["ec-p256"])
    if not algorithms:
        raise InventoryError(f"{where}: field 'algorithms' is empty; list at least \"ec-p256\"")
    for name in algorithms:
        if name not in ALGORITHMS:
            raise InventoryError(
                f"{where}: invalid algorithm {name!r} in 'algorithms': use {', '.join(ALGORITHMS)}"
            )
    flags = {name: table.flag(name) for name in CAPABILITY_FLAGS}
    return Capabilities(algorithms=tuple(algorithms), **flags)


def _parse_sim(data: Any, where: str) -> Simulation | None:
    if data is None:
        return None
    table = _Table(data, where, ("kind", "token", "slots"))
    return Simulation(
        kind=table.choice("kind", SIM_KINDS),
        token=table.text("token", default="hil"),
        slots=table.integer("slots", default=4),
    )


_DEVICE_FIELDS: Final = (
    "name",
    "key",
    "access",
    "console",
    "power",
    "capabilities",
    "disposable",
    "reset",
    "workdir",
    "software_key",
    "sim",
)


def _parse_device(data: Any, index: int) -> Device:
    where = f"device #{index + 1}"
    if isinstance(data, Mapping) and isinstance(data.get("name"), str) and data["name"]:
        where = f"device {data['name']!r}"
    table = _Table(data, where, _DEVICE_FIELDS)
    name = table.text("name", required=True)
    key = table.text("key", required=True)
    if "access" not in table.data:
        raise InventoryError(f"{where}: missing field 'access' (\"local\" or an ssh table)")

    device = Device(
        name=name,
        key=key,
        access=_parse_access(table.data["access"], f"{where}: access"),
        capabilities=_parse_capabilities(table.data.get("capabilities"), f"{where}: capabilities"),
        power=_parse_power(table.data.get("power"), f"{where}: power"),
        console=_parse_console(table.data.get("console"), f"{where}: console"),
        disposable=table.flag("disposable"),
        reset=table.text("reset"),
        workdir=table.text("workdir"),
        software_key=table.flag("software_key"),
        sim=_parse_sim(table.data.get("sim"), f"{where}: sim"),
    )
    _check_device(device, where)
    return device


def _check_device(device: Device, where: str) -> None:
    scheme = device.key.partition(":")[0].lower()
    if scheme not in ("pkcs11", "tpm2", "serial"):
        raise InventoryError(
            f"{where}: invalid key {device.key.split('?')[0]!r}: "
            "use a pkcs11:, tpm2: or serial: URI"
        )
    if "pin-value" in device.key:
        raise InventoryError(
            f"{where}: the key URI contains a pin-value; put the PIN in a file of mode 0600 "
            "and use pin-source=file:/path"
        )
    if device.power.kind == "sim" and device.sim is None:
        raise InventoryError(f"{where}: power kind 'sim' needs a 'sim' table naming the simulator")
    if device.sim is not None and device.access.kind != "local":
        raise InventoryError(f"{where}: a simulated device ('sim') needs access = \"local\"")
    for flag in ("power", "unplug"):
        if device.capabilities.has(flag) and not device.power.available:
            raise InventoryError(
                f"{where}: capabilities.{flag} is true, but the device has no power control; "
                "add a 'power' table or set the capability to false"
            )


def parse_inventory(data: Mapping[str, Any], path: Path) -> Inventory:
    """Build an :class:`Inventory` from parsed TOML; raise InventoryError for any problem."""
    top = _Table(data, str(path), ("rig", "services", "device"))
    rig = _Table(top.data.get("rig", {}), f"{path}: [rig]", ("sign_count",))
    services_table = _Table(
        top.data.get("services", {}), f"{path}: [services]", ("listen", "advertise")
    )
    services = Services(
        listen=services_table.text("listen", default="127.0.0.1"),
        advertise=services_table.text("advertise", default="127.0.0.1"),
    )

    raw_devices = top.data.get("device")
    if not isinstance(raw_devices, list) or not raw_devices:
        raise InventoryError(f"{path}: no devices; add at least one [[device]] table")
    devices = [_parse_device(entry, index) for index, entry in enumerate(raw_devices)]

    seen: set[str] = set()
    for device in devices:
        if device.name in seen:
            raise InventoryError(f"{path}: device name {device.name!r} is used twice")
        seen.add(device.name)
    return Inventory(
        path=path,
        devices=tuple(devices),
        services=services,
        sign_count=rig.integer("sign_count", default=DEFAULT_SIGN_COUNT),
    )


def load_inventory(path: str | Path) -> Inventory:
    """Read and check an inventory file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InventoryError(f"inventory {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: invalid TOML: {exc}") from None
    return parse_inventory(data, path)
