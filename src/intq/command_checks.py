"""Checks of command-line values that several commands share: lists of words and numbers, bit widths,
range methods, per-layer bits, existing files. Each bad value is an argparse.ArgumentTypeError naming
its option: one line, exit status 2."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from intq.calibrate.ranges import parse_range_method


def words(values: list[str]) -> tuple[str, ...]:
    """Space- or comma-separated values: ['mse,entropy', 'minmax'] -> ('mse', 'entropy', 'minmax')."""
    return tuple(word for value in values for word in value.split(",") if word)


def bit_widths(values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(word) for word in words(values))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit widths must be integers, got {' '.join(values)}") from None


def switches(option: str, values: list[str]) -> tuple[bool, ...]:
    """'off,on' -> (False, True); any other word refused naming the option."""
    chosen = {"off": False, "on": True}
    bad = [word for word in words(values) if word not in chosen]
    if bad:
        raise argparse.ArgumentTypeError(f"{option} {bad[0]}: choose off or on")
    return tuple(chosen[word] for word in words(values))


ABITS_HELP = ("activation bits of the named nodes' outputs, 2..8, e.g. conv=8,pool=8 in ResNet-20: the first "
              "layer's output and the last layer's input, as BRECQ and QDrop keep them")


def layer_bits(text: str | None, option: str = "--layer-bits") -> tuple[tuple[str, int], ...]:
    """'conv1=8,fc3=8' -> (('conv1', 8), ('fc3', 8)); `option` names the flag in the error."""
    pairs = []
    for item in words([text or ""]):
        name, _, bits = item.partition("=")
        if not name or not bits.isdigit():
            raise argparse.ArgumentTypeError(f"{option}: expected LAYER=BITS, got {item!r}")
        pairs.append((name, int(bits)))
    return tuple(pairs)


def existing_file(path: Path) -> Path:
    """`path` if it is a file; the one-line 'no such file' otherwise (before any loader runs)."""
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    return path


def at_least(option: str, value: int | float | None, low: int | float) -> None:
    """Refuse `value` below `low` (or NaN/Inf); None means the option was not given."""
    if value is not None and not (math.isfinite(value) and value >= low):
        raise argparse.ArgumentTypeError(f"{option} must be at least {low:g}, got {value}")


def bit_width(option: str, value: int) -> None:
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{option}: bit widths must be 2..8, got {value}")


def range_method(option: str, text: str) -> None:
    try:
        parse_range_method(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{option}: {err}") from None


def numbers(option: str, values: list[str] | None, kind=float) -> tuple | None:
    """Space- or comma-separated numbers of type `kind`; None when the option was not given."""
    if values is None:
        return None
    try:
        return tuple(kind(word) for word in words(values))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} takes numbers, got {' '.join(values)}") from None
