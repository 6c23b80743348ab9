"""Tests for intq.report.document: blocks become escaped HTML and Markdown; numbers get one format."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from intq.report.document import (Heading, Image, Paragraph, Table, delta, file_names, integer, join, num,
                           pct, points, seconds, share, write_document)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure() -> Figure:
    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    return figure


def test_write_document_uses_the_stem_and_the_title(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder"  # created by write_document
    title = "Sweep & results"
    blocks = [Heading(title, level=1), Paragraph("text"), Image("curve.png", "a curve", _figure())]
    written = write_document(blocks, out, title, stem="sweep")
    assert written == [out / "curve.png", out / "sweep.html", out / "sweep.md"]
    assert sorted(path.name for path in out.iterdir()) == ["curve.png", "sweep.html", "sweep.md"]
    assert (out / "curve.png").read_bytes()[:8] == PNG_MAGIC
    page = (out / "sweep.html").read_text(encoding="utf-8")
    assert "<title>Sweep &amp; results</title>" in page
    assert "<h1>Sweep &amp; results</h1>" in page
    assert (out / "sweep.md").read_text(encoding="utf-8").startswith("# Sweep & results\n")


def test_text_is_escaped_for_each_format(tmp_path: Path) -> None:
    blocks = [Heading("<Net&>", anchor="net"), Paragraph("a|b *c* #1"),
              Table(("name", "value"), (("<x>", "1"),))]
    write_document(blocks, tmp_path, "t")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert '<h2 id="net">&lt;Net&amp;&gt;</h2>' in page and "<Net&>" not in page
    assert '<tr><td>&lt;x&gt;</td><td class="num">1</td></tr>' in page
    assert "## \\<Net&\\>" in markdown
    assert "a\\|b \\*c\\* \\#1" in markdown
    assert "| --- | ---: |" in markdown


def test_numbers_use_the_minus_sign_and_fixed_decimals() -> None:
    assert pct(53.1) == "53.10" and pct(-0.5) == "\u22120.50" and pct(None) == "—"
    assert delta(-0.15) == "\u22120.15" and delta(0.05) == "+0.05" and delta(-0.001) == "0.00"
    assert num(-0.123456) == "\u22120.1235"
    assert integer(470400) == "470,400" and integer("all") == "all"
    assert seconds(55) == "55.0" and share(0.333) == "33%" and points(-1.5) == "1.50 points"
    assert join(["a"]) == "a" and join(["a", "b", "c"]) == "a, b and c"


def test_file_names_are_safe_and_distinct() -> None:
    assert file_names(["<Net&>", "Net", "???"]) == {"<Net&>": "Net", "Net": "Net-2", "???": "model"}
