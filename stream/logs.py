"""The daemon's log on stderr: plain text for people, or JSON lines for log shippers.

`setup_logging(config.log)` installs one handler on the root logger:

- `log.format = "text"`: `2026-01-31 12:00:00,123 INFO compiled bucket 8 (2/4) in 0.61 s`;
- `log.format = "json"`: one object per line,
  `{"time": "2026-01-31T12:00:00.123Z", "level": "INFO", "logger": "stream.daemon",
  "message": "…"}`, plus `"exception"` (the formatted traceback) when there is one.

JAX reports routine start-up facts at INFO through Python logging ("Unable to initialize
backend 'tpu'…" on every machine without one, "Resetting cache at <empty>." when the
compilation cache is set): those records are demoted to DEBUG, so they show only with
`log.level = "debug"`. Python warnings go through the same handler (`py.warnings`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

from .config import LogConfig

__all__ = ["JsonFormatter", "log_handler", "setup_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"

# JAX's loggers whose INFO records are routine (a start-up on a machine without a TPU, the
# compilation cache being set up): shown at DEBUG.
_DEMOTED = ("jax._src.xla_bridge", "jax._src.compilation_cache")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time (UTC, ISO 8601), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


class _DemoteJaxInfo(logging.Filter):
    """Turns the INFO records of `_DEMOTED` loggers into DEBUG ones, shown only when
    `show_debug`."""

    def __init__(self, show_debug: bool) -> None:
        super().__init__()
        self._show_debug = show_debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name.startswith(_DEMOTED):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self._show_debug
        return True


def log_handler(config: LogConfig, stream: TextIO | None = None) -> logging.Handler:
    """The handler `setup_logging` installs: `config.format` on `stream` (default stderr),
    JAX's routine INFO records demoted to DEBUG."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_DemoteJaxInfo(show_debug=config.level == "debug"))
    return handler


def setup_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Log at `config.level` in `config.format` to `stream` (default stderr), through the
    root logger; like `logging.basicConfig`, it does nothing if the root logger already
    has a handler."""
    logging.basicConfig(level=config.level.upper(), handlers=[log_handler(config, stream)])
    logging.captureWarnings(True)
