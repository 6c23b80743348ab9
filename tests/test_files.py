"""files.atomic_write and files.staged_output directly: the "a failed run leaves the output unchanged"
promise, for failures inside the caller's block and in the middle of moving a set in. Disk errors,
killed runs and the CLI's use of them are in test_cli_outputs.py."""
import errno
import os
from pathlib import Path

import pytest

from intq import files
from intq.files import OutputError, atomic_write, recording_writes, staged_output


def contents(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (temporaries and staging folders included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "model.npz").write_bytes(b"previous")
    with recording_writes() as written:
        with atomic_write(tmp_path / "model.npz") as handle:
            handle.write(b"new")
            assert contents(tmp_path)["model.npz"] == b"previous"  # nothing is replaced before the end
    assert contents(tmp_path) == {"model.npz": b"new"} and written == [tmp_path / "model.npz"]


@pytest.mark.parametrize("error", [RuntimeError("failed half-way"), KeyboardInterrupt()])
def test_a_failure_inside_atomic_write_leaves_the_previous_file_and_no_temporary(tmp_path, error):
    (tmp_path / "model.npz").write_bytes(b"previous")
    with recording_writes() as written:
        with pytest.raises(type(error)):
            with atomic_write(tmp_path / "model.npz") as handle:
                handle.write(b"half of the new")
                raise error
    assert contents(tmp_path) == {"model.npz": b"previous"} and written == []


def test_a_failure_inside_atomic_write_creates_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "model.npz", "w") as handle:
            handle.write("partial")
            raise RuntimeError("failed half-way")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_replaces_what_it_writes_and_keeps_the_rest(tmp_path):
    """Replaced files are set aside in the staging folder during the move, then removed with it."""
    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "kept.txt").write_text("not ours")
    with staged_output(tmp_path) as staging:
        (staging / "a.json").write_text("new a")
        (staging / "b.md").write_text("new b")
    assert contents(tmp_path) == {"a.json": b"new a", "b.md": b"new b", "kept.txt": b"not ours"}


def failing_move(monkeypatch, fail_at: int, error: BaseException) -> list:
    """os.replace raises `error` at its `fail_at`-th call (1-based) during a move; returns the targets."""
    real_replace, targets = os.replace, []

    def replace(source, target):
        targets.append(Path(target))
        if len(targets) == fail_at:
            raise error
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace)
    return targets


def test_a_move_failing_on_a_new_file_restores_the_set_aside_files(tmp_path, monkeypatch):
    """a.json and b.md replace old files (each set aside, then moved in); c.png is new and its move
    fails: a.json and b.md go back to their old contents and no new file stays."""
    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "b.md").write_text("old b")
    targets = failing_move(monkeypatch, 5, OSError(errno.EIO, os.strerror(errno.EIO), "c.png"))
    with pytest.raises(OutputError, match="c.png"):
        with staged_output(tmp_path) as staging:
            for name in ("a.json", "b.md", "c.png"):
                (staging / name).write_text(f"new {name}")
    assert targets[4] == tmp_path / "c.png"
    assert contents(tmp_path) == {"a.json": b"old a", "b.md": b"old b"}


def test_an_interrupt_during_the_move_restores_and_is_not_an_output_error(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text("old a")
    failing_move(monkeypatch, 3, KeyboardInterrupt())  # a.json set aside, moved in; b.md's move
    with pytest.raises(KeyboardInterrupt):
        with staged_output(tmp_path) as staging:
            (staging / "a.json").write_text("new a")
            (staging / "b.md").write_text("new b")
    assert contents(tmp_path) == {"a.json": b"old a"}
