"""All or nothing: atomic files, staged folders moved in as a set, disk errors named, a killed run's
leftovers removed by the next one, and SIGTERM cleaned up like Ctrl-C (a real subprocess)."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_image_folder
from intq import files
from intq.command_runtime import interrupted_message
from intq.files import (OutputError, atomic_write_text, check_writable, recording_writes,
                        remove_stale_temporaries, staged_output)

DEAD_PID = 2**22 + 12_345  # above Linux's largest pid_max: never a running process


def leftovers(folder: Path) -> list[str]:
    """intq temporaries (.tmp files, staging folders) anywhere under `folder`."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".staging-")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def full_disk_after(monkeypatch, limit: int) -> None:
    """Files that os.fdopen opens for writing raise ENOSPC once `limit` bytes have been written."""
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(real_fdopen(fd, mode, *a, **k)))


def test_disk_full_is_an_output_error_naming_the_file_and_the_old_file_stays(tmp_path, monkeypatch):
    target = tmp_path / "model.npz"
    target.write_text("previous")
    full_disk_after(monkeypatch, limit=10)
    with pytest.raises(OutputError, match=r"model\.npz: No space left on device"):
        atomic_write_text(target, "a much longer new content")
    assert target.read_text() == "previous" and leftovers(tmp_path) == []


def test_a_failure_inside_the_staged_block_leaves_the_previous_output_and_no_staging(tmp_path):
    (tmp_path / "sweep.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path) as staging:
            atomic_write_text(staging / "sweep.json", "new")
            atomic_write_text(staging / "sweep.md", "new")
            raise RuntimeError("report failed half-way")
    assert snapshot(tmp_path) == {"sweep.json": b"old"} and leftovers(tmp_path) == []


def test_a_move_that_fails_half_way_puts_every_previous_file_back(tmp_path, monkeypatch):
    for name in ("a.json", "b.md", "c.png"):
        (tmp_path / name).write_text(f"old {name}")
    before = snapshot(tmp_path)
    real_replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(target)
        if len(calls) == 4:  # a.json set aside and moved in, b.md set aside; moving b.md in fails
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="b.md"):
        with staged_output(tmp_path) as staging:
            for name in ("a.json", "b.md", "c.png", "d.html"):
                (staging / name).write_text(f"new {name}")
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_recording_sees_final_paths_not_staging_ones(tmp_path):
    with recording_writes() as written:
        atomic_write_text(tmp_path / "one.txt", "1")
        with staged_output(tmp_path / "out") as staging:
            atomic_write_text(staging / "two.txt", "2")
    assert written == [tmp_path / "one.txt", tmp_path / "out" / "two.txt"]


def test_interrupted_message_lists_outputs_not_the_cache(tmp_path):
    cache = tmp_path / "cache"
    assert interrupted_message([cache / "weights" / "net.npz"], cache) == "interrupted; no output was written"
    message = interrupted_message([cache / "x.npy", tmp_path / "q.npz"], cache)
    assert message == f"interrupted; wrote {tmp_path / 'q.npz'}; nothing else was written"


def test_check_writable_creates_nothing_and_names_what_is_wrong(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "model.npz")
    check_writable(tmp_path / "new-folder", folder=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file is not a folder"):
        check_writable(tmp_path / "file" / "model.npz")
    with pytest.raises(OutputError, match="is a file; expected a folder"):
        check_writable(tmp_path / "file", folder=True)
    with pytest.raises(OutputError, match="is a folder; expected a file"):
        check_writable(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_writable(tmp_path / "model.npz")
    finally:
        tmp_path.chmod(0o700)


def test_a_single_file_write_removes_a_killed_runs_leftovers_in_its_folder(tmp_path):
    (tmp_path / f".model.npz.{DEAD_PID}.abc123.tmp").write_bytes(b"half")
    (tmp_path / f".staging-{DEAD_PID}-xyz").mkdir()
    live = tmp_path / f".model.npz.{os.getpid()}.def456.tmp"
    live.write_bytes(b"in progress")
    atomic_write_text(tmp_path / "model.npz", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "model.npz"])
    assert remove_stale_temporaries(tmp_path) == []


# SIGTERM: a real `intq` process, paused at a known point by a wrapper that prints READY and sleeps,
# so the signal lands mid-run deterministically. Exit status 143 = 128 + SIGTERM (SIGINT gives 130).
PAUSE = textwrap.dedent("""
    import sys, time
    import {module} as target
    original = target.{function}
    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        print("READY", flush=True)
        time.sleep(120)
        return result
    target.{function} = paused
    from intq.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_until_killed(module: str, function: str, argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", PAUSE.format(module=module, function=function), *argv],
                               cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in process.stdout:
            if line.strip() == "READY":
                break
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from intq.cifar.models import ARCHITECTURES
    from intq.cifar.train import save_weights

    root = tmp_path_factory.mktemp("tiny")
    data = write_image_folder(root / "data", train_per_class=3, test_per_class=2)
    save_weights(ARCHITECTURES["Net"]().eval(), [(1, 0, 1.0)], root / "net.npz")
    return root, ["--data", str(data), "--cache", str(root / "cache")]


def test_sigterm_mid_sweep_keeps_the_previous_report_and_leaves_no_staging(tiny, tmp_path):
    root, common = tiny
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text("previous report")
    (out / f".staging-{DEAD_PID}-killed").mkdir()  # a killed run's leftover
    # -q: stderr holds only the errors
    code, err = run_until_killed("intq.report.sweep_report", "write_sweep_report",
                                 ["-q", "sweep", "--model", str(root / "net.npz"), "--methods", "minmax", "--wbits", "8",
                                  "--abits", "8", "--out", str(out), *common], tmp_path)
    assert code == 143, err
    assert err.strip().splitlines() == ["intq: interrupted; no output was written"]
    assert snapshot(out) == {"sweep.json": b"previous report"} and leftovers(tmp_path) == []


def test_sigterm_after_quantize_saved_says_what_it_wrote(tiny, tmp_path):
    root, common = tiny
    out = tmp_path / "net-int.npz"
    code, err = run_until_killed("intq.workflows.checkpoints", "integer_accuracy",
                                 ["-q", "quantize", str(root / "net.npz"), "--arch", "Net", "--out", str(out), *common],
                                 tmp_path)
    assert code == 143, err
    assert err.strip().splitlines() == [f"intq: interrupted; wrote {out}; nothing else was written"]
    assert out.stat().st_size > 0 and leftovers(tmp_path) == []


def test_an_unexpected_exception_is_one_line_and_intq_debug_shows_the_traceback(monkeypatch, capsys):
    from intq import cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "eval", broken)
    monkeypatch.delenv("INTQ_DEBUG", raising=False)
    assert cli.main(["eval", "model.npz"]) == 1
    assert capsys.readouterr().err == ("intq: internal error: RuntimeError: boom (please report; INTQ_DEBUG=1 shows "
                                       "the traceback)\n")
    monkeypatch.setenv("INTQ_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["eval", "model.npz"])


def test_a_failed_staged_output_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with files.staged_output(out) as staging:
            (staging / "partial.json").write_text("{}")
            raise RuntimeError("failed mid-run")
    assert not out.exists()
