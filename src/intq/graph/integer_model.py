"""The IntegerModel: everything integer-only inference needs, as plain arrays and numbers.

The ops, and the quantities each op's arithmetic derives from its parameters (the fused clamp, the
real multipliers, the worst-case accumulator): one definition each, used by the converter that
builds a model and by the checks that admit a model read from a file (model_check.py). The file
format is model_file.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from intq.arith.lookup import lookup_table
from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing, input_table, same_input_qparams
from intq.arith.qparams import QParams

INT32_LIMIT = 2**31 - 1


@dataclass(eq=False)
class InputSpec:
    """How uint8 pixels p become the integers the first layer reads.

    `shape` is one image's (channels, height, width), the size the model was calibrated at;
    `preprocessing` the float input the float model expects (eq. 25), one mean and std per channel;
    `qparams` the first layer's input integers. The integers are `table[c, p]` (eq. 27), derived from
    the two, never stored. `folded`: the integers are the preprocessed values exactly (eq. 26: the
    study's x = 2p - 255 at scale 1/255); otherwise they are x requantized to `qparams`.
    """

    qparams: QParams
    shape: tuple[int, int, int] = (3, 32, 32)
    preprocessing: Preprocessing = STUDY_PREPROCESSING

    def __post_init__(self) -> None:
        self.preprocessing = self.preprocessing.for_channels(self.shape[0])
        self._table: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def table(self) -> np.ndarray:
        """int64 (C, 256): the first layer's input integer of every pixel value, per channel (eq. 27)."""
        if self._table is None:
            self._table = input_table(self.preprocessing, self.qparams, self.channels)
        return self._table

    @property
    def folded(self) -> bool:
        """True when the first layer reads the preprocessed values exactly (eq. 26)."""
        exact = self.preprocessing.exact_form(self.channels)
        return exact is not None and same_input_qparams(exact[0], self.qparams)


class Requantizing:
    """An op that requantizes to its own `output_qparams`, clamped by `relu` and `relu_max` (eq. 10)."""

    def bounds(self) -> tuple[int, int]:
        return output_bounds(self.output_qparams, self.relu, self.relu_max)

    ARITY: ClassVar[int | None] = 1  # how many inputs the op reads (None: two or more)

    def output_params(self, input_params: list[QParams]) -> QParams:
        """The QParams of this op's output integers."""
        return self.output_qparams

    def declared_input_params(self) -> list[QParams]:
        """The QParams the op was built for, one per input (they must be its inputs' own)."""
        return [self.input_qparams]


class Transparent:
    """An op that moves or clamps integers without requantizing: its output keeps its input's QParams."""

    ARITY: ClassVar[int] = 1

    def output_params(self, input_params: list[QParams]) -> QParams:
        return input_params[0]

    def declared_input_params(self) -> list[QParams]:
        return []


@dataclass(eq=False)
class QLayer(Requantizing):
    """A weighted layer: acc = sum q_w (q_x - z_x) + q_b; q_y = clamp(z_y + round(M acc)) (eq. 10).
    Its kinds are the subclasses QConv2d and QLinear."""

    name: str
    inputs: tuple[str, ...]
    weight: np.ndarray
    weight_qparams: QParams
    bias: np.ndarray | None
    input_qparams: QParams
    output_qparams: QParams
    mantissa: np.ndarray
    shift: np.ndarray
    relu: bool
    geometry: dict = field(default_factory=dict)  # QConv2d: stride, padding, dilation, groups
    accumulator_bound: int = 0  # worst-case |acc| (eq. 11): always accumulator_bound(weight, bias, input_qparams)
    relu_max: float | None = None  # ReLU6-style upper clamp in real units
    LABEL: ClassVar[str] = "layer"  # how reports and explanations name the kind


@dataclass(eq=False)
class QConv2d(QLayer):
    """A 2-D convolution: weight (C_out, C_in / groups, kh, kw), geometry stride, padding, dilation, groups."""

    LABEL: ClassVar[str] = "conv2d"


@dataclass(eq=False)
class QLinear(QLayer):
    """A fully connected layer: weight (C_out, C_in) on a flattened input."""

    LABEL: ClassVar[str] = "linear"


def output_bounds(qparams: QParams, relu: bool, relu_max: float | None = None) -> tuple[int, int]:
    """Integer clamp of a requantized output (eq. 10): [qmin, qmax]; a fused ReLU raises the lower
    bound to z (real 0); a ReLU6-style clamp lowers the upper bound to z + round(max / s)."""
    zero, lower, upper = int(qparams.zero_point), qparams.dtype.qmin, qparams.dtype.qmax
    if relu:
        lower = max(zero, lower)
    if relu_max is not None:
        upper = min(upper, zero + int(np.floor(relu_max / float(qparams.scale) + 0.5)))
    return lower, upper


@dataclass(eq=False)
class QJoin(Requantizing):
    """An op that joins several tensors, each read with its own `input_qparams` (they must be its
    producers'), requantized to its own `output_qparams` with the multipliers in `mantissa`/`shift`.
    Its kinds are the subclasses QAdd, QConcat and QMul."""

    name: str
    inputs: tuple[str, ...]
    input_qparams: tuple[QParams, ...]
    output_qparams: QParams
    mantissa: np.ndarray
    shift: np.ndarray
    relu: bool = False
    relu_max: float | None = None

    def declared_input_params(self) -> list[QParams]:
        return list(self.input_qparams)


@dataclass(eq=False)
class QAdd(QJoin):
    """y = a + b: each operand rescaled to a common fine scale s_i = max(s_a, s_b) / 2^20 with its
    own fixed-point multiplier, summed exactly, then requantized to (s_y, z_y) (eq. 17); mantissa
    and shift (3,): operand a, operand b, output."""

    ARITY: ClassVar[int] = 2


@dataclass(eq=False)
class QConcat(QJoin):
    """y = cat(x_1, ..., x_k) along channels, k >= 2: each input requantized to the output's own
    (s_y, z_y) with its multiplier M_i = s_i / s_y, q_y = clamp(z_y + round(M_i (q_i - z_i))) (eq. 30);
    an input that already has the output's QParams has M_i = 1 and passes unchanged. mantissa and
    shift (k,): one per input."""

    ARITY: ClassVar[int | None] = None  # any number >= 2, one input_qparams and one multiplier each


@dataclass(eq=False)
class QMul(QJoin):
    """y = a * b elementwise (a squeeze-excite gate), of equal shapes or one operand (C, 1, 1) against
    (C, H, W) in either order: q_y = clamp(z_y + round(M (q_a - z_a)(q_b - z_b))), M = s_a s_b / s_y
    (eq. 34); the product is exact in int64, at most product_bound(...) <= 2^31 - 1 in magnitude.
    mantissa and shift (1,): M."""

    ARITY: ClassVar[int] = 2


@dataclass(eq=False)
class QAvgPool(Requantizing):
    """Average pool: acc = sum over the window of (q - z_x), q_y = z_y + round(acc s_x / (N s_y)) (eq. 18);
    kernel_size None pools the whole feature map."""

    name: str
    inputs: tuple[str, ...]
    kernel_size: tuple[int, int] | None
    stride: tuple[int, int] | None
    input_qparams: QParams
    output_qparams: QParams
    mantissa: np.ndarray  # (1,)
    shift: np.ndarray
    relu: bool = False
    relu_max: float | None = None


@dataclass(eq=False)
class QMaxPool(Transparent):
    """Max pool over the integers: monotone, so it commutes with the quantizer. `ceil_mode`: PyTorch's
    ceil_mode=True output size (eq. 31), the last windows taking the maximum over their part inside."""

    name: str
    inputs: tuple[str, ...]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool = False


@dataclass(eq=False)
class QFlatten(Transparent):
    """(C, H, W) -> (C*H*W,): the integers unchanged."""

    name: str
    inputs: tuple[str, ...]


@dataclass(eq=False)
class QChannelGather(Transparent):
    """(C, H, W) -> (K, H, W): output channel k is input channel indices[k], the integers unchanged (eq. 33);
    a channel shuffle, a channel slice (chunk, split, x[:, a:b]) or both."""

    name: str
    inputs: tuple[str, ...]
    indices: tuple[int, ...]


@dataclass(eq=False)
class QReLU(Transparent):
    """A ReLU that could not be fused: clamp(q, z, qmax) on its input's own qparams."""

    name: str
    inputs: tuple[str, ...]
    zero_point: int


@dataclass(eq=False)
class QLookup(Requantizing):
    """An activation as a table of every input code (inputs of at most 8 bits): q_y = table[q_x - qmin_x],
    table = clamp(z_y + round(f(s_x (q - z_x)) / s_y)) (eq. 29). `kind` names f (arith/lookup.py
    ACTIVATIONS), `params` its parameters; the table is derived from them and the two QParams, never stored."""

    name: str
    inputs: tuple[str, ...]
    kind: str
    params: dict
    input_qparams: QParams
    output_qparams: QParams
    relu: ClassVar[bool] = False  # the table holds the clamp (eq. 10's is the output type's)
    relu_max: ClassVar[float | None] = None

    @property
    def table(self) -> np.ndarray:
        """int64 (2^b_x,): the output code of every input code, qmin_x first (eq. 29)."""
        return lookup_table(self.kind, self.params, self.input_qparams, self.output_qparams)


OP_TYPES = (QConv2d, QLinear, QAdd, QConcat, QMul, QAvgPool, QMaxPool, QFlatten, QReLU, QLookup, QChannelGather)  # every op an IntegerModel may hold
IntegerOp = QConv2d | QLinear | QAdd | QConcat | QMul | QAvgPool | QMaxPool | QFlatten | QReLU | QLookup | QChannelGather


@dataclass(eq=False)
class IntegerModel:
    input_name: str
    input: InputSpec
    layers: list[IntegerOp]
    output_name: str
    metadata: dict = field(default_factory=dict)

    def layer(self, name: str) -> IntegerOp:
        return next(op for op in self.layers if op.name == name)

    def quantized_layers(self) -> list[QLayer]:
        return [op for op in self.layers if isinstance(op, QLayer)]

    def requantizing_ops(self) -> list[Requantizing]:
        """The ops with their own output QParams: layers, adds, average pools, lookups."""
        return [op for op in self.layers if isinstance(op, Requantizing)]

    def value_qparams(self) -> dict[str, QParams]:
        """The QParams of every value: the model input and each op's output."""
        qparams = {self.input_name: self.input.qparams}
        for op in self.layers:
            qparams[op.name] = op.output_params([qparams[name] for name in op.inputs])
        return qparams

    def output_qparams(self) -> QParams:
        """QParams of the model output (the output op's, or its input's for an op that keeps them)."""
        return self.value_qparams()[self.output_name]


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    """Windows along one axis (eq. 31): floor((n + 2p - k) / s) + 1; with ceil_mode, ceil instead of floor,
    less one when the last window would start past the input and its left padding ((out - 1) s >= n + p)."""
    span = size + 2 * padding - kernel
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def accumulator_bound(weight_q: np.ndarray, bias_q: np.ndarray | None, input_qp: QParams) -> int:
    """Worst |acc| = max_c (sum_k |q_w[c,k]| * max|q_x - z_x| + |q_b[c]|) (eq. 11), over every input
    integer q_x of the input's type: derived from the weights, never taken on trust."""
    per_channel = np.abs(weight_q.astype(np.int64)).reshape(weight_q.shape[0], -1).sum(axis=1) * centred_bound(input_qp)  # (C, K) -> (C,)
    if bias_q is not None:
        per_channel = per_channel + np.abs(bias_q.astype(np.int64))
    return int(per_channel.max())


def layer_multipliers(input_qp: QParams, weight_qp: QParams, output_qp: QParams, channels: int) -> np.ndarray:
    """M[c] = s_x s_w[c] / s_y, one real multiplier per output channel of a conv or linear (eq. 8)."""
    return float(input_qp.scale) * np.broadcast_to(weight_qp.scale, (channels,)) / float(output_qp.scale)


def add_multipliers(inputs_qp: tuple[QParams, ...] | list[QParams], output_qp: QParams) -> np.ndarray:
    """(M_a, M_b, M_y) of a residual add (eq. 17): each operand to the common scale
    s_i = max(s_a, s_b) / 2^20 (20 more bits than its grid), then s_i / s_y to the output."""
    scales = [float(qp.scale) for qp in inputs_qp]
    common = max(scales) / 2**20
    return np.array([*(s / common for s in scales), common / float(output_qp.scale)])


def concat_multipliers(inputs_qp: tuple[QParams, ...] | list[QParams], output_qp: QParams) -> np.ndarray:
    """(M_1, ..., M_k) of a concatenation: M_i = s_i / s_y, each input to the output's grid (eq. 30);
    exactly 1 (mantissa 2^30, shift -1) for an input whose scale is the output's."""
    return np.array([float(qp.scale) / float(output_qp.scale) for qp in inputs_qp])


def mul_multiplier(inputs_qp: tuple[QParams, ...] | list[QParams], output_qp: QParams) -> np.ndarray:
    """(M,) of an elementwise product: M = s_a s_b / s_y (eq. 34)."""
    return np.array([float(inputs_qp[0].scale) * float(inputs_qp[1].scale) / float(output_qp.scale)])


def centred_bound(qp: QParams) -> int:
    """max |q - z| over every integer q of the type: max(z - qmin, qmax - z)."""
    zero = int(qp.zero_point)
    return max(zero - qp.dtype.qmin, qp.dtype.qmax - zero)


def product_bound(inputs_qp: tuple[QParams, ...] | list[QParams]) -> int:
    """Worst |(q_a - z_a)(q_b - z_b)| of an elementwise product over every integer of both types (eq. 34):
    derived from the types and zero points; at most 2^31 - 1 keeps |p M0| < 2^62 in int64."""
    return centred_bound(inputs_qp[0]) * centred_bound(inputs_qp[1])


def avg_pool_multiplier(input_qp: QParams, output_qp: QParams, window: int) -> np.ndarray:
    """(M,) of an average pool over `window` values: M = s_x / (N s_y) (eq. 18)."""
    return np.array([float(input_qp.scale) / (window * float(output_qp.scale))])
