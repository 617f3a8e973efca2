"""The rig report: ``report.json``, ``report.md`` and ``latency.svg`` beside pytest's ``junit.xml``.

``report.json`` contains every device's scenario outcomes and measurements. ``report.md`` has one
table row per device with each scenario's outcome and the latency figures, then the reason of
every skip and failure. ``latency.svg`` draws, per device, sign and MQTT connect latency on a
logarithmic millisecond axis: a bar from the median to the 95th percentile, and a line from
the minimum to the maximum. The SVG is written by hand, so the rig needs no plotting package.
"""

from __future__ import annotations

import html
import json
import math
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hil.rig import Rig

OUTCOME_MARKS = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip"}


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int]:
    """Return count, min, median, 95th percentile (inclusive method) and max, in ms."""
    if not values_ms:
        raise ValueError("no latency values to summarise")
    values = sorted(values_ms)
    p95 = (
        statistics.quantiles(values, n=100, method="inclusive")[94]
        if len(values) > 1
        else values[0]
    )
    return {
        "count": len(values),
        "min_ms": round(values[0], 4),
        "median_ms": round(statistics.median(values), 4),
        "p95_ms": round(p95, 4),
        "max_ms": round(values[-1], 4),
    }


def _summary_document(rig: Rig) -> dict[str, Any]:
    devices: list[dict[str, Any]] = []
    for device in rig.inventory.devices:
        results = rig.results.get(device.name, {})
        devices.append(
            {
                "name": device.name,
                "key": rig.handles[device.name].key_uri
                if device.name in rig.handles
                else device.key,
                "access": device.access.kind,
                "power": device.power.kind,
                "console": device.console.port if device.console else None,
                "disposable": device.disposable,
                "capabilities": {
                    "algorithms": list(device.capabilities.algorithms),
                    "attestation": device.capabilities.attestation,
                    "counter": device.capabilities.counter,
                    "power": device.capabilities.power,
                    "unplug": device.capabilities.unplug,
                },
                "scenarios": results,
            }
        )
    counts: dict[str, int] = {}
    for entry in devices:
        for result in entry["scenarios"].values():
            outcome = result.get("outcome", "not run")
            counts[outcome] = counts.get(outcome, 0) + 1
    return {
        "inventory": str(rig.inventory.path),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rig.started_at)),
        "host": platform.node(),
        "python": platform.python_version(),
        "sign_count": rig.sign_count,
        "connect_count": rig.connect_count,
        "outcomes": counts,
        "devices": devices,
    }


def _metric(results: dict[str, Any], scenario: str, name: str) -> Any:
    return results.get(scenario, {}).get("metrics", {}).get(name)


