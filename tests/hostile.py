"""Shared pieces of the hostile-input tests (tests/test_hostile_*.py).

Each hostile test module lists its cases as `Hostile(id, what, expected)`: `what` says in a few words
what the crafted or broken input is, `expected` is a fragment of the one line intq must answer with.
docs/hostile-inputs.md is the table of every module's cases; tests/test_hostile_table.py fails when
the table and the cases drift apart.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from intq.cli import main


@dataclass(frozen=True)
class Hostile:
    id: str
    what: str
    expected: str  # a fragment of the one-line error (or of the outcome, for a case that succeeds)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(argv: list[str]) -> CliResult:
    """Run the real `intq` entry point in-process; asserts the answer is never a traceback and that
    a failure is exactly one line on stderr starting with 'intq: error:', the last one (progress
    messages logged before it share stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    result = CliResult(code, out.getvalue(), err.getvalue())
    assert "Traceback" not in result.err and "Traceback" not in result.out, result.err
    if code != 0 and "usage:" not in result.err:
        lines = [line for line in result.err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("intq: error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], result.err
    return result
