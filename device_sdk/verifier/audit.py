"""The audit log: one structured line per verifier decision.

Lines go to the ``device_sdk.verifier.audit`` logger as ``key=value`` pairs, and the same fields
are attached to the log record as ``record.audit`` for JSON formatters. An assertion, token or
enrollment token is never logged: only ids, outcome, reason and client address.
"""

from __future__ import annotations

import json
import logging
import re

audit_logger = logging.getLogger("device_sdk.verifier.audit")


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')
MAX_VALUE_LENGTH = 200


def _quote(value: object) -> str:
    text = str(value)[:MAX_VALUE_LENGTH]
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return json.dumps(text)


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
    present = {key: value for key, value in record.items() if value is not None}
    line = " ".join(f"{key}={_quote(value)}" for key, value in present.items())
    audit_logger.log(level, "%s", line, extra={"audit": present})
