"""The exported C99 model reproduces the reference executor bit for bit (skipped without a C compiler)."""
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch

from conftest import Residual, Strided, calibrated, make_pixels
from intq.graph.config import RECOMMENDED, STUDY
from intq.graph.convert import convert
from intq.executors.c_export import export_c
from intq.cifar.models import NetWithBias

COMPILER = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler")


def compile_and_run(folder) -> subprocess.CompletedProcess:
    subprocess.run([COMPILER, "-std=c99", "-O2", "-Wall", "-Werror", "-pedantic", "main.c", "intq_runtime.c",
                    "-o", "check"], cwd=folder, check=True, capture_output=True)
    return subprocess.run(["./check"], cwd=folder, capture_output=True, text=True)


@pytest.mark.parametrize("model_class", [NetWithBias, Strided])
@pytest.mark.parametrize("config", [STUDY, RECOMMENDED,
                                    replace(RECOMMENDED, weights=replace(RECOMMENDED.weights, bits=3),
                                            activations=replace(RECOMMENDED.activations, bits=5))],
                         ids=["study", "recommended", "w3a5"])
def test_c_model_is_bit_exact(tmp_path, model_class, config):
    torch.manual_seed(0)
    pixels = make_pixels(6)
    graph, stats = calibrated(model_class().eval(), pixels)
    export_c(convert(graph, stats, config), pixels[:3], tmp_path)
    result = compile_and_run(tmp_path)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("OK 3 images")


def test_c_check_detects_a_wrong_value(tmp_path):
    torch.manual_seed(0)
    pixels = make_pixels(4)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    export_c(convert(graph, stats, RECOMMENDED), pixels[:1], tmp_path)
    golden = (tmp_path / "golden.h").read_text()
    start = golden.index("GOLDEN_OP0[")
    brace = golden.index("{", start) + 1
    first_comma = golden.index(",", brace)
    value = int(golden[brace:first_comma])
    (tmp_path / "golden.h").write_text(golden[:brace] + f"\n  {value + 1}" + golden[first_comma:])
    result = compile_and_run(tmp_path)
    assert result.returncode == 1 and "MISMATCH image 0 op 0 value 0" in result.stdout


@pytest.mark.parametrize("config", [STUDY, RECOMMENDED], ids=["study", "recommended"])
def test_c_model_with_residual_add_and_average_pools_is_bit_exact(tmp_path, config):
    torch.manual_seed(0)
    model = Residual().eval()
    pixels = make_pixels(6)
    graph, stats = calibrated(model, pixels)
    export_c(convert(graph, stats, config), pixels[:3], tmp_path)
    result = compile_and_run(tmp_path)
    assert result.returncode == 0, result.stdout


def test_verify_counts_no_difference_for_the_c_executor():
    from intq.executors.verify import verify

    torch.manual_seed(0)
    pixels = make_pixels(40)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    model = convert(graph, stats, RECOMMENDED)
    row = verify(model, pixels, ("c",))["c"]
    ops = {op.name: {"type": type(op).__name__, "path": "exact integers (generated C)"} for op in model.layers}
    assert row == {"values": 400, "differing_share": 0.0, "max_lsb": 0, "top1_differing_share": 0.0, "max_real": 0.0,
                   "notes": [], "ops": ops}


def test_verify_names_an_unknown_executor():
    from intq.executors.verify import VerifyError, verify

    torch.manual_seed(0)
    pixels = make_pixels(4)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    with pytest.raises(VerifyError, match="'tflite'.*available: c, torch_quantized, onnx"):
        verify(convert(graph, stats, RECOMMENDED), pixels, ("tflite",))


def _exported(tmp_path):
    torch.manual_seed(0)
    pixels = make_pixels(4)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    export_c(convert(graph, stats, RECOMMENDED), pixels[:1], tmp_path)
    return tmp_path


@pytest.mark.parametrize("field, wrong", [(".multiplier_count = 120", ".multiplier_count = 1"),
                                          (".weight_count = 48000", ".weight_count = 47999"),
                                          (".in_c = 400", ".in_c = 401")])
def test_c_runtime_refuses_an_op_table_whose_lengths_do_not_match(tmp_path, field, wrong):
    """intq_check reads the lengths in the op table before anything runs: an edited model.h (here fc1's
    multipliers, weights or input features) exits 3 naming the op instead of reading out of bounds."""
    folder = _exported(tmp_path)
    header = (folder / "model.h").read_text()
    assert field in header
    (folder / "model.h").write_text(header.replace(field, wrong, 1))
    result = compile_and_run(folder)
    assert result.returncode == 3 and "op 5 of model.h fails the runtime's shape and length check" in result.stdout


def test_export_is_all_or_nothing(tmp_path, monkeypatch):
    """A failure while writing the export leaves the folder as it was: no new model.h beside an old golden.h."""
    from intq import files

    folder = _exported(tmp_path / "out")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    written = []

    def failing_write(path, text):
        if len(written) == 2:
            raise files.OutputError(f"cannot write to {path.parent}: No space left on device")
        written.append(path)
        original(path, text)

    original = files.atomic_write_text
    monkeypatch.setattr("intq.executors.c_export.atomic_write_text", failing_write)
    torch.manual_seed(1)
    pixels = make_pixels(4, seed=1)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    with pytest.raises(files.OutputError):
        export_c(convert(graph, stats, RECOMMENDED), pixels[:1], folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_verify_reports_a_c_build_failure_in_one_line(tmp_path, monkeypatch):
    """A compiler that fails (here a stand-in that prints a diagnostic and exits 1) is one VerifyError
    carrying its first line, not a CalledProcessError traceback."""
    from intq.executors.verify import VerifyError, verify

    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'verify.c:3:5: error: stray character' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setattr("intq.executors.c_runner.shutil.which", lambda name: str(compiler))
    torch.manual_seed(0)
    pixels = make_pixels(4)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    with pytest.raises(VerifyError, match=r"executor c: the C compiler failed \(exit 1\): verify.c:3:5: error: stray"):
        verify(convert(graph, stats, RECOMMENDED), pixels, ("c",))
