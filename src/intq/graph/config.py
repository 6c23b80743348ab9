"""Quantization configurations: small frozen dataclasses, the two presets of the study, and x86.

A preset is data, not a code path: the study's method and the recommended one run through the same
observers, range methods, conversion and executors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from intq.calibrate.ranges import MSE, Entropy, MinMax, NSigma, Percentile
from intq.arith.qparams import QParams, Scheme

RangeMethod = MinMax | NSigma | Percentile | MSE | Entropy


@dataclass(frozen=True)
class WeightConfig:
    method: RangeMethod
    scheme: Scheme
    per_channel: bool
    bits: int = 8
    layer_bits: tuple[tuple[str, int], ...] = ()  # mixed precision: (layer name, bits) overrides
    layer_grids: tuple[tuple[str, QParams], ...] = ()  # learned grids (qat/finetune.py): (layer name, QParams)
    grid: QParams | None = None  # for_layer's: the layer's learned grid, used instead of `method`'s range

    def for_layer(self, name: str) -> "WeightConfig":
        """This config with the layer's own bit width, when `layer_bits` names it, and its learned grid,
        when `layer_grids` names it."""
        return replace(self, bits=dict(self.layer_bits).get(name, self.bits), layer_bits=(),
                       grid=dict(self.layer_grids).get(name), layer_grids=())


@dataclass(frozen=True)
class ActivationConfig:
    method: RangeMethod
    scheme: Scheme
    bits: int = 8
    unsigned_after_relu: bool = True  # post-ReLU tensors use uint, all 2^b codes on values >= 0
    output_method: RangeMethod | None = None  # the logits' range method (default: `method`)
    output_bits: int | None = None  # the logits' width (default: `bits`); no layer consumes them
    layer_bits: tuple[tuple[str, int], ...] = ()  # (node, bits): that node's output at its own width


ROUNDINGS = ("nearest", "adaround", "brecq")


@dataclass(frozen=True)
class RoundingConfig:
    """How each weight lands on its grid (the scale and zero point stay the range method's).

    "nearest": round(w/s) (eq. 6). "adaround": floor or ceil of w/s chosen per weight by AdaRound, layer
    by layer (docs/math.md eqs. 38-39); "brecq": the same choice made jointly for a block of layers
    with activation quantization in the loop, dropped at random with probability `drop` (QDrop, eq. 40).
    The learned methods read the first `images` calibration images and run `iterations` steps of Adam
    on batches of `batch_size` per layer or block, seeded by `seed` (the same seed, the same integers).
    """

    method: str = "nearest"
    iterations: int = 2000
    seed: int = 0
    images: int = 1024
    batch_size: int = 32
    regularization: float = 1.0  # lambda of eq. 39 (the error relative to nearest rounding's, the regularizer a mean)
    drop: float = 0.5  # QDrop's probability of keeping an activation in float (brecq only)

    def __post_init__(self) -> None:
        if self.method not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.method!r}")
        for name in ("iterations", "images", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rounding {name} must be a whole number of at least 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"rounding seed must be a whole number, got {self.seed!r}")
        if not (isinstance(self.regularization, (int, float)) and 0 <= self.regularization < float("inf")):
            raise ValueError(f"rounding regularization must be a finite number >= 0, got {self.regularization!r}")
        if not (isinstance(self.drop, (int, float)) and 0 <= self.drop < 1):
            raise ValueError(f"rounding drop must be a probability in [0, 1), got {self.drop!r}")

    @property
    def learned(self) -> bool:
        return self.method != "nearest"


@dataclass(frozen=True)
class QConfig:
    name: str
    weights: WeightConfig
    activations: ActivationConfig
    fold_input: bool  # first layer reads 2p - 255 (lossless) instead of a requantized input
    calibration_samples: int | None  # None: every training image
    description: str = ""
    equalization: bool = False  # cross-layer equalization of the float graph before calibration (eq. 36)
    bias_correction: bool = False  # each layer's float bias corrected for its weights' rounding (eq. 37)
    rounding: RoundingConfig = RoundingConfig()  # nearest, or learned (AdaRound, BRECQ/QDrop)

    def __post_init__(self) -> None:
        for switch in ("equalization", "bias_correction"):
            value = getattr(self, switch)
            if not isinstance(value, bool):
                raise ValueError(f"QConfig {switch} must be True or False, got {value!r:.60}")


STUDY = QConfig(
    name="study",
    weights=WeightConfig(NSigma(3.0), Scheme.SPAN, per_channel=False),
    activations=ActivationConfig(NSigma(3.0), Scheme.SPAN, unsigned_after_relu=False),
    fold_input=False,
    calibration_samples=400,
    description="the seed study's method: per-tensor 3-sigma ranges, scale = range/255 used "
    "symmetrically, signed int8 everywhere, 400 calibration images (without its defects)",
)

RECOMMENDED = QConfig(
    name="recommended",
    weights=WeightConfig(MinMax(), Scheme.SYMMETRIC, per_channel=True),
    activations=ActivationConfig(MSE(), Scheme.ASYMMETRIC, unsigned_after_relu=True, output_method=MinMax(),
                                 output_bits=16),
    fold_input=True,
    calibration_samples=None,
    description="per-channel symmetric int8 weights (min/max), uint8 post-ReLU activations with "
    "MSE-optimal ranges, int16 logits (min/max), normalisation folded into the first layer",
)

X86 = replace(
    RECOMMENDED,
    name="x86",
    activations=replace(RECOMMENDED.activations, bits=7),
    description="the recommended preset with 7-bit activations, for PyTorch's x86 kernels (fbgemm) on "
    "CPUs without VNNI: their u8 x s8 pair sums saturate at int16 unless activations stay below 128 "
    "(torch.ao's x86 qconfig does the same, reduce_range)",
)

STUDY_PRESETS = {preset.name: preset for preset in (STUDY, RECOMMENDED)}  # what `intq run` compares
PRESETS = {preset.name: preset for preset in (STUDY, RECOMMENDED, X86)}