def _format_ms(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    return f"{summary['median_ms']:.3g} / {summary['p95_ms']:.3g}"


def _markdown(document: dict[str, Any]) -> str:
    scenarios: list[str] = []
    for device in document["devices"]:
        for name in device["scenarios"]:
            if name not in scenarios:
                scenarios.append(name)

    lines = [
        "# Hardware-in-the-loop report",
        "",
        f"Inventory `{document['inventory']}`, started {document['started']} on "
        f"{document['host']} (Python {document['python']}).",
        "Outcomes: "
        + ", ".join(f"{count} {name}" for name, count in sorted(document["outcomes"].items()))
        + ".",
        "",
        "## Scenarios per device",
        "",
        "| device | " + " | ".join(scenarios) + " |",
        "| --- | " + " | ".join("---" for _ in scenarios) + " |",
    ]
    for device in document["devices"]:
        cells = [
            OUTCOME_MARKS.get(device["scenarios"].get(name, {}).get("outcome", ""), "-")
            for name in scenarios
        ]
        lines.append(f"| {device['name']} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## Latency per device",
        "",
        f"Median / 95th percentile in milliseconds. Sign: {document['sign_count']} signatures "
        f"of random 32-byte messages in one process. Connect and login: "
        f"{document['connect_count']} each, every one with a fresh challenge and signature.",
        "",
        "| device | backend | sign | MQTT connect | HTTP login "
        "| reconnect after broker restart (s) | unplug recovery (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for device in document["devices"]:
        results = device["scenarios"]
        reconnect = _metric(results, "reconnect_after_broker_restart", "reconnect_s")
        recovery = _metric(results, "token_unplug_between_signs", "recovery_s")
        lines.append(
            f"| {device['name']} | {_metric(results, 'sign_latency', 'backend') or '-'} "
            f"| {_format_ms(_metric(results, 'sign_latency', 'sign'))} "
            f"| {_format_ms(_metric(results, 'connect_latency', 'mqtt_connect'))} "
            f"| {_format_ms(_metric(results, 'connect_latency', 'http_login'))} "
            f"| {reconnect if reconnect is not None else '-'} "
            f"| {recovery if recovery is not None else '-'} |"
        )

    notes = []
    for device in document["devices"]:
        for name, result in device["scenarios"].items():
            if result.get("outcome") in ("failed", "error", "skipped") and result.get("detail"):
                notes.append(
                    f"- **{device['name']}** {name}: {result['outcome']}: {result['detail']}"
                )
    if notes:
        lines += ["", "## Skips and failures", "", *notes]
    lines += [
        "",
        "Plot: `latency.svg`. Per-test detail: `junit.xml`. Raw figures: `report.json`.",
        "",
    ]
    return "\n".join(lines)


# --- SVG --------------------------------------------------------------------------------------

WIDTH = 760
LEFT = 220
RIGHT = 30
ROW = 22
TOP = 40
SERIES = (
    ("sign_latency", "sign", "sign", "#1f77b4"),
    ("connect_latency", "mqtt_connect", "MQTT connect", "#d62728"),
)


def _svg(document: dict[str, Any]) -> str:
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for device in document["devices"]:
        for scenario, metric, label, color in SERIES:
            summary = _metric(device["scenarios"], scenario, metric)
            if summary:
                rows.append((f"{device['name']} {label}", color, summary))

    height = TOP + ROW * max(len(rows), 1) + 50
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        '<text x="10" y="20" font-size="14" font-weight="bold">Latency per device (ms, log '
        "scale): bar = median to p95, line = min to max</text>",
    ]
    if not rows:
        parts.append(f'<text x="10" y="{TOP + 15}">no latency measured</text></svg>')
        return "\n".join(parts)

    low = min(summary["min_ms"] for _, _, summary in rows)
    high = max(summary["max_ms"] for _, _, summary in rows)
    first_decade = math.floor(math.log10(max(low, 1e-4)))
    last_decade = math.ceil(math.log10(max(high, low * 10, 1e-3)))
    span = max(last_decade - first_decade, 1)

    def x(value: float) -> float:
        position = (math.log10(max(value, 10.0**first_decade)) - first_decade) / span
        return LEFT + position * (WIDTH - LEFT - RIGHT)

    bottom = TOP + ROW * len(rows)
    for decade in range(first_decade, last_decade + 1):
        position = x(10.0**decade)
        parts.append(
            f'<line x1="{position:.1f}" y1="{TOP - 5}" x2="{position:.1f}" y2="{bottom}" '
            'stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{position:.1f}" y="{bottom + 16}" text-anchor="middle">'
            f"{10.0**decade:g}</text>"
        )
    parts.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{bottom + 36}" text-anchor="middle">'
        "milliseconds</text>"
    )
    for index, (label, color, summary) in enumerate(rows):
        middle = TOP + ROW * index + ROW / 2
        parts.append(
            f'<text x="{LEFT - 8}" y="{middle + 4:.1f}" text-anchor="end">'
            f"{html.escape(label)}</text>"
        )
        parts.append(
            f'<line x1="{x(summary["min_ms"]):.1f}" y1="{middle:.1f}" '
            f'x2="{x(summary["max_ms"]):.1f}" y2="{middle:.1f}" stroke="{color}"/>'
        )
        start, end = x(summary["median_ms"]), x(summary["p95_ms"])
        parts.append(
            f'<rect x="{start:.1f}" y="{middle - 6:.1f}" width="{max(end - start, 2):.1f}" '
            f'height="12" fill="{color}" fill-opacity="0.6">'
            f"<title>{html.escape(label)}: median {summary['median_ms']} ms, p95 "
            f"{summary['p95_ms']} ms, n={summary['count']}</title></rect>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def write_reports(rig: Rig) -> list[Path]:
    """Write report.json, report.md and latency.svg into the rig's report directory."""
    document = _summary_document(rig)
    directory = rig.report_dir
    paths = [directory / "report.json", directory / "report.md", directory / "latency.svg"]
    paths[0].write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(_markdown(document), encoding="utf-8")
    paths[2].write_text(_svg(document), encoding="utf-8")
    junit = directory / "junit.xml"
    return [junit, *paths] if junit.parent == directory else paths
