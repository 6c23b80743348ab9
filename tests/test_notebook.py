"""examples/study.ipynb, the study's five questions with intq's Python API: executed top to bottom in a
real Jupyter kernel (nbclient + ipykernel) on random images (INTQ_NOTEBOOK_SMALL=1: 200 training and
100 test images, 1 epoch), so it needs no CIFAR-10; and its committed outputs, which must come from a
full run on CIFAR-10 (what GitHub renders)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "study.ipynb"
# The number each question prints, as "<label> ...: 54.31%": the five questions, then the recommended preset.
LABELS = ("Q1", "Q2", "Q3", "Q4", "Q5", "Recommended")
NUMBER = r"^{label}\b[^\n]*?: (\d+\.\d+)%"
# An absolute path (/a/b..., ~/a, C:\a) where a path starts: outputs must name no machine's directories.
ABSOLUTE_PATH = re.compile(r"(?:^|[\s'\"(=\[])(?:(?:/[\w.-]+){2,}|~/[\w.-]+|[A-Za-z]:\\\\?[\w.-]+)")


def printed_text(notebook) -> str:
    """Everything the code cells wrote to stdout/stderr, in order."""
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream")


def output_text(notebook) -> str:
    """Every text the code cells showed: streams, text/plain and HTML results, error tracebacks (not images)."""
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            texts.append(output.get("text", ""))
            texts += [output.get("data", {}).get(kind, "") for kind in ("text/plain", "text/html", "text/markdown")]
            texts += output.get("traceback", [])
    return "\n".join(text if isinstance(text, str) else "".join(text) for text in texts)


def question_numbers(text: str) -> dict[str, list[float]]:
    """{label: every percentage printed on a line starting with that label}."""
    return {label: [float(value) for value in re.findall(NUMBER.format(label=label), text, re.MULTILINE)]
            for label in LABELS}


def figures_per_section(notebook) -> dict[str, int]:
    """{markdown heading "## ...": PNG figures the code cells below it displayed}."""
    counts: dict[str, int] = {}
    section = "(before the first section)"
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            heading = next((line for line in cell.source.splitlines() if line.startswith("## ")), None)
            section = heading or section
        else:
            counts.setdefault(section, 0)
            counts[section] += sum("image/png" in output.get("data", {}) for output in cell.outputs)
    return counts


def check_outputs(notebook) -> str:
    """The checks both runs must pass; returns the printed text for run-specific ones."""
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert errors == []
    text = printed_text(notebook)
    for label, values in question_numbers(text).items():
        assert len(values) == 1, f"{label}: expected one printed number, found {values}"
        assert 0.0 <= values[0] <= 100.0, f"{label}: {values[0]}% is not a percentage"
    figures = figures_per_section(notebook)
    for question in LABELS[:5]:
        section = next(name for name in figures if name.startswith(f"## {question}."))
        assert figures[section] >= 1, f"section {section!r} displayed no figure"
    assert figures["## What the recommended preset changes"] >= 1
    assert "reference executor" in text and "(agrees)" in text  # the integer explained, checked against the reference
    paths = [match.group(0).strip() for match in ABSOLUTE_PATH.finditer(output_text(notebook))]
    assert paths == [], f"the outputs show absolute paths: {paths}"
    return text


def test_notebook_runs_top_to_bottom_on_random_images(monkeypatch):
    monkeypatch.setenv("INTQ_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("INTQ_DATA", str(ROOT / "no-such-data"))  # the small run must not read CIFAR-10
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on a failing cell
    text = check_outputs(notebook)
    assert "random images (INTQ_NOTEBOOK_SMALL=1)" in text
    assert "Dataset(train=200, test=100," in text


def test_committed_outputs_come_from_a_full_cifar10_run():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells), "commit the notebook executed"
    text = check_outputs(notebook)
    assert "Dataset(train=50000, test=10000, classes=10, image_shape=(3, 32, 32)" in text
    numbers = question_numbers(text)
    assert numbers["Q1"][0] > 45.0, "a float Net trained with the study's recipe reaches about 54%"
