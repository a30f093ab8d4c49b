"""Log output: one line per event to stderr, as key=value text or JSON, for journald.

Imports: stdlib only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00Z level=info logger=gateway.receiver msg="..."``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a single key=value line."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage().replace("\n", " ")
        line = f'{stamp}Z level={record.levelname.lower()} logger={record.name} msg="{message}"'
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a single JSON line."""
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def set_level(level: str) -> None:
    """Change the log level of a running process (a config reload)."""
    logging.getLogger().setLevel(_LEVELS.get(level, logging.INFO))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send the gateway's logs to stderr in the configured format (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # pynetdicom logs every PDU at info level; its own noise is not the operator's business.
    logging.getLogger("pynetdicom").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("aiosqlite").setLevel(max(root.level, logging.INFO))  # one debug line per statement
    # pydicom's warnings quote element values (a patient ID included): never in our log, never raw on stderr.
    logging.captureWarnings(capture=True)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
