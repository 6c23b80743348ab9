"""Progress bars on long passes (training epochs, calibration, evaluation, sweep cells, verify, compare)
and the logging setup of spawned worker processes.

A bar is drawn only when stderr is a terminal and the `intq` logger is enabled for INFO: the command
line sets that level (WARNING under -q, so -q hides bars with the messages); a library user turns both
on with logging, e.g. logging.basicConfig(level=logging.INFO). Piped or redirected output gets no bar.
tqdm draws it when installed (the `progress` extra); without tqdm a plain line 'evaluating: 3/10' is
rewritten in place with '\\r'. The library never configures logging handlers of its own process."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

ROOT_LOGGER = "intq"
PLAIN_INTERVAL = 0.1  # seconds between two updates of the plain (tqdm-less) line
Item = TypeVar("Item")
_in_worker = False  # set in a spawned worker: its messages are logged, its bars would fight the parent's


def bars_shown() -> bool:
    """True when a bar would be drawn: stderr is a terminal, the `intq` logger passes INFO, and this
    is not a spawned worker (start_worker_logging)."""
    return not _in_worker and logging.getLogger(ROOT_LOGGER).isEnabledFor(logging.INFO) and sys.stderr.isatty()


def progress(items: Iterable[Item], what: str, total: int | None = None) -> Iterable[Item]:
    """`items` unchanged, drawing a bar labelled `what` on stderr while they are consumed (bars_shown);
    `total` defaults to len(items) where it has one. The bar is removed when the pass ends."""
    if not bars_shown():
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain(items, what, total)
    return tqdm(items, desc=what, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


def _plain(items: Iterable[Item], what: str, total: int | None) -> Iterator[Item]:
    """The bar without tqdm: 'what: done/total', at most every PLAIN_INTERVAL seconds, cleared at the end."""
    shown_at, done = -1.0, 0
    of = f"/{total}" if total is not None else ""
    try:
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if now - shown_at >= PLAIN_INTERVAL:
                sys.stderr.write(f"\r{what}: {done}{of}")
                sys.stderr.flush()
                shown_at = now
    finally:
        if shown_at >= 0:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def worker_log_level() -> int | None:
    """The level that spawned workers log at (start_worker_logging): this process's `intq` level when
    it configured a handler for `intq` (the command line does); None otherwise (a library: silent)."""
    logger = logging.getLogger(ROOT_LOGGER)
    return logger.level if logger.handlers else None


def start_worker_logging(level: int | None) -> None:
    """In a spawned worker: log under `level` (worker_log_level) to its stderr, which it shares with
    the process that started it (no bars: they are the parent's); None leaves logging unconfigured."""
    global _in_worker
    _in_worker = True
    if level is None:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(ROOT_LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
