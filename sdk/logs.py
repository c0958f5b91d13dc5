"""structlog set-up, done once at each process entry: pretty on a TTY, JSON lines otherwise, on stderr."""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure_logging(process: str, level: str | None = None) -> None:
    """Configure structlog for this process; binds `process` and `pid` to every line."""
    global _configured
    if _configured:
        return
    _configured = True
    name = (level or os.environ.get("VISABUS_LOG_LEVEL", "INFO")).upper()
    numeric = getattr(logging, name, logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=True) if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process, pid=os.getpid())
