"""The `torch_quantized` executor: an IntegerModel's own integers on PyTorch's quantized kernels
(engine onednn by default, or x86/fbgemm): the fast path.

The int8 weights, int32 biases (as the reals q_b s_x s_w that PyTorch quantizes back to the same
int32), scales and zero points are loaded into torch.ao quantized modules; activations travel as
quint8 (encoding.py). The kernels accumulate exactly in int32 but requantize with a float
multiplier and round half to even, where intq uses a 31-bit fixed-point multiplier and rounds half
away from zero (eq. 9), so an output can differ from the reference by 1 LSB near a rounding tie;
`intq verify` counts how often. On CPUs without VNNI (AVX2) the kernels also saturate pair sums of
products at int16 unless activations have at most 7 bits (`may_saturate`; the x86 preset). Ops the
kernels cannot express with intq's types (encoding.py: a folded first layer, int16 logits, average
pools with their own output scale, lookup-table activations) run as the reference executor's exact
integer ops, converted to and from quint8 without loss.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from intq.executors.encoding import (EngineError, encoded_zero_point, engine_runs_layer, from_codes, narrower_bounds, to_uint8,
                                    uint8_offset)
from intq.executors.reference import CHUNK, pixels_to_input, run_op
from intq.graph.integer_model import (IntegerModel, QAdd, QAvgPool, QChannelGather, QConcat, QConv2d, QFlatten,
                                      QLayer, QLinear, QLookup, QMaxPool, QMul, QReLU)
from intq.arith.qparams import QParams, torch_dtype


def to_quantized(value: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """An intq integer tensor (q, z) as the quint8 tensor (q + o, z + o); quantized tensors pass."""
    if value.is_quantized:
        return value
    encoded = to_uint8(value, qparams)
    if encoded.dim() == 4:  # the layout the kernels compute in; a mix of layouts costs a conversion per op
        encoded = encoded.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch announces the deprecation of quantized tensors
        return torch._make_per_tensor_quantized_tensor(encoded, float(qparams.scale), encoded_zero_point(qparams))


def to_integers(value: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """A quint8 tensor back to intq's integers q = q_u8 - o in intq's dtype; integer tensors pass."""
    if not value.is_quantized:
        return value
    return from_codes(value.int_repr(), uint8_offset(qparams), torch_dtype(qparams.dtype))


def _clamped(run: Callable, bounds: tuple[int, int] | None, qparams: QParams) -> Callable:
    """`run` followed by the encoded clamp [lo, hi] (a ReLU6 bound, or a type narrower than 8 bits)."""
    if bounds is None:
        return run
    scale, zero = float(qparams.scale), encoded_zero_point(qparams)
    low, high = (bounds[0] - zero) * scale, (bounds[1] - zero) * scale  # reals that quantize back exactly
    return lambda *xs: torch.clamp(run(*xs), low, high)


INT16_MAX = 32767


def may_saturate(layer: QLayer) -> bool:
    """True when fbgemm's AVX2 kernels can saturate on this layer: without VNNI they add pairs of
    u8 x s8 products in int16 (vpmaddubsw) with saturation, exact only while
    2 * max(u8 input) * max|q_w| <= 32767, e.g. 7-bit activations with 8-bit weights (the x86 preset)."""
    largest_input = (1 << layer.input_qparams.dtype.bits) - 1  # encoded: [0, 2^b - 1] (encoding.py)
    return 2 * largest_input * int(np.abs(np.asarray(layer.weight, np.int64)).max()) > INT16_MAX


def quantized_layer(layer: QLayer) -> torch.nn.Module:
    """torch.ao quantized Conv2d/Linear (ReLU-fused when the layer is) holding the layer's integers."""
    import torch.ao.nn.intrinsic.quantized as fused
    import torch.ao.nn.quantized as quantized

    weight = torch.from_numpy(np.asarray(layer.weight, np.int8))
    channels = weight.shape[0]
    scales = torch.from_numpy(np.broadcast_to(np.asarray(layer.weight_qparams.scale, np.float64), (channels,)).copy())
    qweight = torch._make_per_channel_quantized_tensor(weight, scales, torch.zeros(channels, dtype=torch.int64), 0)
    bias = None
    if layer.bias is not None:  # q_b in units of s_x s_w[c] (eq. 15), as reals
        bias = torch.from_numpy(layer.bias.astype(np.float64) * float(layer.input_qparams.scale) * scales.numpy()).float()
    module = MODULES[type(layer)](layer, fused, quantized)
    module.set_weight_bias(qweight, bias)
    module.scale, module.zero_point = float(layer.output_qparams.scale), encoded_zero_point(layer.output_qparams)
    return module


