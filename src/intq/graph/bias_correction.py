"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction", section 4.2): rounding a layer's weights shifts the mean of each output channel by
E[(Ŵ − W) x]; subtracting that shift from the float bias, before the int32 bias is quantized, removes it
(docs/math.md eq. 37).

E[x] is measured on the calibration images, with the layer's float inputs (the captured graph's): the
shift is linear in the weight error, so the statistics pass keeps one mean per input channel and kernel
offset (calibrate/window_means.py) and convert computes the correction for whatever weight config it is
given, one calibration serving every config of a sweep. The integer model's inputs have the same mean up
to the shifts that the earlier layers' corrections remove, so E[Ŵ x_q] − E[W x_q] differs from the float
form only in the product of two small errors.
"""
from __future__ import annotations

import numpy as np
import torch

from intq.calibrate.window_means import LINEAR_WINDOW, Window
from intq.graph.captured_graph import WEIGHTED, Conv2d, Graph, Linear


def layer_window(op: Conv2d | Linear) -> Window:
    """How the layer reads its input: its kernel, stride, padding and dilation; a Linear its features."""
    if isinstance(op, Linear):
        return LINEAR_WINDOW
    return Window(tuple(op.weight.shape[2:]), tuple(op.stride), tuple(op.padding), tuple(op.dilation))


def input_windows(graph: Graph) -> dict[str, set[Window]]:
    """{tensor name: the windows of the weighted layers that read it}: what the statistics pass averages."""
    windows: dict[str, set[Window]] = {}
    for node in graph.nodes:
        if isinstance(node.op, WEIGHTED):
            windows.setdefault(node.inputs[0], set()).add(layer_window(node.op))
    return windows


def mean_output_shift(weight_error: torch.Tensor, window_mean: np.ndarray, groups: int = 1) -> torch.Tensor:
    """E[ΔW x] per output channel (eq. 37), float64: Σ_{c, i, j} ΔW[o, c, i, j] · m[g·C/G + c, i, j] for a
    convolution (output channel o in group g of G, m the (C, kh, kw) window mean), ΔW m for a Linear.
    Example: ΔW = [[0.01, −0.02]], m = [2, 1] -> [0.0]; ΔW = [[0.01, 0.02]] -> [0.04]."""
    error = weight_error.to(torch.float64)
    mean = torch.as_tensor(window_mean, dtype=torch.float64)
    if error.dim() == 2:
        return error @ mean
    out_channels, per_group = error.shape[:2]
    error = error.reshape(groups, out_channels // groups, per_group, *error.shape[2:])
    mean = mean.reshape(groups, per_group, *mean.shape[1:])
    return torch.einsum("gocij,gcij->go", error, mean).reshape(out_channels)


def corrected_bias(bias: torch.Tensor | None, weight: torch.Tensor, weight_dequantized: torch.Tensor,
                   window_mean: np.ndarray, groups: int = 1) -> torch.Tensor:
    """b' = b − E[(Ŵ − W) x] (eq. 37), float64; a layer without a bias gets b' = −E[(Ŵ − W) x]."""
    shift = mean_output_shift(weight_dequantized.to(torch.float64) - weight.to(torch.float64), window_mean, groups)
    return (0.0 if bias is None else bias.to(torch.float64)) - shift
