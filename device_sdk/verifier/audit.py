"""The audit log: one structured line per verifier decision.

Lines go to the ``device_sdk.verifier.audit`` logger as ``key=value`` pairs, and the same fields
are attached to the log record as ``record.audit`` for JSON formatters. An assertion, token or
enrollment token is never logged: only ids, outcome, reason and client address.
"""

from __future__ import annotations

import logging
import re

audit_logger = logging.getLogger("device_sdk.verifier.audit")


_NEEDS_QUOTES = re.compile(r'[ "=]')
MAX_VALUE_LENGTH = 200
"""Characters of a value kept in an audit line; longer values are cut and marked."""


def _escape(text: str) -> str:
    """Escape backslashes and every non-printable character as ``\\xNN``, ``\\uNNNN`` or
    ``\\UNNNNNNNN``, so that a value from the network cannot forge lines or move a terminal."""
    if text.isprintable() and "\\" not in text:
        return text
    escaped = []
    for char in text:
        code = ord(char)
        if char == "\\":
            escaped.append("\\\\")
        elif char.isprintable():
            escaped.append(char)
        elif code <= 0xFF:
            escaped.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            escaped.append(f"\\u{code:04x}")
        else:
            escaped.append(f"\\U{code:08x}")
    return "".join(escaped)


def clean_value(value: object) -> str:
    """Return ``value`` as audit text: at most :data:`MAX_VALUE_LENGTH` characters, escaped."""
    text = str(value)
    if len(text) > MAX_VALUE_LENGTH:
        text = f"{text[:MAX_VALUE_LENGTH]}...[{len(text) - MAX_VALUE_LENGTH} more characters]"
    return _escape(text)


def _quote(text: str) -> str:
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + text.replace('"', '\\"') + '"'


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
    level = logging.INFO if outcome == "accept" else logging.WARNING
    if not audit_logger.isEnabledFor(level):
        return
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
    # Values are escaped for the structured copy too, since a JSON formatter may pass DEL or C1
    # controls through unescaped. Numbers and booleans stay as they are.
    present = {
        key: value if isinstance(value, int | float) else clean_value(value)
        for key, value in record.items()
        if value is not None
    }
    line = " ".join(f"{key}={_quote(str(value))}" for key, value in present.items())
    audit_logger.log(level, "%s", line, extra={"audit": present})
