"""The mean of what a layer multiplies its weights by: per input channel and kernel offset, over every
window of every calibration image (docs/math.md eq. 37). Bias correction (graph/bias_correction.py)
turns it into each output channel's expected shift from weight quantization, for any weight config.

A `Window` is how a layer reads its input (a convolution's kernel, stride, padding and dilation, or a
Linear's features); a `WindowMeanObserver` streams batches of one tensor and keeps, for each window,
float64 sums (each batch summed in its own dtype first) and the count of windows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    """A convolution's window geometry, each (height, width); kernel None: a Linear, which reads each
    feature (the last axis) on its own."""

    kernel: tuple[int, int] | None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)


LINEAR_WINDOW = Window(None)


def window_sums(sample_sum: torch.Tensor, window: Window) -> tuple[torch.Tensor, int]:
    """(sums, windows per sample) of one batch, from its images summed over the batch (C, H, W).

    sums[c, i, j] = Σ_{y, x} x_pad[c, s_h y + d_h i, s_w x + d_w j] over the output positions (y, x),
    x_pad the input with its zero padding (eq. 37): the input element that kernel offset (i, j) meets
    at every position, summed. A Linear's window: the features themselves, one window per sample row.
    Example: a 3x3 conv, padding 1, on a 4x4 image of ones: sums[c, 1, 1] = 16 (the centre always
    lands inside), sums[c, 0, 0] = 9 (the top-left offset falls on padding in 7 of the 16 positions).
    """
    if window.kernel is None:
        return sample_sum, 1
    (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.stride, window.dilation
    padded = F.pad(sample_sum, (window.padding[1], window.padding[1], window.padding[0], window.padding[0]))
    height, width = padded.shape[1:]
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    sums = torch.stack([torch.stack([
        padded[:, dh * i : dh * i + sh * (out_h - 1) + 1 : sh, dw * j : dw * j + sw * (out_w - 1) + 1 : sw].sum((1, 2))
        for j in range(kw)], dim=1) for i in range(kh)], dim=1)  # (C, kh, kw)
    return sums, out_h * out_w


class WindowMeanObserver:
    """Streams batches of one tensor; `means()` gives each window's (C, kh, kw) mean, (F,) for a Linear."""

    def __init__(self, windows: set[Window]) -> None:
        self.windows = sorted(windows, key=repr)
        self.sums: dict[Window, torch.Tensor] = {}
        self.counts: dict[Window, int] = {window: 0 for window in self.windows}

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch (batch dimension first) in: its sum over the images (N, C, H, W -> C, H, W) for the
        convolutions' windows, over the rows (N, ..., F -> F) for a Linear's, then each window's sums."""
        if x.shape[0] == 0:
            return
        x = x.detach()
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        summed: dict[bool, torch.Tensor] = {}
        for window in self.windows:
            linear = window.kernel is None
            if linear not in summed:  # a batch summed in its dtype (float32: ~1e-6), 10x faster than in float64
                summed[linear] = (x.reshape(-1, x.shape[-1]) if linear else x).sum(0).double()
            sums, per_sample = window_sums(summed[linear], window)
            self.sums[window] = self.sums[window] + sums if window in self.sums else sums
            self.counts[window] += per_sample * (rows if linear else x.shape[0])

    def means(self) -> dict[Window, np.ndarray]:
        return {window: (self.sums[window] / self.counts[window]).cpu().numpy() for window in self.sums}
