"""The reference executor: exact integer arithmetic, the ground truth every other path is checked against.

Tensors between layers are integer dtypes (int16 input, int8/uint8 activations). Inside a
convolution the multiply-accumulate runs as a float convolution on integer-valued tensors, which
is exact when every partial sum is an integer below 2^24 (float32) or 2^53 (float64) and the
backend sums the products directly: the layer's proven accumulator bound picks the dtype (docs/math.md
eq. 11), and check_exact_sums proves the backend once per process and thread count. The result is then requantized:
with integer multiply, add and shift (eq. 20), or, where eq. 24 proves the same integers, as one
float64 multiply-add and a floor (2.7x faster than eq. 20 without AVX-512).
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F

from intq.graph.capture import max_pool
from intq.arith.fixed_point import float64_requantizer, multiply_by_quantized_multiplier, requantize, requantize_float64, requantize_with_bias
from intq.graph.integer_model import (IntegerModel, QAdd, QAvgPool, QChannelGather, QConcat, QConv2d, QFlatten,
                                      QLayer, QLinear, QLookup, QMaxPool, QMul, QReLU)
from intq.arith.qparams import torch_dtype

CHUNK = 32  # images per pass: every intermediate of a chunk stays in cache, 1.5-2x faster at batch 256
FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53


class ExecutionError(Exception):
    """The input or the model violates an integer-arithmetic invariant (names the layer)."""


def exact_float_dtype(bound: int) -> torch.dtype:
    """float32 if every partial sum |s| <= bound is exact in it (<= 2^24), else float64 (<= 2^53)."""
    if bound <= FLOAT32_EXACT:
        return torch.float32
    if bound <= FLOAT64_EXACT:
        return torch.float64
    raise ExecutionError(f"accumulator bound {bound} exceeds exact float64 integers")


def pixels_to_input(pixels: torch.Tensor, model: IntegerModel) -> torch.Tensor:
    """uint8 pixels (N, C, H, W) -> the first layer's integer input: q = table[c, p] (eq. 27), the
    model input's per-channel table of 256 integers gathered by channel and pixel value."""
    if pixels.dtype != torch.uint8:
        raise ExecutionError(f"input must be uint8 pixels, got {pixels.dtype}")
    spec = model.input
    table = torch.as_tensor(spec.table, device=pixels.device).to(torch_dtype(spec.qparams.dtype))  # (C, 256)
    offsets = torch.arange(spec.channels, device=pixels.device).reshape(1, -1, 1, 1) * 256
    return table.reshape(-1)[pixels.to(torch.int64) + offsets]


def exact_products(layer: QLayer, x: torch.Tensor) -> torch.Tensor:
    """sum_k q_w (q_x - z_x) without the bias, as a float tensor holding exact integers.

    Overflow budget: |acc| <= layer.accumulator_bound < 2^31, proven at conversion from the
    weights and the input type; the bound also picks a float dtype in which every partial sum is
    an exactly representable integer (float64 always on CUDA, where TF32 could round float32).
    """
    dtype = exact_float_dtype(layer.accumulator_bound) if x.device.type == "cpu" else torch.float64
    check_exact_sums(x.device.type, dtype, torch.get_num_threads())
    centred = x.to(dtype).sub_(int(layer.input_qparams.zero_point))  # |q - z| < 2^17: exact
    weight = torch.as_tensor(layer.weight, device=x.device).to(dtype)
    return PRODUCTS[type(layer)](centred, weight, layer)


# The weighted layers' exact products, sum_k q_w (q_x - z_x), per layer class.
PRODUCTS = {
    QConv2d: lambda centred, weight, layer: integer_conv2d(centred, weight, layer.geometry),
    QLinear: lambda centred, weight, layer: F.linear(centred, weight),
}


def integer_conv2d(centred: torch.Tensor, weight: torch.Tensor, geometry: dict) -> torch.Tensor:
    """F.conv2d on integer-valued float tensors, in channels-last (oneDNN's layout: no reorder per call).
    Exact only if the backend sums the products directly (no Winograd or FFT transform, which would
    round): check_exact_sums proves that for this backend before the reference relies on it."""
    g = geometry
    centred = centred.contiguous(memory_format=torch.channels_last)
    return F.conv2d(centred, weight, None, g["stride"], g["padding"], g["dilation"], g["groups"])


# (in channels, kernel, stride, padding, groups) of the convolutions the self-test compares: a 3x3
# stride-1 layer with many channels is where a backend would pick Winograd; 1x1, 5x5, strided, depthwise.
SELF_TEST_CONVOLUTIONS = ((64, 3, 1, 1, 1), (32, 1, 1, 0, 1), (16, 5, 1, 2, 1), (32, 3, 2, 1, 1), (32, 3, 1, 1, 32))


