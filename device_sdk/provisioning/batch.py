"""Batch provisioning from a CSV manifest, one device per row, with a JSON report.

Manifest format: a CSV file with a header row. Blank lines and lines whose first character is
``#`` are ignored. Columns, in any order:

==========================  ========  =============================================================
column                      required  meaning
==========================  ========  =============================================================
``key``                     yes       a key URI (``pkcs11:token=edge-01;object=device-key?pin-
                                      source=file:/etc/pin``), or a bare token label, which means
                                      the key labelled ``device-key`` on that PKCS#11 token
``pin_file``                no        PIN file for a bare token label (mode 0600 or stricter);
                                      with a URI, the URI's ``pin-source`` is used instead
``enrollment_token_file``   yes       file that contains the one-time enrollment token
``config``                  yes       device config file to write (TOML)
``verifier``                no        verifier URL; default: ``--verifier``
``broker``                  no        MQTT broker URL; default: ``--broker``
``ca_bundle``               no        CA bundle for TLS to the verifier; default: ``--ca-bundle``
``algorithm``               no        key algorithm for a new key; default: ``--algorithm``
``allow_software_key``      no        ``true`` to accept a SoftHSM key; default:
                                      ``--allow-software-key``
==========================  ========  =============================================================

Relative paths in the manifest are taken relative to the manifest's directory. A row is done when
the state record next to its config says every step finished; a re-run skips such rows without
opening their token, so only failed or unfinished rows are worked on again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_sdk.errors import ConfigError, DeviceSDKError, ProvisioningError
from device_sdk.provisioning.files import write_file_atomic
from device_sdk.provisioning.state import load_state, state_path_for

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("key", "enrollment_token_file", "config")
OPTIONAL_COLUMNS = (
    "pin_file",
    "verifier",
    "broker",
    "ca_bundle",
    "algorithm",
    "allow_software_key",
)
PATH_COLUMNS = ("pin_file", "enrollment_token_file", "config", "ca_bundle")

STATUS_PROVISIONED = "provisioned"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"


@dataclass(frozen=True)
class ManifestRow:
    """One device to provision, as read from a manifest line; paths are absolute."""

    row: int
    line: int
    key: str
    enrollment_token_file: Path
    config: Path
    pin_file: Path | None = None
    verifier: str | None = None
    broker: str | None = None
    ca_bundle: Path | None = None
    algorithm: str | None = None
    allow_software_key: bool | None = None


@dataclass
class RowResult:
    """The outcome of one manifest row, as it appears in the JSON report."""

    row: int
    line: int
    key: str
    config: str
    status: str
    device_id: str | None = None
    reused_key: bool = False
    step: str | None = None
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0


@dataclass
class BatchReport:
    """The result of a batch run: one RowResult per manifest row, in manifest order."""

    manifest: str
    started_at: float
    finished_at: float = 0.0
    rows: list[RowResult] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, int]:
        counts = {STATUS_PROVISIONED: 0, STATUS_SKIPPED: 0, STATUS_FAILED: 0}
        for result in self.rows:
            counts[result.status] += 1
        return {"total": len(self.rows), **counts}

    @property
    def ok(self) -> bool:
        return all(result.status != STATUS_FAILED for result in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "summary": self.summary,
            "rows": [asdict(result) for result in self.rows],
        }


def _parse_bool(value: str, *, column: str, line: int) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ConfigError(
        f"manifest line {line}: column {column!r} must be true or false, not {value!r}"
    )


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def parse_manifest(text: str, *, base_dir: Path, source: str = "manifest") -> list[ManifestRow]:
    """Parse manifest text into rows; ``base_dir`` anchors relative paths.

    Raises ConfigError naming the line for a missing column, an empty required value or an
    unknown column, so a typo in the header never turns into 20 failed devices.
    """
    lines = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise ConfigError(
            f"{source}: no header row; expected columns {', '.join(REQUIRED_COLUMNS)}"
        )

    reader = csv.DictReader(io.StringIO("\n".join(line for _, line in lines)))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ConfigError(f"{source}: header lacks required column(s) {', '.join(missing)}")
    unknown = [name for name in header if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise ConfigError(
            f"{source}: unknown column(s) {', '.join(unknown)}; known columns are "
            f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}"
        )

    rows: list[ManifestRow] = []
    for index, record in enumerate(reader, start=1):
        line = lines[index][0]
        values = {k: (v or "").strip() for k, v in record.items() if k is not None}
        empty = [name for name in REQUIRED_COLUMNS if not values.get(name)]
        if empty:
            raise ConfigError(f"{source} line {line}: empty required value(s) {', '.join(empty)}")

        paths = {
            name: _resolve(base_dir, values[name]) if values.get(name) else None
            for name in PATH_COLUMNS
        }
        allow = values.get("allow_software_key")
        rows.append(
            ManifestRow(
                row=index,
                line=line,
                key=values["key"],
                enrollment_token_file=paths["enrollment_token_file"],  # type: ignore[arg-type]
                config=paths["config"],  # type: ignore[arg-type]
                pin_file=paths["pin_file"],
                verifier=values.get("verifier") or None,
                broker=values.get("broker") or None,
                ca_bundle=paths["ca_bundle"],
                algorithm=values.get("algorithm") or None,
                allow_software_key=(
                    _parse_bool(allow, column="allow_software_key", line=line) if allow else None
                ),
            )
        )
    return rows


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read and parse a manifest file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from exc
    return parse_manifest(text, base_dir=path.resolve().parent, source=str(path))


def row_is_done(row: ManifestRow) -> bool:
    """Return True when the row's state record shows that every provisioning step finished."""
    try:
        state = load_state(state_path_for(row.config))
    except ProvisioningError:
        return False
    return state is not None and state.finished and row.config.exists()


