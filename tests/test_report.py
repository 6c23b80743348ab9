"""Tests for intq.report.study_report: the report renders the numbers it is given, and only those."""
from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from intq.report.study_report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ("conv1", "fc1", "fc2")
PRESETS = ("study", "recommended")
MEASURED = {  # (model, stage, preset) -> accuracy
    ("Net", "float", None): 53.10,
    ("Net", "weights", "study"): 52.95,
    ("Net", "weights+activations", "study"): 51.00,
    ("Net", "weights", "recommended"): 53.04,
    ("Net", "weights+activations", "recommended"): 52.50,
    ("NetWithBias", "float", None): 52.40,
    ("NetWithBias", "weights+bias-float", "study"): 52.20,
    ("NetWithBias", "integer+bias", "study"): 50.70,
    ("NetWithBias", "weights+bias-float", "recommended"): 52.31,
    ("NetWithBias", "integer+bias", "recommended"): 51.88,
}
PUBLISHED = {
    ("Net", "float"): 53.22, ("Net", "weights"): 52.22, ("Net", "weights+activations"): 49.79,
    ("NetWithBias", "float"): 52.55, ("NetWithBias", "weights+bias-float"): 48.09,
    ("NetWithBias", "integer+bias"): 49.93,
}


def _hist(low: float, high: float) -> dict:
    step = (high - low) / 4
    return {"edges": [low + i * step for i in range(5)], "counts": [5, 0, 40, 7]}


def _weights() -> dict:
    return {name: {"shape": [6, 3, 5, 5] if name == "conv1" else [20, 10], "min": -0.5 + i / 10,
                   "max": 0.58 - i / 10, "mean": 0.001, "std": 0.05 + i / 20, "hist": _hist(-0.5, 0.58)}
            for i, name in enumerate(LAYERS)}


def _activations() -> dict:
    tensors = {"input": {"min": -1.0, "max": 1.0, "mean": -0.05, "std": 0.5, "sigma3": [-1.6, 1.5],
                         "hist": _hist(-1.0, 1.0),
                         "clip": {"study": [-1.6, 1.5], "recommended": [-1.0, 1.0]}}}
    for name in LAYERS:
        tensors[name] = {"min": 0.0, "max": 10.0, "mean": 0.6, "std": 0.9, "sigma3": [-2.1, 3.3],
                         "hist": _hist(0.0, 10.0),
                         "clip": {"study": [-2.1, 3.3], "recommended": [0.0, 8.0]}}
    return tensors


def _results() -> dict:
    models = ("Net", "NetWithBias")
    return {
        "intq_version": "0.1.0",
        "config": {"seed": 0, "device": "cpu", "data_source": "image folder /x/cifar10-jpeg",
                   "calib_samples": {"study": 400, "recommended": 50000},
                   "presets": {"study": "per-tensor 3-sigma, signed int8",
                               "recommended": "per-channel weights, percentile activations"},
                   "machine": "2 cores, Linux x86_64, torch 2.13.0"},
        "rows": [{"model": m, "stage": s, "preset": p, "accuracy": a} for (m, s, p), a in MEASURED.items()],
        "published": [{"model": m, "stage": s, "accuracy": a} for (m, s), a in PUBLISHED.items()],
        "timings_s": {"data": 0.4, "train": 55.0, "calibrate": 3.1, "evaluate": 6.0, "total": 70.0},
        "training": {m: {"losses": [[1, 2000, 2.21], [1, 4000, 1.90], [2, 2000, 1.45], [2, 4000, 1.41]],
                         "seconds": 26.0, "cached": False} for m in models},
        "weights": {m: _weights() for m in models},
        "activations": {m: _activations() for m in models},
        "agreement": {m: {p: [{"layer": name, "values": 470400, "differing": 0, "max_lsb": 0}
                              for name in LAYERS] for p in PRESETS} for m in models},
        "models": [{"model": m, "preset": p, "file": f"{m}-{p}.npz", "bytes": 65000}
                   for m in models for p in PRESETS],
    }


def _read(out: Path) -> tuple[str, str]:
    return (out / "report.html").read_text(encoding="utf-8"), (out / "report.md").read_text(encoding="utf-8")


def _discussion(page: str) -> str:
    match = re.search(r'<h2 id="discussion">.*?(?=<h2)', page, flags=re.S)
    assert match, "no discussion section"
    return match.group(0)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("report")
    return out, write_report(_results(), out)


def test_writes_html_markdown_and_valid_pngs(full_report: tuple[Path, list[Path]]) -> None:
    out, written = full_report
    names = {path.name for path in written}
    expected = {"report.html", "report.md", "accuracy.png", "training_loss.png", "weights_Net.png",
                "weights_NetWithBias.png", "activations_Net.png", "activations_NetWithBias.png"}
    assert names == expected
    assert {path.name for path in out.iterdir()} == expected  # and no temporary files
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC


