"""Small random models of each supported op: residual add, average pools, ReLU6, BatchNorm, groups."""
import numpy as np
import pytest
import torch

from conftest import Residual, calibrated, make_pixels
from intq.graph import model_file
from intq.graph.config import RECOMMENDED, STUDY
from intq.graph.convert import convert
from intq.executors.reference import run_integer
from intq.graph.integer_model import QAdd, QAvgPool, QLayer
from intq.executors.simulate import layer_agreement


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    model = Residual()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("preset", [STUDY, RECOMMENDED], ids=lambda p: p.name)
def test_residual_model_runs_integer_only(residual, preset):
    pixels = make_pixels(16)
    graph, stats = calibrated(residual, pixels)
    model = convert(graph, stats, preset)
    assert {QAdd, QAvgPool, QLayer} <= {base for op in model.layers for base in type(op).__mro__}
    seen = {}
    run_integer(model, pixels, visit=lambda name, value: seen.__setitem__(name, value.dtype))
    assert all(not dtype.is_floating_point for dtype in seen.values())
    assert torch.equal(run_integer(model, pixels), run_integer(model, pixels, visit=lambda n, v: None))


def test_residual_model_tracks_the_float_model(residual):
    pixels = make_pixels(32)
    graph, stats = calibrated(residual, pixels)
    model = convert(graph, stats, RECOMMENDED)
    logits = run_integer(model, pixels).to(torch.int64)
    qp = model.output_qparams()
    real = (logits - int(qp.zero_point)).double() * float(qp.scale)
    with torch.no_grad():
        expected = residual((pixels.float() / 255 - 0.5) / 0.5).double()
    assert torch.corrcoef(torch.stack([real.flatten(), expected.flatten()]))[0, 1] > 0.98


def test_residual_model_agrees_with_the_simulation(residual):
    """Add rounds twice (operands to a 2^-20 grid, then the sum): at most 1 LSB, rarely."""
    pixels = make_pixels(16)
    graph, stats = calibrated(residual, pixels)
    rows = layer_agreement(convert(graph, stats, RECOMMENDED), pixels)
    assert {row["layer"] for row in rows} >= {"stem", "conv_a", "add", "pool", "adaptive_avg_pool2d", "head"}
    for row in rows:
        assert row["max_lsb"] <= 1 and row["differing"] <= 0.001 * row["values"], row


def test_relu6_clamps_at_six(residual):
    pixels = make_pixels(16)
    graph, stats = calibrated(residual, pixels)
    model = convert(graph, stats, RECOMMENDED)
    conv_a = model.layer("conv_a")
    lower, upper = conv_a.bounds()
    assert conv_a.relu_max == 6.0
    assert float(conv_a.output_qparams.scale) * (upper - int(conv_a.output_qparams.zero_point)) <= 6.0 + 1e-9


def test_residual_model_round_trips_through_npz(tmp_path, residual):
    pixels = make_pixels(8)
    graph, stats = calibrated(residual, pixels)
    model = convert(graph, stats, RECOMMENDED)
    model_file.save(model, tmp_path / "residual.npz")
    with np.load(tmp_path / "residual.npz", allow_pickle=False) as archive:
        assert archive["add.mantissa"].dtype == np.int32
    assert torch.equal(run_integer(model_file.load(tmp_path / "residual.npz"), pixels), run_integer(model, pixels))


def test_residual_add_table_equals_the_fixed_point_formula(residual):
    from intq.executors.reference import add, add_exact

    model = convert(*calibrated(residual, make_pixels(8)), RECOMMENDED)
    op = next(op for op in model.layers if isinstance(op, QAdd))
    a_type, b_type = (qp.dtype for qp in op.input_qparams)
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(a_type.qmin, a_type.qmax + 1, (4, 16, 8, 8), generator=generator).to(torch.int8 if a_type.signed else torch.uint8)
    b = torch.randint(b_type.qmin, b_type.qmax + 1, (4, 16, 8, 8), generator=generator).to(torch.int8 if b_type.signed else torch.uint8)
    expected = add_exact(op, a, b)
    assert torch.equal(add(op, a, b).to(torch.int64), expected)
    assert len(torch.unique(expected)) > 50  # the operands really exercise the table