def _conv_module(layer: QConv2d, fused, quantized) -> torch.nn.Module:
    g, shape = layer.geometry, layer.weight.shape
    module_class = fused.ConvReLU2d if layer.relu else quantized.Conv2d
    stride = (1, 1) if subsampled_pointwise(layer) else g["stride"]
    return module_class(shape[1] * g["groups"], shape[0], tuple(shape[2:]), stride, g["padding"], g["dilation"],
                        g["groups"], bias=True)


# The empty torch.ao module of each weighted layer class (module(layer, intrinsic, quantized)).
MODULES = {
    QConv2d: _conv_module,
    QLinear: lambda layer, fused, quantized: (fused.LinearReLU if layer.relu else quantized.Linear)(*layer.weight.shape[::-1]),
}


def subsampled_pointwise(layer: QLayer) -> bool:
    """A 1x1 convolution with stride s > 1 and no padding, run as a stride-1 convolution of every
    s-th pixel (the same sums): onednn's strided 1x1 kernel gave wrong, batch-size-dependent
    outputs in PyTorch 2.13 on an AVX2 CPU (up to 30 LSB on 0.1% of values, measured)."""
    g = layer.geometry
    return (bool(g) and tuple(layer.weight.shape[2:]) == (1, 1) and tuple(g["stride"]) != (1, 1)
            and tuple(g["padding"]) == (0, 0))


def _integer_step(op, model: IntegerModel, in_qparams: list[QParams]) -> Callable:
    """The reference executor's exact op, on integers converted from quint8, CHUNK images at a time."""
    def run(*xs: torch.Tensor) -> torch.Tensor:
        integers = [to_integers(x, qp) for x, qp in zip(xs, in_qparams)]
        chunks = zip(*(x.split(CHUNK) for x in integers))
        return torch.cat([run_op(op, *chunk) for chunk in chunks])
    run.exact = True
    return run


def step_path(op, step: Callable, engine: str) -> str:
    """How `intq verify` says an op ran on this executor: the exact integer step (no quantized kernel
    expresses it, or its values are wider than 8 bits) or PyTorch's quantized kernel on `engine`."""
    if getattr(step, "exact", False):
        return "exact integers (no PyTorch kernel)"
    return f"PyTorch quantized kernel ({engine})"


def _layer_step(op: QLayer, model: IntegerModel, in_qparams: list[QParams]) -> Callable:
    if not engine_runs_layer(op, model):
        return _integer_step(op, model, in_qparams)
    module, qp = quantized_layer(op), in_qparams[0]
    if subsampled_pointwise(op):
        (sh, sw) = op.geometry["stride"]
        run = lambda x: module(to_quantized(x, qp)[:, :, ::sh, ::sw].contiguous(memory_format=torch.channels_last))  # noqa: E731
    else:
        run = lambda x: module(to_quantized(x, qp))  # noqa: E731
    return _clamped(run, narrower_bounds(*op.bounds(), op.output_qparams, op.relu), op.output_qparams)


def _add_step(op: QAdd, model: IntegerModel, in_qparams: list[QParams]) -> Callable:
    out = op.output_qparams
    kernel = torch.ops.quantized.add_relu if op.relu else torch.ops.quantized.add
    scale, zero = float(out.scale), encoded_zero_point(out)
    run = lambda a, b: kernel(to_quantized(a, in_qparams[0]), to_quantized(b, in_qparams[1]), scale, zero)  # noqa: E731
    return _clamped(run, narrower_bounds(*op.bounds(), out, op.relu), out)


def _concat_step(op: QConcat, model: IntegerModel, in_qparams: list[QParams]) -> Callable:
    """torch.ops.quantized.cat onto the output's QParams (inputs of at most 8 bits, an 8-bit output),
    else the exact step (eq. 30)."""
    out = op.output_qparams
    if max(qp.dtype.bits for qp in (*in_qparams, out)) > 8:
        return _integer_step(op, model, in_qparams)
    scale, zero = float(out.scale), encoded_zero_point(out)
    run = lambda *xs: torch.ops.quantized.cat([to_quantized(x, qp) for x, qp in zip(xs, in_qparams)],  # noqa: E731
                                              1, scale, zero)
    return _clamped(run, narrower_bounds(*op.bounds(), out, False), out)