def test_tables_show_measured_and_published_accuracies(full_report: tuple[Path, list[Path]]) -> None:
    page, markdown = _read(full_report[0])
    for value in [*MEASURED.values(), *PUBLISHED.values()]:
        assert f"{value:.2f}" in page
        assert f"{value:.2f}" in markdown


def test_changes_from_float_are_signed_points(full_report: tuple[Path, list[Path]]) -> None:
    page, markdown = _read(full_report[0])
    # 52.95 - 53.10, 51.00 - 53.10, 49.79 - 53.22, 51.88 - 52.40, with the minus sign U+2212
    for text in ("\u22120.15", "\u22122.10", "\u22123.43", "\u22120.52"):
        assert f'<td class="num">{text}</td>' in page
        assert text in markdown
    assert '<td class="num">-0.15</td>' not in page


def test_names_from_the_results_appear(full_report: tuple[Path, list[Path]]) -> None:
    page, markdown = _read(full_report[0])
    for name in (*LAYERS, "input", *PRESETS, "Net-study.npz", "65,000", "470,400"):
        assert name in page
    assert "![accuracy by stage: published and each preset](accuracy.png)" in markdown
    assert 'src="weights_Net.png"' in page and 'src="activations_NetWithBias.png"' in page


def test_activation_table_shows_kept_share(full_report: tuple[Path, list[Path]]) -> None:
    page, _ = _read(full_report[0])
    # study clip [-2.1, 3.3] keeps 3.3 of the observed [0, 10]; recommended [0, 8] keeps 80%
    assert '<td class="num">33%</td>' in page and '<td class="num">80%</td>' in page


def _lean(results: dict, *keep: str) -> dict:
    """The results without the sections a test does not look at (each figure costs ~0.5 s)."""
    for key in ("training", "weights", "activations"):
        if key not in keep:
            del results[key]
    return results


def _first_paragraph(section: str) -> str:
    return re.search(r"<p>(.*?)</p>", section, flags=re.S).group(1)


def test_discussion_is_built_from_the_numbers(full_report: tuple[Path, list[Path]], tmp_path: Path) -> None:
    first = _discussion(_read(full_report[0])[0])
    assert "\u22122.10" in first and "\u22123.43" in first  # our and the study's activation stage
    assert "1.50 points" in first  # recommended keeps 1.50 more than study at weights+activations
    assert "39%" in first  # 2.1 / 5.4 of the study clip codes stand for negative values
    assert "12 of 12 layer outputs" in first
    changed = _lean(_results())
    changed["rows"][2]["accuracy"] = 50.00  # Net, weights+activations, study
    changed["agreement"]["Net"]["study"][1].update(differing=3, max_lsb=1)
    write_report(changed, tmp_path)
    second = _discussion(_read(tmp_path)[0])
    assert _first_paragraph(second) != _first_paragraph(first)  # the Net paragraph: rows only
    assert "\u22123.10" in second and "2.50 points" in second and "\u22122.10" not in second
    assert "11 of 12 layer outputs" in second and "3 of 470,400 values by at most 1 LSB" in second


def test_discussion_explains_the_study_losses(full_report: tuple[Path, list[Path]]) -> None:
    text = html.unescape(_discussion(_read(full_report[0])[0]))
    assert "conv1 21.6σ (−0.5 to 0.58)" in text  # (0.58 + 0.5) / 0.05
    assert "saturates the tails of conv1 and fc1" in text
    assert "weights+bias-float stage lost 4.46 points" in text
    assert "+1.84 points in the study (48.09% → 49.93%)" in text


def test_model_names_are_escaped(tmp_path: Path) -> None:
    results = _lean(_results(), "weights")
    del results["weights"]["NetWithBias"]
    results["rows"] = [dict(row, model="<Net&>") if row["model"] == "Net" else row for row in results["rows"]]
    results["weights"]["<Net&>"] = results["weights"].pop("Net")
    written = write_report(results, tmp_path)
    page, markdown = _read(tmp_path)
    assert "&lt;Net&amp;&gt;" in page
    assert "<Net&>" not in page
    assert "\\<Net&\\>" in markdown
    assert tmp_path / "weights_Net.png" in written  # a safe file name


def test_optional_sections_may_be_missing(tmp_path: Path) -> None:
    results = _results()
    for key in ("agreement", "training", "weights", "activations", "published", "timings_s", "models"):
        del results[key]
    results["config"]["calib_samples"]["recommended"] = "all"  # the study writes "all" for no limit
    written = write_report(results, tmp_path)
    assert {path.name for path in written} == {"report.html", "report.md", "accuracy.png"}
    page, _ = _read(tmp_path)
    assert "53.10" in page and 'id="agreement"' not in page and 'id="training"' not in page
    assert "calibration samples: study 400, recommended all" in page


def test_an_empty_dictionary_still_gives_a_page(tmp_path: Path) -> None:
    written = write_report({}, tmp_path)
    assert [path.name for path in written] == ["report.html", "report.md"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.html", "report.md"]
