"""Export an IntegerModel as portable C99: model.h (integer arrays and an op table), the intq runtime
(integer arithmetic only), golden vectors (input pixels and every op's output for a few images, from
the reference executor) and main.c, which runs the golden images and checks every value.

Generated code carries numbers and generated identifiers only (op<i>_weight, ...); an op's name from
the model file appears solely in comments, reduced to [A-Za-z0-9_] (c_comment_label), so no model
file can place its own text, let alone code, in the export.

    cc -std=c99 -O2 main.c intq_runtime.c -o check && ./check     # prints OK, exits 0 when bit-exact
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from intq.executors.reference import run_integer
from intq.files import atomic_write_text, ensure_writable_dir, staged_output
from intq.graph.integer_model import (IntegerModel, QAdd, QAvgPool, QChannelGather, QConcat, QConv2d, QFlatten,
                                      QLayer, QLinear, QLookup, QMaxPool, QMul, QReLU)
from intq.graph.model_check import ModelCheckError, check_model

ARRAY_TYPES = {"weight": "int8_t", "bias": "int32_t", "mantissa": "int32_t", "shift": "int32_t",
               "table": "int32_t", "sources": "int32_t", "source_zeros": "int32_t",
               "source_channels": "int32_t", "indices": "int32_t"}  # op<i>_<field>


def c_comment_label(name: str) -> str:
    """A model's op name reduced to at most 48 of [A-Za-z0-9_], for a comment beside generated code:
    nothing from a model file reaches C but this, which cannot end a comment or start a directive."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)[:48]


def c_array(ctype: str, name: str, values) -> str:
    """`static const ctype name[n] = {...};` with 16 values per line; `name` is generated, never a
    model's text, and every value is formatted as a Python int."""
    flat = [str(int(v)) for v in np.asarray(values).ravel()]
    lines = [", ".join(flat[i : i + 16]) for i in range(0, len(flat), 16)] or ["0"]
    return f"static const {ctype} {name}[{max(len(flat), 1)}] = {{\n  " + ",\n  ".join(lines) + "\n};\n"


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return (shape[0], shape[1], shape[2]) if len(shape) == 3 else (shape[0], 1, 1)


def _multiplier_fields(index: int, op) -> dict[str, object]:
    return {"mantissa": f"op{index}_mantissa", "shift": f"op{index}_shift", "multiplier_count": len(op.mantissa)}


def _clamp_fields(op, input_zero: int) -> dict[str, object]:
    lower, upper = op.bounds()
    return {"input_zero": input_zero, "output_zero": int(op.output_qparams.zero_point), "lower": lower, "upper": upper}


def _weighted_fields(index: int, op: QLayer, kind: str) -> dict[str, object]:
    fields = {"kind": kind, "weight": f"op{index}_weight", "weight_count": op.weight.size,
              **_multiplier_fields(index, op), **_clamp_fields(op, int(op.input_qparams.zero_point))}
    if op.bias is not None:
        fields.update(bias=f"op{index}_bias", bias_count=op.bias.size)
    return fields


def _conv2d(index: int, op: QConv2d, index_of: dict, in_shape: tuple[int, int, int]) -> dict[str, object]:
    g = op.geometry
    return {**_weighted_fields(index, op, "INTQ_CONV2D"), "k_h": op.weight.shape[2], "k_w": op.weight.shape[3],
            "stride_h": g["stride"][0], "stride_w": g["stride"][1], "pad_h": g["padding"][0], "pad_w": g["padding"][1],
            "dil_h": g["dilation"][0], "dil_w": g["dilation"][1], "groups": g["groups"]}


def _add(index: int, op: QAdd, index_of: dict, in_shape) -> dict[str, object]:
    return {"kind": "INTQ_ADD", "input2": index_of[op.inputs[1]], "input2_zero": int(op.input_qparams[1].zero_point),
            **_multiplier_fields(index, op), **_clamp_fields(op, int(op.input_qparams[0].zero_point))}


def _concat(index: int, op: QConcat, index_of: dict, in_shape) -> dict[str, object]:
    """A concatenation: its inputs' buffer indices, zero points and channel counts as op<i>_sources,
    op<i>_source_zeros and op<i>_source_channels (concat_arrays), one multiplier each (eq. 30)."""
    return {"kind": "INTQ_CONCAT", "sources": f"op{index}_sources", "source_zeros": f"op{index}_source_zeros",
            "source_channels": f"op{index}_source_channels", "source_count": len(op.inputs),
            **_multiplier_fields(index, op), **_clamp_fields(op, int(op.input_qparams[0].zero_point))}