@dataclass(frozen=True)
class RowOutcome:
    """The result that a row provisioner returns on success."""

    device_id: str
    reused_key: bool


RowProvisioner = Callable[[ManifestRow], RowOutcome]
ProgressCallback = Callable[[int, int, RowResult], None]


def run_batch(
    rows: Sequence[ManifestRow],
    provision_row: RowProvisioner,
    *,
    manifest: str,
    on_row_done: ProgressCallback | None = None,
) -> BatchReport:
    """Provision every row in turn and return the report; a failed row never stops the batch.

    Rows already done are skipped. ``on_row_done(done_count, total, result)`` is called after
    each row, for a progress display.
    """
    report = BatchReport(manifest=manifest, started_at=time.time())
    total = len(rows)
    for row in rows:
        started = time.monotonic()
        result = RowResult(
            row=row.row,
            line=row.line,
            key=row.key,
            config=str(row.config),
            status=STATUS_PROVISIONED,
        )

        if row_is_done(row):
            state = load_state(state_path_for(row.config))
            result.status = STATUS_SKIPPED
            result.device_id = state.device_id if state else None
            logger.info("manifest row %d: already provisioned, skipped", row.row)
        else:
            try:
                outcome = provision_row(row)
            except DeviceSDKError as exc:
                _record_failure(result, exc)
                logger.warning("manifest row %d failed: %s", row.row, exc)
            except Exception as exc:  # noqa: BLE001 - one broken row must not end the batch
                _record_failure(result, exc)
                logger.exception("manifest row %d failed unexpectedly", row.row)
            else:
                result.device_id = outcome.device_id
                result.reused_key = outcome.reused_key

        result.seconds = round(time.monotonic() - started, 3)
        report.rows.append(result)
        if on_row_done is not None:
            on_row_done(len(report.rows), total, result)

    report.finished_at = time.time()
    return report


def _record_failure(result: RowResult, exc: Exception) -> None:
    result.status = STATUS_FAILED
    result.error = str(exc) or type(exc).__name__
    result.step = getattr(exc, "step", None)
    # A step failure wraps the backend's error; the report names the original class.
    cause = exc.__cause__ if isinstance(exc, ProvisioningError) else None
    result.error_type = type(cause if isinstance(cause, Exception) else exc).__name__


def write_report(path: Path, report: BatchReport) -> None:
    """Write the JSON report atomically (mode 0644, because it contains no secret)."""
    text = json.dumps(report.to_dict(), indent=2) + "\n"
    write_file_atomic(path, text.encode("utf-8"), mode=0o644)
