"""The folders show the flow and imports run one way, from the arithmetic up to the command line:
no module imports from a subpackage above its own (issue 11). files.py, extras.py, progress.py and threads.py are
the base every layer may use; cli.py and commands.py sit on top."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "intq"
LAYERS = ["arith", "calibrate", "graph", "ptq", "executors", "data", "cifar", "qat", "workflows", "report"]  # bottom to top
BASE, TOP = {"files", "extras", "progress", "threads", "command_runtime", "__version__"}, {"cli", "commands", "command_checks", "commands_finetune", "__init__"}


def layer_of(module: str) -> int:
    """The rank of a dotted intq module name: -1 for the base, len(LAYERS) for the top."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in TOP:
        return len(LAYERS)
    if parts[0] in BASE:
        return -1
    return LAYERS.index(parts[0])


def intq_imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("intq"):
            imported |= {f"{node.module}.{alias.name}" if node.module == "intq" else node.module for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.startswith("intq")}
    return imported


MODULES = sorted(path for path in PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_layer():
    loose = [path.name for path in PACKAGE.glob("*.py") if path.stem not in BASE | TOP]
    assert loose == [], "modules outside the layer folders"
    assert sorted(path.name for path in PACKAGE.iterdir() if path.is_dir() and not path.name.startswith("__")) == sorted(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above_its_own(path):
    module = "intq." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    upward = sorted(name for name in intq_imports(path) if layer_of(name) > layer_of(module))
    assert upward == [], f"{module} imports from above its layer"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_about_400_lines(path):
    assert len(path.read_text().splitlines()) <= 420


def test_the_layer_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text("from intq.workflows.pipeline import quantize_model\n")
    assert layer_of(sorted(intq_imports(fake))[0]) > layer_of("intq.graph.convert")
