"""Masking the secrets a hook reads, in every log line of the task.

``airflow.sdk.log.mask_secret`` registers a value with Airflow's masker, which redacts the task's own
loggers and structlog. Records of plain ``logging`` loggers (a library's, or ``logging.getLogger``)
were measured to pass unredacted under ``airflow tasks test`` (Airflow 3.3.2;
``tests/plugins/hooks/test_secret_masking.py``). ``mask`` therefore also puts a filter on the root
logger's handlers that replaces the values registered here (and, for a multi-line value such as a
private key, each of its lines) with ``***`` before any handler formats the record. A traceback is
formatted there too and carried in the message, redacted (a structlog formatter would render the
exception itself, unredacted).
"""

from __future__ import annotations

import logging
import threading

#: shorter values are not masked (they would blank out ordinary words); Airflow's own minimum
MIN_LENGTH = 5

_values: set[str] = set()
_lock = threading.Lock()


def _redacted(text: str) -> str:
    for value in sorted(_values, key=len, reverse=True):  # a whole key before its lines
        if value in text:
            text = text.replace(value, "***")
    return text


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _values:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is left to the handler to report
            return True
        redacted = _redacted(message)
        if record.exc_info or record.exc_text:
            # the traceback is formatted here and carried in the message, redacted: a structlog formatter
            # renders ``exc_info`` itself and would show it as it was
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
            redacted = f"{redacted}\n{_redacted(text)}"
            record.exc_info, record.exc_text = None, None
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.stack_info:
            record.stack_info = _redacted(record.stack_info)
        return True


_FILTER = _Redact()


def mask(value: str | None) -> None:
    """Mask ``value`` in every log of this task (Airflow's masker, and plain ``logging`` records)."""
    if not value:
        return
    from airflow.sdk.log import mask_secret

    mask_secret(value)
    parts = [value] + [line.strip() for line in value.splitlines()]
    with _lock:
        _values.update(p for p in parts if len(p) >= MIN_LENGTH and not p.startswith("-----"))
        for handler in logging.getLogger().handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
