"""How a command runs, apart from what it computes: SIGTERM handled as an interrupt, the message an
interrupted command leaves, and the `intq` logger routed to stderr at the level -v/-q ask for."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that every cleanup written for Ctrl-C runs for it too."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises Terminated (a KeyboardInterrupt); the previous
    handler is restored after. Outside the main thread signals cannot be handled: no change."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(written: list[Path], cache: Path | None) -> str:
    """What an interrupted command did and did not write, outputs only (the cache keeps only
    whole files, and is not the user's output)."""
    def in_cache(path: Path) -> bool:
        return cache is not None and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(cache))

    outputs = list(dict.fromkeys(str(path) for path in written if not in_cache(path)))
    if not outputs:
        return "interrupted; no output was written"
    shown = ", ".join(outputs[:3]) + (f" and {len(outputs) - 3} more" if len(outputs) > 3 else "")
    return f"interrupted; wrote {shown}; nothing else was written"


class _MessageFormat(logging.Formatter):
    """Progress messages as they are; warnings as 'intq: warning: ...'; debug detail as 'debug: ...'."""
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"intq: warning: {message}"
        return f"debug: {message}" if record.levelno < logging.INFO else message


@contextmanager
def logging_to_stderr(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs, the `intq` logger writes to stderr: INFO (progress messages, and bars
    on a terminal), DEBUG under -v, WARNING under -q. The previous setup is restored after."""
    logger = logging.getLogger("intq")
    level, handlers, propagate = logger.level, logger.handlers[:], logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MessageFormat())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)  # setLevel, not .level =: it clears the loggers' cached isEnabledFor answers
        logger.handlers[:], logger.propagate = handlers, propagate