def _mul_step(op: QMul, model: IntegerModel, in_qparams: list[QParams]) -> Callable:
    """torch.ops.quantized.mul (mul_relu under a fused ReLU), which broadcasts a (N, C, 1, 1) gate, onto
    the output's QParams (operands of at most 8 bits, an 8-bit output), else the exact step (eq. 34)."""
    out = op.output_qparams
    if max(qp.dtype.bits for qp in (*in_qparams, out)) > 8:
        return _integer_step(op, model, in_qparams)
    kernel = torch.ops.quantized.mul_relu if op.relu else torch.ops.quantized.mul
    scale, zero = float(out.scale), encoded_zero_point(out)
    run = lambda a, b: kernel(to_quantized(a, in_qparams[0]), to_quantized(b, in_qparams[1]), scale, zero)  # noqa: E731
    return _clamped(run, narrower_bounds(*op.bounds(), out, op.relu), out)


# The PyTorch-kernel lowering: per op class, (op, model, input qparams) -> a step on quantized tensors
# (or on integers: the exact op where the kernels cannot express it; average pools are exact and
# cheap on the small pooled maps; a lookup table is one gather, which no quantized kernel does).
LOWERING = {
    QConv2d: _layer_step,
    QLinear: _layer_step,
    QAdd: _add_step,
    QConcat: _concat_step,
    QMul: _mul_step,
    QAvgPool: _integer_step,
    QMaxPool: lambda op, model, qps: lambda x: (F.max_pool2d(x, op.kernel_size, op.stride, op.padding, ceil_mode=op.ceil_mode)
                                                if x.is_quantized else run_op(op, x)),
    QFlatten: lambda op, model, qps: lambda x: torch.flatten(x, 1),
    QReLU: lambda op, model, qps: lambda x: torch.relu(x) if x.is_quantized else run_op(op, x),
    QLookup: _integer_step,
    QChannelGather: lambda op, model, qps: lambda x: (  # index_select keeps a quantized tensor's QParams (eq. 33)
        x.index_select(1, torch.tensor(op.indices, dtype=torch.long)) if x.is_quantized else run_op(op, x)),
}


def _engine_step(op, model: IntegerModel, in_qparams: list[QParams]) -> Callable:
    """One op as a PyTorch kernel call (LOWERING)."""
    return LOWERING[type(op)](op, model, in_qparams)


ENGINES = ("onednn", "x86", "fbgemm")


class TorchQuantizedModel:
    """Callable: uint8 pixels (N, 3, H, W) -> the model's output integers, like run_integer.

    `engine` is PyTorch's quantized backend: onednn (default: on a 2-core AVX2 machine it ran
    ResNet-20 1.6x faster than x86, which picked fbgemm's kernels), x86 or fbgemm. Weights are
    packed for the engine when the model is built, and the engine is selected again on every call.
    """

    def __init__(self, model: IntegerModel, engine: str = "onednn") -> None:
        if engine not in torch.backends.quantized.supported_engines:
            raise EngineError(f"torch_quantized: engine {engine!r} is not in this PyTorch build "
                              f"(supported: {', '.join(torch.backends.quantized.supported_engines)})")
        self.engine = torch.backends.quantized.engine = engine
        self.model, self.qparams = model, model.value_qparams()
        self.saturating_layers = [op.name for op in model.quantized_layers() if engine_runs_layer(op, model) and may_saturate(op)]
        self.steps = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch announces the deprecation of quantized tensors
            for op in model.layers:
                try:
                    self.steps.append((op, _engine_step(op, model, [self.qparams[name] for name in op.inputs])))
                except (RuntimeError, EngineError) as err:
                    raise EngineError(f"torch_quantized: layer {op.name}: {err}") from None

    def saturation_note(self) -> str | None:
        """One line naming the layers that may saturate (the first three), or None."""
        names = self.saturating_layers
        if not names:
            return None
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (f"{len(names)} layers ({listed}) may saturate int16 pair sums on CPUs without VNNI: "
                "quantize with --preset x86 (7-bit activations) for this engine")

    def op_steps(self) -> list[tuple]:
        """[(op, step)] with step(*operand integers) -> the op's output integers, on this engine;
        each step's `path` says how the op ran (step_path)."""
        def integers_of(op, step, *operands: torch.Tensor) -> torch.Tensor:
            torch.backends.quantized.engine = self.engine
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return to_integers(step(*operands), self.qparams[op.name])
        steps = []
        for op, step in self.steps:
            checked = functools.partial(integers_of, op, step)
            checked.path = step_path(op, step, self.engine)
            steps.append((op, checked))
        return steps

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = self.engine
        values = {self.model.input_name: pixels_to_input(pixels, self.model)}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for op, step in self.steps:
                values[op.name] = step(*(values[name] for name in op.inputs))
        name = self.model.output_name
        return to_integers(values[name], self.qparams[name])
