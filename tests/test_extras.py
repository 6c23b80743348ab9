"""The core needs torch and numpy only: with matplotlib, onnx, onnxruntime and Pillow made
unimportable, intq captures, converts, runs and saves an IntegerModel; a command that needs a missing
extra says which one to install, in one line."""
import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent('''
    import importlib.abc, sys
    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {"matplotlib", "onnx", "onnxruntime", "PIL"}:
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Missing())
''')

CORE = BLOCK + textwrap.dedent('''
    import torch, intq
    from intq.cifar.models import Net
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    images = (pixels.float() / 255 - 0.5) / 0.5
    graph = intq.capture(Net().eval(), images[:2])
    model = intq.convert(graph, intq.collect_statistics(graph, [images]), intq.RECOMMENDED)
    path = sys.argv[1]
    intq.save(model, path)
    assert torch.equal(intq.run_integer(intq.load(path), pixels), intq.run_integer(model, pixels))
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in {"matplotlib", "onnx", "onnxruntime", "PIL"})
    print("core ok", loaded)
''')

EXPORT = BLOCK + textwrap.dedent('''
    from intq.cli import main
    sys.exit(main(["export-onnx", sys.argv[1], "--out", sys.argv[2]]))
''')


def run_python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_core_runs_without_any_extra(tmp_path):
    result = run_python(CORE, tmp_path / "model.npz")
    assert result.returncode == 0, result.stderr
    assert "core ok []" in result.stdout


def test_a_command_needing_a_missing_extra_names_it(tmp_path):
    assert run_python(CORE, tmp_path / "model.npz").returncode == 0
    result = run_python(EXPORT, tmp_path / "model.npz", tmp_path / "model.onnx")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("intq: error: exporting ONNX needs onnx, which is not installed: "
                                     "pip install 'intq[onnx]' (or 'intq[all]')")
    assert not (tmp_path / "model.onnx").exists()


def test_version():
    from intq import __version__

    result = subprocess.run([sys.executable, "-m", "intq.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"intq {__version__}"