@functools.lru_cache(maxsize=None)
def check_exact_sums(device_type: str, dtype: torch.dtype, threads: int = 1) -> None:
    """Once per process, device, dtype and intra-op thread count (a backend may pick its algorithm by
    it; run_in_chunks runs on one thread per chunk): integer_conv2d against int64 arithmetic on seeded integer
    data with partial sums up to ~2^23 (float32) or ~2^31 (float64); ExecutionError naming the
    backend if any value differs (the exactness of exact_products rests on it, docs/math.md eq. 11)."""
    generator = torch.Generator().manual_seed(0)
    wide = dtype == torch.float64
    for channels, kernel, stride, padding, groups in SELF_TEST_CONVOLUTIONS:
        x = torch.randint(-255, 256, (1, channels, 8, 8), generator=generator)
        x_max = 255 if wide else max(1, (2**23) // (channels // groups * kernel * kernel * 127))
        x = x.clamp(-x_max, x_max)
        weight = torch.randint(-127, 128, (16 if groups == 1 else channels, channels // groups, kernel, kernel), generator=generator)
        geometry = {"stride": [stride] * 2, "padding": [padding] * 2, "dilation": [1, 1], "groups": groups}
        got = integer_conv2d(x.to(device_type, dtype), weight.to(device_type, dtype), geometry).cpu()
        expected = _int64_conv2d(x, weight, geometry)
        if not torch.equal(got.to(torch.int64), expected) or not torch.equal(got, got.round()):
            raise ExecutionError(
                f"PyTorch {torch.__version__}'s {dtype} convolution on {device_type} (oneDNN {torch.backends.mkldnn.is_available()}) "
                f"does not sum integers exactly ({kernel}x{kernel}, {channels} channels, {threads} threads): the reference executor "
                f"cannot be exact with this backend")


def _int64_conv2d(x: torch.Tensor, weight: torch.Tensor, geometry: dict) -> torch.Tensor:
    """The oracle: the same convolution with int64 multiply-adds (unfolded patches, one integer matmul per group)."""
    groups, (stride, _), (padding, _) = geometry["groups"], geometry["stride"], geometry["padding"]
    out_channels, per_group, kh, kw = weight.shape
    patches = F.unfold(x.to(torch.float64), (kh, kw), padding=padding, stride=stride).to(torch.int64)  # (N, C*kh*kw, L)
    patches = patches.reshape(x.shape[0], groups, per_group * kh * kw, -1)  # (N, G, C/G*kh*kw, L)
    kernels = weight.reshape(groups, out_channels // groups, per_group * kh * kw)  # (G, O/G, C/G*kh*kw)
    out = torch.einsum("gok,ngkl->ngol", kernels, patches)  # (N, G, O/G, L)
    size = (x.shape[2] + 2 * padding - kh) // stride + 1
    return out.reshape(x.shape[0], out_channels, size, -1)  # (N, O, H', W')


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    """(C,) int64 on `like`'s device, shaped to broadcast over its channel axis 1."""
    return torch.as_tensor(values, device=like.device).to(torch.int64).reshape((1, -1, 1, 1) if like.dim() == 4 else (1, -1))


def with_bias(layer: QLayer, products: torch.Tensor) -> torch.Tensor:
    """acc = products + q_b as int64 (eq. 10, first half)."""
    acc = products.to(torch.int64)
    return acc if layer.bias is None else acc + _per_channel(layer.bias, acc)


def accumulate(layer: QLayer, x: torch.Tensor) -> torch.Tensor:
    """acc = sum_k q_w (q_x - z_x) + q_b, exact, as int64."""
    return with_bias(layer, exact_products(layer, x))


def _state(op) -> tuple:
    """What an op's cached derivations depend on, as a hashable value: a cache keyed on the op and
    this never serves constants of an op that was modified after they were computed."""
    qparams = [op.output_qparams, *op.declared_input_params()]
    return (op.mantissa.tobytes(), op.shift.tobytes(), None if getattr(op, "bias", None) is None else op.bias.tobytes(),
            op.bounds(), getattr(op, "accumulator_bound", None),
            tuple((float(qp.scale), int(qp.zero_point), qp.dtype) for qp in qparams))


@functools.lru_cache(maxsize=256)
def _float64_constants(layer: QLayer, state: tuple, device: torch.device, channels_axis_of_4d: bool):
    """The layer's float64 (M, c) shaped for its products (fixed_point.float64_requantizer), or None."""
    lower, upper = layer.bounds()
    constants = float64_requantizer(layer.mantissa, layer.shift, layer.bias, int(layer.output_qparams.zero_point),
                                    lower, upper, int(layer.accumulator_bound))
    if constants is None:
        return None
    shape = (1, -1, 1, 1) if channels_axis_of_4d else (1, -1)
    return tuple(torch.as_tensor(a, dtype=torch.float64, device=device).reshape(shape) for a in constants)


def requantize_layer(layer: QLayer, products: torch.Tensor) -> torch.Tensor:
    """q_y = clamp(z_y + round(M[c] (p[c] + q_b[c])), lower, qmax) from the exact products p (integer
    values, any dtype), lower = z_y with a fused ReLU (eq. 10): in float64 where eq. 24 proves it
    the same integers (fixed_point.requantize_float64), else fixed_point.requantize_with_bias."""
    out = layer.output_qparams
    lower, upper = layer.bounds()
    constants = (_float64_constants(layer, _state(layer), products.device, products.dim() == 4)
                 if products.is_floating_point() else None)
    if constants is not None:
        return requantize_float64(products, *constants, lower, upper).to(torch_dtype(out.dtype))
    bias = None if layer.bias is None else _per_channel(layer.bias, products)
    y = requantize_with_bias(products, bias, _per_channel(layer.mantissa, products), _per_channel(layer.shift, products),
                             int(out.zero_point), lower, upper)
    return y.to(torch_dtype(out.dtype))


def _multiplier(op, index: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(int(op.mantissa[index]), dtype=torch.int64, device=device),
            torch.tensor(int(op.shift[index]), dtype=torch.int64, device=device))


def _codes(qparams, device) -> torch.Tensor:
    return torch.arange(qparams.dtype.qmin, qparams.dtype.qmax + 1, dtype=torch.int64, device=device)


def add_exact(op: QAdd, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """q_y = clamp(z_y + round(M_y (round(M_a (q_a - z_a)) + round(M_b (q_b - z_b))))) (eq. 17), as int64.

    M_a = s_a / s_i, M_b = s_b / s_i with s_i = max(s_a, s_b) / 2^20, so each operand keeps 20 more
    bits than its own grid. Budget: the output multiply sets the limit: operands of at most 9 bits
    (model_check.MAX_ADD_OPERAND_BITS; the C runtime assumes the same) give |q - z| <= 2^9,
    |t_a + t_b| < 2^30, and times M0 < 2^31 a product below 2^61 in int64.
    """
    terms = [multiply_by_quantized_multiplier(q.to(torch.int64) - int(qp.zero_point), *_multiplier(op, index, q.device))
             for index, (q, qp) in enumerate(zip((a, b), op.input_qparams))]
    lower, upper = op.bounds()
    return requantize(terms[0] + terms[1], *_multiplier(op, 2, a.device), int(op.output_qparams.zero_point), lower, upper)


@functools.lru_cache(maxsize=256)
def _add_table(op: QAdd, state: tuple, device: torch.device) -> torch.Tensor:
    """add_exact over every pair of codes (q_a, q_b), flattened row-major: at most 2^16 entries."""
    a, b = (_codes(qp, device) for qp in op.input_qparams)
    return add_exact(op, a[:, None], b[None, :]).to(torch_dtype(op.output_qparams.dtype)).reshape(-1)


def add_table(op: QAdd) -> torch.Tensor:
    """The residual add of every pair of <= 8-bit codes, add_exact(q_a, q_b) at index
    (q_a - qmin_a) * codes_b + (q_b - qmin_b): (codes_a * codes_b,) in the output's dtype, on the CPU."""
    return _add_table(op, _state(op), torch.device("cpu"))


def add(op: QAdd, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Residual add (eq. 17, add_exact). With two operands of <= 8 bits the result of every code
    pair is evaluated once by add_exact and looked up, index (q_a - qmin_a) * codes_b + (q_b - qmin_b):
    the same integers in a few cheap passes."""
    types = [qp.dtype for qp in op.input_qparams]
    if max(t.bits for t in types) > 8:
        return add_exact(op, a, b).to(torch_dtype(op.output_qparams.dtype))
    index = a.to(torch.int64).sub_(types[0].qmin).mul_(types[1].qmax - types[1].qmin + 1)
    index.add_(b.to(torch.int64)).sub_(types[1].qmin)
    return torch.take(_add_table(op, _state(op), a.device), index)


def concat(op: QConcat, *xs: torch.Tensor) -> torch.Tensor:
    """cat along channels of q_y = clamp(z_y + round(M_i (q_i - z_i))), each input on the output's grid
    (eq. 30), int64 inside. Budget: |q_i - z_i| < 2^16 (activations of at most 16 bits) times M0 < 2^31
    stays below 2^47 in int64 (below 2^40 for inputs of at most 9 bits)."""
    lower, upper = op.bounds()
    parts = [requantize(x.to(torch.int64) - int(qp.zero_point), *_multiplier(op, index, x.device),
                        int(op.output_qparams.zero_point), lower, upper)
             for index, (x, qp) in enumerate(zip(xs, op.input_qparams))]
    return torch.cat(parts, dim=1).to(torch_dtype(op.output_qparams.dtype))  # (N, C_i, H, W) -> (N, sum C_i, H, W)


def mul(op: QMul, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """q_y = clamp(z_y + round(M (q_a - z_a)(q_b - z_b))), M = s_a s_b / s_y (eq. 34), int64 inside; a
    (N, C, 1, 1) operand broadcasts over (N, C, H, W). Budget: |product| <= product_bound <= 2^31 - 1
    (model_check), times M0 < 2^31 below 2^62."""
    product = (a.to(torch.int64) - int(op.input_qparams[0].zero_point)) * (b.to(torch.int64) - int(op.input_qparams[1].zero_point))
    lower, upper = op.bounds()
    y = requantize(product, *_multiplier(op, 0, a.device), int(op.output_qparams.zero_point), lower, upper)
    return y.to(torch_dtype(op.output_qparams.dtype))


def avg_pool(op: QAvgPool, x: torch.Tensor) -> torch.Tensor:
    """acc = sum over the window of (q_x - z_x) (exact int64), q_y = clamp(z_y + round(M acc)),
    M = s_x / (N s_y) with N the window size (eq. 18)."""
    centred = x.to(torch.int64) - int(op.input_qparams.zero_point)
    if op.kernel_size is None:
        acc = centred.sum(dim=(2, 3), keepdim=True)
    else:
        (kh, kw), (sh, sw) = op.kernel_size, op.stride
        acc = centred.unfold(2, kh, sh).unfold(3, kw, sw).sum(dim=(-2, -1))  # (N, C, H', W', kh, kw) -> (N, C, H', W')
    lower, upper = op.bounds()
    y = requantize(acc, *_multiplier(op, 0, x.device), int(op.output_qparams.zero_point), lower, upper)
    return y.to(torch_dtype(op.output_qparams.dtype))


def lookup(op: QLookup, x: torch.Tensor) -> torch.Tensor:
    """q_y = table[q_x - qmin_x] (eq. 29): one gather of the op's derived table (2^b_x entries)."""
    table = torch.as_tensor(op.table, device=x.device).to(torch_dtype(op.output_qparams.dtype))
    return torch.take(table, x.to(torch.int64) - op.input_qparams.dtype.qmin)


def _weighted(layer: QLayer, x: torch.Tensor) -> torch.Tensor:
    return requantize_layer(layer, exact_products(layer, x))


def _flatten(op: QFlatten, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)  # (N, C, H, W) -> (N, C*H*W)


def channel_gather(op: QChannelGather, x: torch.Tensor) -> torch.Tensor:
    """y[:, k] = x[:, indices[k]] (eq. 33): (N, C, H, W) -> (N, K, H, W), the integers unchanged."""
    return x.index_select(1, torch.tensor(op.indices, dtype=torch.long, device=x.device))


# The reference's lowering: one function per op class, op(op, *integer inputs) -> integers.
LOWERING = {
    QConv2d: _weighted,
    QLinear: _weighted,
    QAdd: add,
    QConcat: concat,
    QMul: mul,
    QAvgPool: avg_pool,
    QMaxPool: lambda op, x: max_pool(x, op.kernel_size, op.stride, op.padding, op.ceil_mode),
    QFlatten: _flatten,
    QReLU: lambda op, x: x.clamp(min=op.zero_point),
    QLookup: lookup,
    QChannelGather: channel_gather,
}


def run_op(op, *inputs: torch.Tensor) -> torch.Tensor:
    """One integer op on its integer input(s), through LOWERING."""
    if type(op) not in LOWERING:
        raise ExecutionError(f"unknown integer op {type(op).__name__}")
    return LOWERING[type(op)](op, *inputs)


def run_layer_then_pool(layer: QLayer, pool: QMaxPool, x: torch.Tensor) -> torch.Tensor:
    """pool(requantize(acc)) computed as requantize(pool(acc)): the same integers, 4x less work.

    Requantization is monotone non-decreasing in acc (M >= 0, rounding and clamp monotone), so the
    maximum of requantized values is the requantized maximum. The pool runs on the exact float
    products (padding -inf never wins); the per-channel bias is a constant inside each window.
    """
    products = exact_products(layer, x)
    return requantize_layer(layer, max_pool(products, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode))


# Op pairs the reference runs as one step when nothing else reads the first one's output (the same integers).
FUSED = {(QConv2d, QMaxPool): run_layer_then_pool, (QLinear, QMaxPool): run_layer_then_pool}


def _users(model: IntegerModel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in model.layers:
        for name in op.inputs:
            counts[name] = counts.get(name, 0) + 1
    return counts


def check_pixels(model: IntegerModel, pixels: torch.Tensor) -> None:
    """uint8 pixels (N, C, H, W) of the size the model was calibrated at (its average pools and linear
    layers are fixed to it); ExecutionError naming both shapes otherwise."""
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.dim() != 4:
        got = f"{pixels.dtype} {tuple(pixels.shape)}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ExecutionError(f"input must be uint8 pixels of shape (N, C, H, W), got {got}")
    if tuple(pixels.shape[1:]) != tuple(model.input.shape):
        raise ExecutionError(f"the model takes images of shape {tuple(model.input.shape)} (C, H, W), the size it "
                             f"was calibrated at; got {tuple(pixels.shape[1:])}")


def run_integer(
    model: IntegerModel, pixels: torch.Tensor, visit: Callable[[str, torch.Tensor], None] | None = None
) -> torch.Tensor:
    """uint8 pixels -> integer logits (the output layer's q).

    With `visit(name, q)` every op's output is materialised and shown; without it, a layer whose
    only user is a max-pool is fused with it (run_layer_then_pool), which gives the same integers.
    """
    check_pixels(model, pixels)
    if visit is None and len(pixels) > CHUNK:
        return run_in_chunks(model, pixels.split(CHUNK))
    values = {model.input_name: pixels_to_input(pixels, model)}
    if visit:
        visit(model.input_name, values[model.input_name])
    users, ops, index = _users(model), model.layers, 0
    remaining = dict(users)
    with torch.no_grad():
        while index < len(ops):
            op, following = ops[index], ops[index + 1] if index + 1 < len(ops) else None
            if (visit is None and (type(op), type(following)) in FUSED
                    and following.inputs == (op.name,) and users.get(op.name) == 1 and op.name != model.output_name):
                values[following.name] = FUSED[type(op), type(following)](op, following, values[op.inputs[0]])
                consumed, index = [op.inputs[0]], index + 2
            else:
                values[op.name] = run_op(op, *(values[name] for name in op.inputs))
                if visit:
                    visit(op.name, values[op.name])
                consumed, index = op.inputs, index + 1
            for name in consumed:  # free what no later op reads: large temporaries are the cost
                remaining[name] -= 1
                if remaining[name] == 0 and name != model.output_name:
                    del values[name]
    return values[model.output_name]


def _run_chunk_on_one_thread(model: IntegerModel, chunk: torch.Tensor) -> torch.Tensor:
    """run_integer on one chunk with this (worker) thread's intra-op parallelism set to 1 thread; the
    setting is per thread (OpenMP's nthreads-var), the caller's own stays as it was."""
    torch.set_num_threads(1)
    return run_integer(model, chunk)


def run_in_chunks(model: IntegerModel, chunks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The chunks' integer logits, concatenated in order: with PyTorch's T intra-op threads, T chunks run
    at a time, each on one thread, instead of one chunk at a time on T threads.

    The same integers either way (no chunk reads another's values; tests/test_reference_chunks.py). The
    reference runs ~80 small ops per chunk, each a parallel region whose threads meet at a barrier; on a
    machine whose cores other processes also use, a descheduled thread stalls every barrier, and whole
    batches took 3-40x longer (benchmarks/bench_mbv3.py). One thread per chunk has no barriers: on the
    MobileNetV3-style example at batch 256, 2 threads, load ~3, 0.38-0.48 s against 1.0-1.4 s.
    """
    workers = min(torch.get_num_threads(), len(chunks))
    if workers <= 1 or chunks[0].device.type != "cpu":
        return torch.cat([run_integer(model, chunk) for chunk in chunks])
    with ThreadPoolExecutor(workers, thread_name_prefix="intq-reference") as pool:
        return torch.cat(list(pool.map(functools.partial(_run_chunk_on_one_thread, model), chunks)))
