"""Atomic file output: a reader sees either the old file or the complete new one, never half.

Every file intq writes (results, reports, plots, models, caches) goes through `atomic_write`,
which writes to a temporary name in the destination folder and then `os.replace`s it. Temporary
names carry the writing process's id (`.<name>.<pid>.<random>.tmp`, `.staging-<pid>-<random>`), so
a later run can tell the leftovers of a killed process (its id no longer running) from the work in
progress of a live one, and `remove_stale_temporaries` deletes only the former.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


class OutputError(Exception):
    """A destination that cannot be written (names the path)."""


TEMPORARY_SUFFIX = ".tmp"
STAGING_PREFIX = ".staging-"
_OWNER = re.compile(r"^\.(?:.+)\.(\d+)\.[^.]+\.tmp$|^\.staging-(\d+)-[^/]+$|^\.extract-(\d+)-[^/]+$")


def temporary_owner(name: str) -> int | None:
    """The process id embedded in an intq temporary name, or None if `name` is not one."""
    match = _OWNER.match(name)
    return None if match is None else int(next(group for group in match.groups() if group is not None))


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Delete the temporary files and staging folders in `folder` left by intq processes that no
    longer run (killed mid-write); a live process's temporaries stay. Returns the names removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        owner = temporary_owner(entry.name)
        if owner is None or _running(owner):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry.name)
    return removed


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMPORARY_SUFFIX)
    except OSError as err:
        raise OutputError(f"cannot write to {path.parent}: {err.strerror}") from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove it writable; raise OutputError naming it otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OutputError(f"output folder {path} is not writable: {err.strerror}") from None
    return path


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A staging folder inside `out_dir`; when the block succeeds its files move into `out_dir`.

    Each move is an os.replace (atomic per file); on any error nothing reaches `out_dir` and the
    staging folder is removed, so a failed run never leaves partial output.
    """
    remove_stale_temporaries(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir))
    try:
        yield staging
        for path in sorted(staging.iterdir()):
            os.replace(path, Path(out_dir) / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
