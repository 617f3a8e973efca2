"""The audit log: one structured line per verifier decision.

Lines go to the ``device_sdk.verifier.audit`` logger as ``key=value`` pairs, and the same fields
are attached to the log record as ``record.audit`` for JSON formatters. An assertion, token or
enrollment token is never logged: only ids, outcome, reason and client address.
"""

from __future__ import annotations

import logging

audit_logger = logging.getLogger("device_sdk.verifier.audit")


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\r\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def log_decision(
    event: str,
    outcome: str,
    *,
    reason: str | None = None,
    device_id: str | None = None,
    client_address: str | None = None,
    detail: str | None = None,
    **fields: object,
) -> None:
    """Write one audit line: ``event`` (``challenge``, ``assertion``, ...) and ``outcome``.

    ``outcome`` is ``accept`` or ``reject``; a rejection gives its ``reason`` code.
    """
    record: dict[str, object] = {
        "event": event,
        "outcome": outcome,
        "reason": reason,
        "device_id": device_id,
        "client": client_address,
    }
    record.update(fields)
    if detail:
        record["detail"] = detail
    present = {key: value for key, value in record.items() if value is not None}
    line = " ".join(f"{key}={_quote(value)}" for key, value in present.items())
    level = logging.INFO if outcome == "accept" else logging.WARNING
    audit_logger.log(level, "%s", line, extra={"audit": present})
