"""Logging setup: `log.level`, and `log.format` text or one JSON object per line (stderr)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "cpmgr"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    formatter = logging.Formatter(_TEXT_FORMAT)
    formatter.converter = time.gmtime
    return formatter


def configure_logging(level: str, fmt: str) -> None:
    """Route cpmgr's logs to stderr at `level` in `fmt`; calling it again swaps both (SIGHUP)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        root.addHandler(handler)
    handler.setFormatter(_formatter(fmt))
    root.setLevel(level.upper())
    # aiohttp's access log would print a line per scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
