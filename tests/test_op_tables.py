"""Every op class has an entry in every executor's lowering table (and in the checks a model file must
pass): adding an op class without one fails here, naming the table and the op."""
import pytest

from intq.workflows import explain

from intq.graph import model_check

from intq.executors import simulate
from intq.executors import c_export, onnx_export, onnx_qdq, reference, torch_quantized
from intq.graph.integer_model import OP_TYPES, QLayer, Requantizing

WEIGHTED = tuple(op for op in OP_TYPES if issubclass(op, QLayer))
REQUANTIZING = tuple(op for op in OP_TYPES if issubclass(op, Requantizing))

# (table, the op classes it must cover)
TABLES = {
    "reference.LOWERING": (reference.LOWERING, OP_TYPES),
    "c_export.LOWERING": (c_export.LOWERING, OP_TYPES),
    "onnx_export.LOWERING": (onnx_export.LOWERING, OP_TYPES),
    "onnx_qdq.LOWERING": (onnx_qdq.LOWERING, OP_TYPES),
    "torch_quantized.LOWERING": (torch_quantized.LOWERING, OP_TYPES),
    "model_check.CHECKS": (model_check.CHECKS, OP_TYPES),
    "simulate.SIMULATED": (simulate.SIMULATED, REQUANTIZING),
    "reference.PRODUCTS": (reference.PRODUCTS, WEIGHTED),
    "simulate.REAL_LAYERS": (simulate.REAL_LAYERS, WEIGHTED),
    "torch_quantized.MODULES": (torch_quantized.MODULES, WEIGHTED),
    "onnx_export.PRODUCT_NODES": (onnx_export.PRODUCT_NODES, WEIGHTED),
    "onnx_export.ENGINE_LAYERS": (onnx_export.ENGINE_LAYERS, WEIGHTED),
    "explain.WINDOWS": (explain.WINDOWS, WEIGHTED),
}


def missing_entries(table: dict, required: tuple[type, ...]) -> list[str]:
    """The op classes `table` has no entry for (and keys that are no op class)."""
    return sorted({op.__name__ for op in required} ^ {key.__name__ for key in table})


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_op_class_has_an_entry(name):
    table, required = TABLES[name]
    assert missing_entries(table, required) == [], f"{name} lacks an entry for these op classes"


def test_a_removed_entry_is_named():
    table = dict(c_export.LOWERING)
    del table[OP_TYPES[0]]
    assert missing_entries(table, OP_TYPES) == [OP_TYPES[0].__name__]


def test_op_classes_carry_their_semantics():
    """Arity and input parameters live on the op classes, not in the executors."""
    for op in OP_TYPES:
        assert op.ARITY in (1, 2, None)  # None: two or more (a concatenation)
    assert {op.__name__ for op in WEIGHTED} == {"QConv2d", "QLinear"}


def test_every_registered_executor_runs_a_model_to_the_same_integers_shape():
    """The registry's executors share one protocol: prepare(model) -> forward(pixels) -> (N, outputs)."""
    import shutil

    import torch

    from conftest import calibrated, make_pixels
    from intq.graph.config import RECOMMENDED
    from intq.graph.convert import convert
    from intq.executors.registry import EXECUTORS, run
    from intq.cifar.models import NetWithBias

    torch.manual_seed(0)
    pixels = make_pixels(6)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    model = convert(graph, stats, RECOMMENDED)
    reference = run(EXECUTORS["reference"].prepare(model), pixels)
    assert set(EXECUTORS) == {"reference", "c", "torch_quantized", "onnx", "onnx_exact", "onnx_qdq"}
    for name, executor in EXECUTORS.items():
        if name == "c" and not (shutil.which("cc") or shutil.which("gcc")):
            continue
        output = run(executor.prepare(model), pixels)
        assert output.shape == reference.shape and output.dtype == torch.int64, name
        if name in ("reference", "c", "onnx_exact"):
            assert torch.equal(output, reference), name
        assert (executor.op_steps(model, executor.prepare(model)) is None) == (name in ("reference", "c", "onnx_exact", "onnx_qdq")), name