def _mul(index: int, op: QMul, index_of: dict, in_shape) -> dict[str, object]:
    """A product (eq. 34): the second operand's buffer and zero point, one multiplier; its shape is
    mul_operand_shape's."""
    return {"kind": "INTQ_MUL", "input2": index_of[op.inputs[1]], "input2_zero": int(op.input_qparams[1].zero_point),
            **_multiplier_fields(index, op), **_clamp_fields(op, int(op.input_qparams[0].zero_point))}


def mul_operand_shape(op: QMul, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The second operand's (C, H, W) as in2_c, in2_h, in2_w (1 x 1 for a squeeze-excite gate)."""
    channels, height, width = _shape3(shapes[op.inputs[1]])
    return {"in2_c": channels, "in2_h": height, "in2_w": width}


def concat_arrays(op: QConcat, index_of: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """The values of a concatenation's source arrays: buffer index (-1: the model input), zero point, channels."""
    return {"sources": [index_of[name] for name in op.inputs],
            "source_zeros": [int(qp.zero_point) for qp in op.input_qparams],
            "source_channels": [_shape3(shapes[name])[0] for name in op.inputs]}


def _avg_pool(index: int, op: QAvgPool, index_of: dict, in_shape: tuple[int, int, int]) -> dict[str, object]:
    kernel, stride = op.kernel_size or in_shape[1:], op.stride or (1, 1)
    return {"kind": "INTQ_AVGPOOL", "k_h": kernel[0], "k_w": kernel[1], "stride_h": stride[0], "stride_w": stride[1],
            **_multiplier_fields(index, op), **_clamp_fields(op, int(op.input_qparams.zero_point))}


def _max_pool(index: int, op: QMaxPool, index_of: dict, in_shape) -> dict[str, object]:
    return {"kind": "INTQ_MAXPOOL", "k_h": op.kernel_size[0], "k_w": op.kernel_size[1], "stride_h": op.stride[0],
            "stride_w": op.stride[1], "pad_h": op.padding[0], "pad_w": op.padding[1], "ceil_mode": int(op.ceil_mode)}


def _lookup(index: int, op: QLookup, index_of: dict, in_shape) -> dict[str, object]:
    """A lookup: its derived table (eq. 29) as op<i>_table, indexed by q_x - qmin_x."""
    return {"kind": "INTQ_LOOKUP", "table": f"op{index}_table", "table_count": len(op.table),
            "table_first": op.input_qparams.dtype.qmin}


# The C lowering: per op class, (index, op, index_of, input shape) -> the op's intq_op fields (numbers and
# generated names); array fields (weight, bias, mantissa, shift, table, sources...) name the arrays model.h defines for them.
LOWERING = {
    QConv2d: _conv2d,
    QLinear: lambda index, op, index_of, in_shape: _weighted_fields(index, op, "INTQ_LINEAR"),
    QAdd: _add,
    QConcat: _concat,
    QMul: _mul,
    QAvgPool: _avg_pool,
    QMaxPool: _max_pool,
    QFlatten: lambda index, op, index_of, in_shape: {"kind": "INTQ_FLATTEN"},
    QReLU: lambda index, op, index_of, in_shape: {"kind": "INTQ_RELU", "lower": int(op.zero_point)},
    QLookup: _lookup,
    QChannelGather: lambda index, op, index_of, in_shape: {"kind": "INTQ_GATHER", "indices": f"op{index}_indices",
                                                           "index_count": len(op.indices)},
}


def _op_fields(index: int, op, index_of: dict[str, int], in_shape, out_shape) -> dict[str, object]:
    """The C initializer fields of op `index`: its shapes, then LOWERING's fields for its class."""
    (ci, hi, wi), (co, ho, wo) = _shape3(in_shape), _shape3(out_shape)
    return {"input": index_of[op.inputs[0]], "input2": -1, "in_c": ci, "in_h": hi, "in_w": wi,
            "out_c": co, "out_h": ho, "out_w": wo, **LOWERING[type(op)](index, op, index_of, (ci, hi, wi))}


def _op_entry(index: int, op, fields: dict[str, object]) -> str:
    """One designated initializer of the op table, with a comment of generated text only."""
    body = ", ".join(f".{key} = {value}" for key, value in fields.items())
    return f"  /* op {index}: {type(op).__name__} {c_comment_label(op.name)} */\n  {{{body}}},"


def _input_lut(model: IntegerModel) -> np.ndarray:
    """The first layer's integer input for each channel and pixel value, [c * 256 + p] (eq. 27)."""
    return model.input.table.reshape(-1).astype(np.int64)  # (C, 256) -> (C * 256,)


def model_header(model: IntegerModel, shapes: dict[str, tuple[int, ...]]) -> str:
    """model.h: the op arrays (named op<i>_<field>), the input table and the op table; nothing in it
    comes from the model's text but numbers and c_comment_label's reduced names."""
    parts = ["/* Generated by intq: an integer-only model. Do not edit. */\n#include <stdint.h>\n"
             "#include \"intq_runtime.h\"\n"]
    index_of = {model.input_name: -1, **{op.name: i for i, op in enumerate(model.layers)}}
    entries = []
    for index, op in enumerate(model.layers):
        fields = _op_fields(index, op, index_of, shapes[op.inputs[0]], shapes[op.name])
        if isinstance(op, QMul):
            fields.update(mul_operand_shape(op, shapes))
        values = concat_arrays(op, index_of, shapes) if isinstance(op, QConcat) else {}
        parts += [c_array(ctype, fields[key], values[key] if key in values else getattr(op, key))
                  for key, ctype in ARRAY_TYPES.items() if key in fields]
        entries.append(_op_entry(index, op, fields))
    parts.append(c_array("int32_t", "INTQ_INPUT_LUT", _input_lut(model)))
    parts.append("static const intq_op INTQ_OPS[] = {\n" + "\n".join(entries) + "\n};\n")
    sizes = [int(np.prod(shapes[op.name])) for op in model.layers]
    parts.append(c_array("int32_t", "INTQ_BUFFER_SIZES", sizes))
    parts.append(f"#define INTQ_OP_COUNT {len(model.layers)}\n#define INTQ_INPUT_SIZE {int(np.prod(shapes[model.input_name]))}\n"
                 f"#define INTQ_INPUT_PLANE {int(np.prod(shapes[model.input_name][1:]))}\n"
                 f"#define INTQ_OUTPUT_OP {index_of[model.output_name]}\n")
    return "\n".join(parts)


def golden_header(model: IntegerModel, pixels: torch.Tensor) -> tuple[str, dict[str, tuple[int, ...]]]:
    """Pixels and every op's reference output for each golden image; also the shapes of one image."""
    outputs: dict[str, list[np.ndarray]] = {}
    for image in pixels:
        run_integer(model, image[None], visit=lambda name, v: outputs.setdefault(name, []).append(v[0].numpy()))
    shapes = {name: tuple(values[0].shape) for name, values in outputs.items()}
    parts = [f"#define GOLDEN_IMAGES {len(pixels)}\n", c_array("uint8_t", "GOLDEN_PIXELS", pixels.numpy())]
    for i, op in enumerate(model.layers):
        parts.append(c_array("int32_t", f"GOLDEN_OP{i}", np.stack(outputs[op.name])))
    parts.append("static const int32_t *GOLDEN_OPS[] = {" + ", ".join(f"GOLDEN_OP{i}" for i in range(len(model.layers))) + "};\n")
    return "\n".join(parts), shapes


RUNTIME_FILES = ("intq_runtime.h", "intq_runtime.c", "main.c")


def c_sources(model: IntegerModel, golden_pixels: torch.Tensor) -> dict[str, str]:
    """{file name: text} of the export: model.h, golden.h and the runtime. The model is checked first
    (model_check.check_model): generated code only ever describes a model that passes every rule."""
    shapes = check_model(model)
    golden, golden_shapes = golden_header(model, golden_pixels)
    if any(tuple(golden_shapes[name]) != tuple(shape) for name, shape in shapes.items()):
        raise ModelCheckError("the reference executor's shapes differ from the model's (input of another size?)")
    runtime = resources.files("intq.executors.c_runtime")
    return {"model.h": model_header(model, shapes), "golden.h": golden,
            **{name: runtime.joinpath(name).read_text() for name in RUNTIME_FILES}}


def export_c(model: IntegerModel, golden_pixels: torch.Tensor, out_dir: Path) -> list[Path]:
    """Write model.h, golden.h, main.c, intq_runtime.[ch] into out_dir, all or none of them (staged
    beside, then moved in: a failure leaves the folder as it was)."""
    sources = c_sources(model, golden_pixels)
    out_dir = ensure_writable_dir(out_dir)
    with staged_output(out_dir) as staging:
        for name, text in sources.items():
            atomic_write_text(staging / name, text)
    return [out_dir / name for name in sources]
