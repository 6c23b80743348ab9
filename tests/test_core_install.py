"""A core-only install in a fresh virtual environment: `pip install .` brings torch and numpy alone, and
with them intq captures, calibrates, converts, runs the reference and saves and reloads an
IntegerModel; onnx, onnxruntime, matplotlib and Pillow are not importable there, and a command that
needs one says which extra to install, in one line.

The environment is made offline and without copying PyTorch (5.5 GB): `python -m venv --without-pip`,
a .pth file in its site-packages pointing at a folder of symlinks to exactly the distributions torch
and numpy need (their requirement closure, read from this environment's installed metadata), and
intq installed from a copy of this checkout by this environment's pip (`--python`, `--no-deps
--no-build-isolation --no-index`), building with the setuptools torch itself requires."""
from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CORE = ("torch", "numpy")
EXTRAS_MODULES = ("onnx", "onnxruntime", "matplotlib", "PIL")

SCRIPT = textwrap.dedent('''
    import sys, torch, torch.nn as nn, intq
    from intq.graph.model_file import load, save
    assert intq.__file__.startswith(sys.prefix), intq.__file__  # the installed copy, not the checkout
    for name in ("onnx", "onnxruntime", "matplotlib", "PIL"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        raise SystemExit(f"{name} is importable in the core environment")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    pixels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    images = (pixels.float() / 255 - 0.5) / 0.5
    graph = intq.capture(model, images[:2])
    integer = intq.convert(graph, intq.collect_statistics(graph, [images]), intq.RECOMMENDED)
    outputs = intq.run_integer(integer, pixels)
    save(integer, sys.argv[1])
    assert torch.equal(intq.run_integer(load(sys.argv[1]), pixels), outputs)
    agree = float((outputs.argmax(1) == model(images).argmax(1)).float().mean())
    assert agree >= 0.75, agree  # 16 random images; 100% measured
    print(f"core ok: {len(integer.layers)} ops, top-1 = float on {agree:.0%}")
''')


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """{distribution: metadata} of `names` and everything they require here (markers evaluated for
    this interpreter, extras followed), from the installed metadata."""
    found: dict[str, metadata.Distribution] = {}
    pending = [(name, frozenset()) for name in names]
    while pending:
        name, extras = pending.pop()
        distribution = metadata.distribution(name)
        found[_key(name)] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in (extras or {""}))
            if wanted and (_key(requirement.name) not in found or requirement.extras):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def top_level_entries(distribution: metadata.Distribution) -> set[Path]:
    """The site-packages entries (packages, modules, .dist-info) a distribution installed."""
    site = Path(distribution.locate_file(""))
    return {site / Path(file).parts[0] for file in distribution.files or [] if not str(file).startswith("..")}


def core_environment(folder: Path) -> Path:
    """A fresh venv in `folder` seeing only torch, numpy and their requirements; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True, timeout=120)
    python = folder / "venv" / "bin" / "python"
    linked = folder / "core-packages"
    linked.mkdir()
    for distribution in requirement_closure(CORE).values():
        for entry in top_level_entries(distribution):
            if entry.exists() and not (linked / entry.name).exists():
                (linked / entry.name).symlink_to(entry)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(site) / "core-packages.pth").write_text(f"{linked}\n")
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would let the checkout or a registry in."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "VIRTUAL_ENV")}
    return {**env, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


@pytest.mark.skipif(os.name != "posix", reason="POSIX symlinks and venv layout (bin/python)")
def test_a_core_only_install_captures_converts_runs_and_saves(tmp_path):
    python = core_environment(tmp_path)
    project = tmp_path / "project"  # a copy, so that the build writes nothing into the checkout
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "-q", str(project)],
                             capture_output=True, text=True, timeout=300, env=clean_env())
    assert install.returncode == 0, install.stderr
    listed = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                             "print(sorted({d.metadata['Name'].lower() for d in m.distributions()}))"],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert "'intq'" in listed.stdout and not any(f"'{name.lower()}'" in listed.stdout for name in EXTRAS_MODULES)

    model = tmp_path / "model.npz"
    core = subprocess.run([str(python), "-c", SCRIPT, str(model)], capture_output=True, text=True, timeout=300,
                          env=clean_env(), cwd=tmp_path)
    assert core.returncode == 0, core.stderr
    assert core.stdout.startswith("core ok: 6 ops")  # conv+BN+ReLU, pool, conv+ReLU, pool, flatten, linear

    export = subprocess.run([str(python.parent / "intq"), "export-onnx", str(model), "--out", str(tmp_path / "m.onnx")],
                            capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path)
    assert export.returncode == 2 and export.stderr.strip() == (
        "intq: error: exporting ONNX needs onnx, which is not installed: pip install 'intq[onnx]' (or 'intq[all]')")
    assert not (tmp_path / "m.onnx").exists()
