"""One-line logging for every process: ``time level component: message`` (request ids inline)."""

from __future__ import annotations

import logging
import sys

from pdbus import envs

_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"


def setup_logging(component: str | None = None, level: str | None = None) -> None:
    level = (level or envs.PDBUS_LOG_LEVEL).upper()
    root = logging.getLogger()
    if not any(getattr(h, "_pdbus", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._pdbus = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("aiohttp.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"pdbus.{name}")
