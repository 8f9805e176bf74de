"""structlog configuration: JSON lines on stderr, with contextvars (request_id, session_id) on every line."""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure_logging(service: str, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog once per process. `service` is bound to every line."""
    global _configured
    level_name = (level or os.environ.get("R2R_LOG_LEVEL", "info")).upper()
    if json is None:
        json = os.environ.get("R2R_LOG_FORMAT", "json") == "json"
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
