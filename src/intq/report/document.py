"""A small document model: a page is a list of blocks, written as HTML and Markdown with PNG figures.

The blocks are Heading, Paragraph, Table and Image (a matplotlib figure and the file it is saved
to). `_html` and `_markdown` render the same list, so the two files say the same thing; text is
escaped for each format. `write_document` is the one entry point that writes files.

The number helpers give every page the same conventions: displayed negatives use the minus sign
U+2212 ("−0.15"), percentages have two decimals ("53.10"), and a missing value is shown as
MISSING ("—").
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib.figure import Figure

from intq.report import plots
from intq.files import atomic_write_text, ensure_writable_dir

_MINUS = "\u2212"
MISSING = "—"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Image:
    file: str
    alt: str
    figure: Figure = field(compare=False, repr=False)


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    labels: int = 1  # leading text columns; the rest hold numbers and are right-aligned


Block = Heading | Paragraph | Image | Table


# ---- formatting -------------------------------------------------------------------------------
def _minus(text: str) -> str:
    return text.replace("-", _MINUS)


def pct(value: float | None) -> str:
    """A percentage with two decimals, without the % sign: 53.1 -> "53.10", -0.5 -> "−0.50"."""
    return MISSING if value is None else _minus(f"{value:.2f}")


def delta(value: float | None) -> str:
    """A change in points with its sign: "−0.15", "+0.05"; "0.00" when it rounds to zero."""
    if value is None:
        return MISSING
    return "0.00" if round(value, 2) == 0 else _minus(f"{value:+.2f}")


def num(value: Any) -> str:
    """A measured number to four significant digits: -0.123456 -> "−0.1235"."""
    return MISSING if value is None else _minus(f"{value:.4g}")


def integer(value: Any) -> str:
    """A count with thousands separators; a non-number (a count given as "all") as it is."""
    if value is None:
        return MISSING
    return f"{int(value):,}" if isinstance(value, (int, float)) else str(value)


def seconds(value: float | None) -> str:
    """A duration in seconds with one decimal: 55 -> "55.0"."""
    return MISSING if value is None else f"{value:.1f}"


def share(value: float | None) -> str:
    """A fraction as a whole percentage: 0.333 -> "33%"."""
    return MISSING if value is None else f"{100.0 * value:.0f}%"


def points(value: float) -> str:
    """The size of a change, without its sign: -1.5 -> "1.50 points"."""
    return f"{abs(value):.2f} points"


def join(items: Sequence[str]) -> str:
    """An English list: ["a"] -> "a", ["a", "b", "c"] -> "a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- file names -------------------------------------------------------------------------------
def slug(name: str) -> str:
    """A file-system-safe form of `name`: "<Net&>" -> "Net"; "model" when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "model"


def file_names(models: Iterable[str]) -> dict[str, str]:
    """A distinct, file-system-safe name per model ("<Net&>" -> "Net", then "Net-2")."""
    names: dict[str, str] = {}
    for model in models:
        base = candidate = slug(model)
        count = 1
        while candidate in names.values():
            count += 1
            candidate = f"{base}-{count}"
        names[model] = candidate
    return names


# ---- rendering --------------------------------------------------------------------------------
_CSS = """body { font-family: system-ui, sans-serif; max-width: 76rem; margin: 2rem auto;
  padding: 0 1rem; line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.88rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.55rem; }
th { background: #f2f2f2; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; height: auto; }"""


def _text(value: Any) -> str:
    """Element content, escaped (&, <, >); attributes use html.escape with quotes."""
    return html.escape(str(value), quote=False)


def _html_table(table: Table) -> str:
    def row(cells: Sequence[str], tag: str) -> str:
        opened = [f'<{tag} class="num">' if i >= table.labels else f"<{tag}>" for i in range(len(cells))]
        return "<tr>" + "".join(f"{o}{_text(c)}</{tag}>" for o, c in zip(opened, cells)) + "</tr>"
    body = "\n".join(row(cells, "td") for cells in table.rows)
    return f"<table>\n<thead>{row(table.header, 'th')}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        anchor = f' id="{html.escape(block.anchor)}"' if block.anchor else ""
        return f"<h{block.level}{anchor}>{_text(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{_text(block.text)}</p>"
    if isinstance(block, Image):
        return f'<p><img src="{html.escape(block.file)}" alt="{html.escape(block.alt)}"></p>'
    return _html_table(block)


def _html(blocks: Sequence[Block], title: str) -> str:
    body = "\n".join(_html_block(block) for block in blocks)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", str(text))


def _markdown_block(block: Block) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + _md_escape(block.text)
    if isinstance(block, Paragraph):
        return _md_escape(block.text)
    if isinstance(block, Image):
        return f"![{_md_escape(block.alt)}]({block.file})"
    lines = ["| " + " | ".join(_md_escape(c) for c in cells) + " |"
             for cells in (block.header, *block.rows)]
    rule = "| " + " | ".join("---" if i < block.labels else "---:"
                             for i in range(len(block.header))) + " |"
    return "\n".join([lines[0], rule, *lines[1:]])


def _markdown(blocks: Sequence[Block]) -> str:
    return "\n\n".join(_markdown_block(block) for block in blocks) + "\n"


def write_document(blocks: Sequence[Block], out_dir: Path, title: str,
                   stem: str = "report") -> list[Path]:
    """Write `<stem>.html`, `<stem>.md` and each Image's PNG into out_dir; return the paths.

    out_dir is created if needed. `title` is the HTML page's <title>; a visible title, in both
    files, is a Heading among the blocks. Each Image block's figure is saved under its `file`
    name. The paths come back PNGs first (in block order), then the HTML, then the Markdown.
    Every file is written atomically.
    """
    out_dir = ensure_writable_dir(out_dir)
    written = [plots.save_png(block.figure, out_dir / block.file)
               for block in blocks if isinstance(block, Image)]
    for name, text in ((f"{stem}.html", _html(blocks, title)), (f"{stem}.md", _markdown(blocks))):
        atomic_write_text(out_dir / name, text)
        written.append(out_dir / name)
    return written
