"""Lookup-table activations: every input code of an 8-bit-or-narrower type mapped to an output code (eq. 29).

One float function per kind, the same for capture's float forward (float32), the table (float64) and
the float64 simulation; the table is derived from (kind, params, input and output QParams), never
stored. TFLite's integer kernels for logistic, tanh, hard-swish and leaky ReLU build the same tables.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from intq.arith.qparams import QParams, dequantize, quantize

MAX_LOOKUP_INPUT_BITS = 8  # a table of 2^8 codes: one gather per value
MAX_PARAM_MAGNITUDE = 1e6  # a LeakyReLU slope or a Hardtanh bound beyond this is no activation


class LookupTableError(ValueError):
    """Unusable kind or params (the message says which)."""


# kind -> (its parameter names, y = f(x, **params) on a float tensor, whether f(x) >= 0 for every x)
ACTIVATIONS: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor], bool]] = {
    "sigmoid": ((), torch.sigmoid, True),
    "hardsigmoid": ((), F.hardsigmoid, True),
    "hardswish": ((), F.hardswish, False),
    "silu": ((), F.silu, False),
    "tanh": ((), torch.tanh, False),
    "gelu": ((), lambda x: F.gelu(x, approximate="none"), False),
    "gelu_tanh": ((), lambda x: F.gelu(x, approximate="tanh"), False),
    "leaky_relu": (("negative_slope",), lambda x, negative_slope: F.leaky_relu(x, negative_slope), False),
    "hardtanh": (("min", "max"), lambda x, min, max: F.hardtanh(x, min, max), False),
}


def lookup_problem(kind: str, params: dict) -> str | None:
    """Why (kind, params) is not an activation intq can tabulate, or None: a known kind, exactly its
    parameter names, finite numbers of magnitude at most 1e6, and min < max for hardtanh."""
    if kind not in ACTIVATIONS:
        return f"unknown activation kind {kind[:40]!r} (known: {', '.join(ACTIVATIONS)})"
    names = ACTIVATIONS[kind][0]
    if sorted(params) != sorted(names):
        return f"{kind} takes parameters {list(names)}, got {[str(name)[:20] for name in sorted(params)]}"
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > MAX_PARAM_MAGNITUDE:
            return f"parameter {name} must be a finite number of magnitude at most {MAX_PARAM_MAGNITUDE:g}, got {value!r}"
    if kind == "hardtanh" and not params["min"] < params["max"]:
        return f"hardtanh needs min < max, got min {params['min']} and max {params['max']}"
    return None


def activation(kind: str, params: dict, x: torch.Tensor) -> torch.Tensor:
    """f(x) of the kind, in x's dtype (torch's own function: capture checks it against the model)."""
    return ACTIVATIONS[kind][1](x, **params)


def nonnegative(kind: str, params: dict) -> bool:
    """True when f(x) >= 0 for every x: its output takes unsigned QParams like a ReLU's."""
    return ACTIVATIONS[kind][2] or kind == "hardtanh" and params["min"] >= 0


def input_codes(qparams: QParams) -> torch.Tensor:
    """Every code q of the input type, qmin..qmax, as int64 (at most 2^8 of them)."""
    if qparams.dtype.bits > MAX_LOOKUP_INPUT_BITS:
        raise LookupTableError(f"lookup tables take inputs of at most {MAX_LOOKUP_INPUT_BITS} bits, got {qparams.dtype.name}")
    return torch.arange(qparams.dtype.qmin, qparams.dtype.qmax + 1, dtype=torch.int64)


def lookup_table(kind: str, params: dict, input_qp: QParams, output_qp: QParams) -> np.ndarray:
    """table[q - qmin] = clamp(z_y + round(f(s_x (q - z_x)) / s_y), qmin_y, qmax_y) (eq. 29), int64,
    one entry per input code, f in float64, rounding half away from zero (quantize, eq. 6).

    Example: sigmoid, input int8 (s_x = 1/16, z_x = 0), output uint8 (s_y = 1/256, z_y = 0):
    q = 16 is x = 1.0, f = 0.7310586, 187.1 steps -> 187; q = -128 is x = -8, f = 0.000335 -> 0."""
    problem = lookup_problem(kind, params)
    if problem is not None:
        raise LookupTableError(problem)
    real_x = dequantize(input_codes(input_qp), input_qp, torch.float64)
    real_y = activation(kind, params, real_x)
    scale, zero, dtype = float(output_qp.scale), int(output_qp.zero_point), output_qp.dtype
    real_y = real_y.clamp(scale * (dtype.qmin - zero - 1), scale * (dtype.qmax - zero + 1))  # int64-safe, same codes
    return quantize(real_y, output_qp).numpy()
