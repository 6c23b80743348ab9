"""The command line like its peers: --version, -q (results and errors only), -v (debug detail),
progress messages on stderr through the `intq` logger, progress bars on a terminal (a real
pseudo-terminal) and none when stderr is piped, --json on explain and train."""
import fcntl
import json
import os
import pty
import struct
import termios
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import calibrated, make_pixels, write_image_folder
from hostile import run_cli
from intq.cifar.models import ARCHITECTURES, NetWithBias
from intq.cifar.train import save_weights
from intq.graph.config import RECOMMENDED
from intq.graph.convert import convert
from intq.graph.model_file import save

SRC = str(Path(__file__).parents[1] / "src")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An integer model, a float checkpoint and a 10-class image folder (30 train, 20 test images)."""
    root = tmp_path_factory.mktemp("behaviour")
    torch.manual_seed(0)
    graph, stats = calibrated(NetWithBias().eval(), make_pixels(8))
    save(convert(graph, stats, RECOMMENDED), root / "m.npz")
    save_weights(ARCHITECTURES["Net"]().eval(), [(1, 0, 1.0)], root / "net.npz")
    data = write_image_folder(root / "images", train_per_class=3, test_per_class=2)
    return root, ["--data", str(data), "--cache", str(root / "cache")]


WITHOUT_TQDM = """
import sys
sys.modules["tqdm"] = None  # import tqdm now raises ImportError, as where the extra is not installed
from intq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _intq(argv: list[str], stderr_on_terminal: bool, tqdm: bool = True) -> tuple[int, str, str]:
    """A real `intq` process: (exit status, stdout, stderr), its stderr a pseudo-terminal or a pipe;
    `tqdm` False runs it as if the `progress` extra were not installed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "TERM": "xterm"}
    command = [sys.executable, *(["-m", "intq.cli"] if tqdm else ["-c", WITHOUT_TQDM]), *argv]
    if not stderr_on_terminal:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0 x 0: no room for a bar
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every end of the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    out = process.stdout.read().decode()
    process.wait(timeout=120)
    return process.returncode, out, b"".join(chunks).decode(errors="replace")


def test_progress_bars_show_on_a_terminal_and_not_when_piped_or_quiet(tiny):
    root, common = tiny
    argv = ["eval", str(root / "m.npz"), *common]
    code, out, terminal = _intq(argv, stderr_on_terminal=True)
    assert code == 0 and "integer-only test accuracy" in out
    assert "evaluating" in terminal and "\r" in terminal  # the bar, redrawn in place
    code, piped_out, piped = _intq(argv, stderr_on_terminal=False)
    assert code == 0 and piped_out == out
    assert "evaluating" not in piped and "\r" not in piped
    code, quiet_out, quiet = _intq(["-q", *argv], stderr_on_terminal=True)
    assert code == 0 and quiet_out == out and quiet.strip() == ""


def test_without_tqdm_a_plain_counter_line_shows_on_a_terminal(tiny):
    root, common = tiny
    code, out, terminal = _intq(["eval", str(root / "m.npz"), *common], stderr_on_terminal=True, tqdm=False)
    assert code == 0 and "integer-only test accuracy" in out
    assert "\revaluating: 1/1" in terminal and "|" not in terminal  # the counter, not tqdm's bar


def test_quiet_prints_only_the_results_and_the_messages_go_to_stderr(tiny, tmp_path):
    root, common = tiny
    argv = ["quantize", root / "net.npz", "--arch", "Net", "--out", tmp_path / "n.npz", *common]
    loud = run_cli(argv)
    assert loud.code == 0 and "calibrating on 30 images" in loud.err and "calibrating" not in loud.out
    quiet = run_cli(["-q", *argv])
    assert quiet.code == 0 and quiet.err == ""
    assert quiet.out == loud.out and quiet.out.count("\n") == 1 and "integer-only" in quiet.out
    after = run_cli([*argv, "--quiet"])  # after the command too
    assert after.code == 0 and after.err == "" and after.out == loud.out


def test_verbose_adds_debug_lines_before_or_after_the_command(tiny):
    root, common = tiny
    plain = run_cli(["eval", root / "m.npz", *common])
    assert plain.code == 0 and "debug:" not in plain.err
    for argv in (["-v", "eval", root / "m.npz", *common], ["eval", root / "m.npz", *common, "--verbose"]):
        verbose = run_cli(argv)
        assert verbose.code == 0 and verbose.out == plain.out
        assert f"debug: integer model {root / 'm.npz'}" in verbose.err
        assert "debug: intq eval took" in verbose.err and " s" in verbose.err.splitlines()[-1]


def test_quiet_and_verbose_together_are_refused(tiny):
    root, common = tiny
    result = run_cli(["-q", "-v", "eval", root / "m.npz", *common])
    assert result.code == 2 and "not allowed with argument" in result.err


def test_quiet_still_reports_errors(tmp_path):
    result = run_cli(["-q", "eval", tmp_path / "missing.npz"])
    assert result.code == 2 and result.err.strip() == f"intq: error: no such file: {tmp_path / 'missing.npz'}"


def test_explain_and_train_write_their_figures_as_json(tiny, tmp_path):
    root, common = tiny
    result = run_cli(["-q", "explain", root / "m.npz", "--layer", "conv1", "--index", "0,1,1", *common,
                      "--json", tmp_path / "explain.json"])
    figures = json.loads((tmp_path / "explain.json").read_text())
    assert result.code == 0 and figures["layer"] == "conv1" and figures["index"] == [0, 1, 1]
    assert result.out.splitlines()[1:len(figures["lines"]) + 1] == figures["lines"]
    result = run_cli(["-q", "train", "--arch", "Net", "--epochs", "1", "--batch-size", "10", "--out",
                      tmp_path / "t.npz", *common, "--json", tmp_path / "train.json"])
    figures = json.loads((tmp_path / "train.json").read_text())
    assert result.code == 0 and figures["epochs"] == 1 and len(figures["history"]) == 1
    assert f"test accuracy {figures['history'][0]['test_accuracy']:.2f}%" in result.out
