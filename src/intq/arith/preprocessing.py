"""The float preprocessing a model expects, and how uint8 pixels become the first layer's integers.

A model's float input is x = (p/255 - mean_c) / std_c for the uint8 pixel p of channel c
(torchvision's ToTensor + Normalize), which is the per-channel affine x = a_c p + b_c with
a_c = 1 / (255 std_c) and b_c = -mean_c / std_c (docs/math.md eq. 25). The study's normalisation is
one case (mean 0.5, std 0.5: x = (2p - 255) / 255); ImageNet's is another.

The integer path never sees a float: each channel's 256 pixel values map to the first layer's input
integers through a table computed once from the preprocessing and the input's QParams (eq. 27),
exactly the integers x itself when the preprocessing has an exact integer form (eq. 26).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from intq.arith.fixed_point import quantize_multiplier, requantize
from intq.arith.qparams import IntType, QParams, round_half_away_from_zero

PIXEL_VALUES = 256  # a uint8 pixel's codes
MAX_CHANNELS = 4096  # of an input image
MAX_INPUT_BITS = 16  # the widest integer the first layer reads
GRID_TOLERANCE = 2e-3  # of one pixel step: float32 preprocessing lands within 1e-4 of the grid
FINE_STEPS_PER_PIXEL = 4  # a fine input (eq. 28) resolves a quarter of the finest channel's pixel step


class PreprocessingError(ValueError):
    """Preprocessing that cannot be used, or float data that it cannot have produced (one line)."""


def _floats(values, name: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    shown = repr(values) if len(repr(values)) <= 60 else repr(values)[:57] + "..."
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError, OverflowError):
        raise PreprocessingError(f"{name} must be numbers, got {shown}") from None
    if not numbers or len(numbers) > MAX_CHANNELS or not all(math.isfinite(v) for v in numbers):
        raise PreprocessingError(f"{name} must be 1 to {MAX_CHANNELS} finite numbers, got {shown}")
    return numbers


@dataclass(frozen=True)
class Preprocessing:
    """x = (p/255 - mean[c]) / std[c] per channel (eq. 25); one value applies to every channel.

    Preprocessing((0.5,), (0.5,)) is the study's [-1, 1]; Preprocessing((0.0,), (1.0,)) is ToTensor's
    [0, 1]; Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) is ImageNet's.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean, std = _floats(self.mean, "mean"), _floats(self.std, "std")
        if not all(0 < s <= 1e6 for s in std) or not all(abs(m) <= 1e6 for m in mean):
            raise PreprocessingError(f"std must be above 0 and mean and std at most 1e6 in size, got mean "
                                     f"{list(mean)}, std {list(std)}")
        if len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise PreprocessingError(f"mean has {len(mean)} values and std {len(std)}: give one per channel, "
                                     "or one for all")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def affine(cls, scale, offset) -> "Preprocessing":
        """x = scale[c] * p + offset[c] as mean/std: std = 1 / (255 scale), mean = -offset * std."""
        scale, offset = _floats(scale, "scale"), _floats(offset, "offset")
        if not all(s > 0 for s in scale):
            raise PreprocessingError(f"an affine preprocessing needs scales above 0, got {list(scale)}")
        count = max(len(scale), len(offset))
        scale, offset = scale * (count // len(scale)), offset * (count // len(offset))
        std = tuple(1.0 / (255.0 * s) for s in scale)
        return cls(tuple(-o * s for o, s in zip(offset, std)), std)

    @property
    def channels(self) -> int | None:
        """How many channels it names; None when one value serves every channel."""
        count = max(len(self.mean), len(self.std))
        return None if count == 1 else count

    def for_channels(self, channels: int) -> "Preprocessing":
        """The same preprocessing with one mean and std per channel; PreprocessingError on a mismatch."""
        if self.channels not in (None, channels):
            raise PreprocessingError(f"the preprocessing names {self.channels} channels ({self.describe()}), "
                                     f"the images have {channels}")
        return Preprocessing(self.mean * (channels // len(self.mean)), self.std * (channels // len(self.std)))

    def describe(self) -> str:
        """'x = (p/255 - mean)/std, mean 0.5, std 0.5' with the numbers as given."""
        def show(values):
            return ", ".join(f"{v:g}" for v in values)
        return f"x = (p/255 - mean)/std, mean {show(self.mean)}, std {show(self.std)}"

    def affine_terms(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of x = a[c] p + b[c] in float64 (eq. 25): a = 1 / (255 std), b = -mean / std."""
        spec = self.for_channels(channels)
        std, mean = np.array(spec.std, np.float64), np.array(spec.mean, np.float64)
        return 1.0 / (255.0 * std), -mean / std

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (N, C, H, W) -> float32 x = (p/255 - mean) / std, in torchvision's order
        (ToTensor's division, then Normalize's subtraction and division in float32), so a model trained
        with torchvision's transforms sees the same bits. Example (study): 51 -> (0.2 - 0.5) / 0.5 = -0.6."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise PreprocessingError(f"preprocessing takes uint8 pixels (N, C, H, W), got {pixels.dtype} "
                                     f"{tuple(pixels.shape)}")
        spec = self.for_channels(pixels.shape[1])
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=pixels.device).reshape(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=pixels.device).reshape(1, -1, 1, 1)
        return (pixels.to(torch.float32) / 255.0).sub_(mean).div_(std)

    def exact_form(self, channels: int) -> tuple[QParams, np.ndarray] | None:
        """(QParams, integers u[c, p]) with x = s u exactly (eq. 26), or None when there is none.

        Rule: every channel shares std (so a), and k_c = -510 mean_c is an integer; then
        x = (2p + k_c) / (510 std). When every k_c is even, u = p + k_c/2 at s = 1/(255 std) instead.
        The type is the narrowest that holds every u (at most 16 bits). Study: u = 2p - 255, s = 1/255,
        int9; ToTensor's [0, 1]: u = p, s = 1/255, uint8.
        """
        spec = self.for_channels(channels)
        if len(set(spec.std)) != 1:
            return None
        k = np.array([-510.0 * m for m in spec.mean])
        if np.any(np.abs(k - np.round(k)) > 1e-6):
            return None
        k = np.round(k).astype(np.int64)
        step, scale = (1, 255.0 * spec.std[0]) if np.all(k % 2 == 0) else (2, 510.0 * spec.std[0])
        offsets = k // 2 if step == 1 else k
        u = np.arange(PIXEL_VALUES, dtype=np.int64)[None, :] * step + offsets[:, None]  # (C, 256)
        dtype = narrowest_type(int(u.min()), int(u.max()))
        if dtype is None:
            return None
        return QParams(np.array(1.0 / scale), np.array(0, np.int64), dtype), u

    def fine_qparams(self, channels: int) -> QParams | None:
        """The fine input of eq. (28): s = min_c a_c / 4, z = 0, the narrowest type that holds every
        round(x / s); None if that needs more than 16 bits. Error at most s/2, an eighth of a pixel step."""
        a, b = self.affine_terms(channels)
        scale = float(a.min()) / FINE_STEPS_PER_PIXEL
        ends = np.concatenate([b, 255.0 * a + b]) / scale  # x at p = 0 and p = 255, in steps
        dtype = narrowest_type(int(np.floor(ends.min() + 0.5)), int(np.floor(ends.max() + 0.5)))
        return None if dtype is None else QParams(np.array(scale), np.array(0, np.int64), dtype)

    def check_batch(self, batch: torch.Tensor, where: str) -> None:
        """Refuse float data that uint8 pixels under this preprocessing cannot have produced.

        Rule: for each channel, p = (x std + mean) 255 must lie in [0, 255] and within GRID_TOLERANCE of
        an integer. Worked numbers (study): x = -0.6 -> p = 51.0, accepted; x = 0.5 -> 191.25, off the
        grid; CIFAR mean/std data reaches x = (1 - 0.4914) / 0.247 = 2.06 -> p = 390, out of range.
        Cost: about 2 ms per 1,000 32x32 images."""
        if batch.dim() != 4 or self.channels not in (None, batch.shape[1]):
            raise PreprocessingError(f"{where} has shape {tuple(batch.shape)}, the declared preprocessing "
                                     f"({self.describe()}) names {self.channels} channels")
        spec = self.for_channels(batch.shape[1])
        lo, hi = (float(v) for v in torch.aminmax(batch))  # NaN anywhere makes both NaN
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise PreprocessingError(f"{where}: holds NaN or Inf")
        shape = (1, -1, 1, 1)
        scale = torch.tensor([255.0 * s for s in spec.std], dtype=torch.float32).reshape(shape)
        offset = torch.tensor([255.0 * m for m in spec.mean], dtype=torch.float32).reshape(shape)
        pixels = batch.detach().to(torch.float32).mul(scale).add_(offset)
        low, high = (float(v) for v in torch.aminmax(pixels))
        if low < -GRID_TOLERANCE or high > 255 + GRID_TOLERANCE:
            raise PreprocessingError(f"{where}: values in [{lo:.4g}, {hi:.4g}] are pixels in [{low:.1f}, {high:.1f}] "
                                     f"under the declared preprocessing ({self.describe()}), outside 0..255")
        distance = (pixels - pixels.round()).abs_()  # to the nearest whole pixel
        index = int(distance.reshape(-1).argmax())  # (N, C, H, W) -> (N*C*H*W,)
        if float(distance.reshape(-1)[index]) > GRID_TOLERANCE:
            raise PreprocessingError(f"{where}: value {float(batch.reshape(-1)[index]):.6g} is pixel "
                                     f"{float(pixels.reshape(-1)[index]):.4f} under the declared preprocessing "
                                     f"({self.describe()}), not a whole pixel")


STUDY_PREPROCESSING = Preprocessing((0.5,), (0.5,))  # the default: the study's (p/255 - 0.5)/0.5


def narrowest_type(lowest: int, highest: int) -> IntType | None:
    """The narrowest IntType (2..16 bits) holding [lowest, highest]: unsigned when lowest >= 0.
    Examples: [-255, 255] -> int9; [0, 255] -> uint8; [-1, 1] -> int2; a 17-bit range -> None."""
    for bits in range(2, MAX_INPUT_BITS + 1):
        dtype = IntType(bits, lowest < 0)
        if dtype.qmin <= lowest and highest <= dtype.qmax:
            return dtype
    return None


def input_table(preprocessing: Preprocessing, qparams: QParams, channels: int) -> np.ndarray:
    """int64 (C, 256): the first layer's input integer for every pixel value of every channel (eq. 27).

    With an exact form u (eq. 26): u itself when `qparams` are the form's, else clamp(z + round(M u))
    with the fixed-point multiplier M = s_u / s of eqs. (9)-(10). Without one: clamp(z + round(x / s)) of
    x = a_c p + b_c in float64, rounding half away from zero. Every executor gathers from this table."""
    qmin, qmax, zero = qparams.dtype.qmin, qparams.dtype.qmax, int(qparams.zero_point)
    exact = preprocessing.exact_form(channels)
    if exact is not None:
        form, u = exact
        if same_input_qparams(form, qparams):
            return u
        mantissa, shift = quantize_multiplier(float(form.scale) / float(qparams.scale))
        table = requantize(torch.from_numpy(u), torch.tensor(mantissa), torch.tensor(shift), zero, qmin, qmax)
        return table.numpy()
    a, b = preprocessing.affine_terms(channels)
    x = torch.from_numpy(a[:, None] * np.arange(PIXEL_VALUES, dtype=np.float64)[None, :] + b[:, None])
    q = round_half_away_from_zero(x / float(qparams.scale)).to(torch.int64) + zero
    return q.clamp(qmin, qmax).numpy()


def same_input_qparams(a: QParams, b: QParams) -> bool:
    """Per-tensor QParams with the same type, zero point and scale."""
    return (a.dtype == b.dtype and a.axis is None and b.axis is None and int(a.zero_point) == int(b.zero_point)
            and float(a.scale) == float(b.scale))
