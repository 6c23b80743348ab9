"""Quantization-aware fine-tuning (qat/): LSQ fake quantization on the integer model's grids, the
converted model after fine-tuning, determinism, and `intq finetune` on synthetic data."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import Residual, calibrated, make_pixels, write_image_folder
from intq.arith.qparams import INT8, UINT8, IntType, Scheme, choose_qparams, dequantize
from intq.cli import main
from intq.executors.reference import run_integer
from intq.graph.captured_graph import run_float
from intq.executors.simulate import layer_agreement
from intq.executors.verify import verify
from intq.graph.model_file import load as load_model
from intq.qat.fake_quant import fake_quantize, grid_range, step_gradient_scale
from intq.qat.finetune import (FakeQuantGraph, FinetuneOptions, augment_pixels, distillation_loss, finetune,
                               finetune_float, padding_pixels)
from intq.graph.config import RoundingConfig
from intq.ptq.reconstruction import learned_integer_model
from intq.workflows.sweep import SweepCell, cell_config

W4A4 = cell_config(SweepCell("mse", "per-channel", 4, 4))
OPTIONS = FinetuneOptions(epochs=2, lr=0.01, batch_size=32, augment=False, seed=3)


@pytest.fixture(scope="module")
def task():
    """A conv-BN / residual / ReLU6 / average-pool model, 384 random images labelled by the float model."""
    torch.manual_seed(0)
    model = Residual().eval()
    pixels = make_pixels(384, seed=1)
    with torch.no_grad():
        labels = model((pixels.float() / 255 - 0.5) / 0.5).argmax(dim=1)
    graph, stats = calibrated(model, pixels[:128])
    return graph, stats, pixels, labels


@pytest.fixture(scope="module")
def tuned(task):
    graph, stats, pixels, labels = task
    return finetune(graph, stats, W4A4, pixels, labels, OPTIONS)


def _task_loss(model, pixels, labels) -> float:
    """Cross-entropy of the integer model's logits (the reference executor's, dequantized)."""
    logits = dequantize(run_integer(model, pixels), model.output_qparams(), torch.float64)
    return float(F.cross_entropy(logits, labels))


def test_fine_tuning_lowers_the_task_loss_of_the_integer_model(task, tuned):
    _, _, pixels, labels = task
    before, after = _task_loss(tuned.before, pixels, labels), _task_loss(tuned.after, pixels, labels)
    assert after < 0.8 * before, (before, after)
    assert tuned.history[-1]["loss"] < tuned.history[0]["loss"]


def test_fine_tuned_model_simulation_and_reference_agree_exactly(task, tuned):
    _, _, pixels, _ = task
    rows = layer_agreement(tuned.after, pixels[:64])
    assert {row["layer"] for row in rows} >= {"stem", "conv_a", "conv_b", "project", "add", "head"}
    assert all(row["differing"] == 0 for row in rows), rows
    row = verify(tuned.after, pixels[:32], ("onnx_exact",))["onnx_exact"]
    assert row["differing_share"] == 0 and row["max_lsb"] == 0


def test_fake_quantized_graph_computes_the_converted_integer_model(task, tuned):
    """The trained fake-quant graph in float64 gives the integer model's logits (up to a rare 1 LSB tie
    of the 31-bit multipliers); the untrained one the post-training model's."""
    _, _, pixels, _ = task
    for fake, model in ((tuned.fake_quant, tuned.after), (FakeQuantGraph(task[0], tuned.before), tuned.before)):
        with torch.no_grad():
            simulated = fake(pixels[:64], torch.float64)
        codes = torch.round(simulated / torch.as_tensor(float(model.output_qparams().scale), dtype=torch.float64))
        reference = run_integer(model, pixels[:64]).to(torch.float64) - float(model.output_qparams().zero_point)
        differing = (codes - reference).abs()
        assert differing.max() <= 1 and (differing > 0).double().mean() < 0.01


def test_learned_grids_become_the_converted_qparams(tuned):
    """Weight grids go to convert as they are; activation grids through grid_range and choose_qparams,
    whose round trip keeps the zero point and the scale to a few ulps; fine-tuning moved them."""
    grids = tuned.fake_quant
    for layer in tuned.after.quantized_layers():
        learned = grids.weight_grids[grids._key(layer.name)].learned_qparams()
        assert np.array_equal(layer.weight_qparams.scale, learned.scale)
        point = grids.grids[grids._key(layer.name)].learned_qparams()
        assert np.array_equal(layer.output_qparams.zero_point, point.zero_point)
        np.testing.assert_allclose(layer.output_qparams.scale, point.scale, rtol=1e-12)
    moved = [not np.allclose(a.weight_qparams.scale, b.weight_qparams.scale)
             for a, b in zip(tuned.before.quantized_layers(), tuned.after.quantized_layers())]
    assert any(moved)


@pytest.mark.parametrize("dtype,scheme", [(UINT8, Scheme.ASYMMETRIC), (IntType(4, True), Scheme.ASYMMETRIC),
                                          (INT8, Scheme.SYMMETRIC), (UINT8, Scheme.SYMMETRIC), (INT8, Scheme.SPAN)])
def test_grid_range_round_trips_through_choose_qparams(dtype, scheme):
    qp = choose_qparams(-0.37, 2.9, dtype, scheme)
    again = choose_qparams(*grid_range(qp, scheme), dtype, scheme)
    assert np.array_equal(again.zero_point, qp.zero_point)
    np.testing.assert_allclose(again.scale, qp.scale, rtol=1e-14)


def test_fake_quantize_is_the_grid_and_its_step_gradient_is_lsq():
    """Forward: s (clamp(round(x/s) + z) - z), halves away from zero; d x_hat/d s (eq. 42) times g (eq. 43):
    round(v) - v inside the range, qmin - z or qmax - z where clipped."""
    x = torch.tensor([0.25, -0.25, 0.3, 10.0, -10.0], dtype=torch.float64)
    step = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    dtype = IntType(4, True)
    out = fake_quantize(x, step, torch.tensor(0.0, dtype=torch.float64), dtype, g=0.5)
    assert out.tolist() == [0.5, -0.5, 0.5, 3.5, -4.0]
    out.sum().backward()
    v = x[:3] / 0.5
    expected = float((torch.where(v < 0, -torch.floor(-v + 0.5), torch.floor(v + 0.5)) - v).sum()) + 7 - 8
    assert step.grad.item() == pytest.approx(0.5 * expected)
    assert step_gradient_scale(100, dtype, np.array(0)) == pytest.approx(1 / np.sqrt(100 * 8))


def test_same_seed_same_integers_another_seed_others(task, tuned):
    graph, stats, pixels, labels = task
    again = finetune(graph, stats, W4A4, pixels, labels, OPTIONS)
    other = finetune(graph, stats, W4A4, pixels, labels, FinetuneOptions(epochs=2, lr=0.01, batch_size=32,
                                                                         augment=False, seed=4))
    pairs = list(zip(tuned.after.quantized_layers(), again.after.quantized_layers(), other.after.quantized_layers()))
    assert all(np.array_equal(a.weight, b.weight) and np.array_equal(a.output_qparams.scale, b.output_qparams.scale)
               for a, b, _ in pairs)
    assert not all(np.array_equal(a.weight, c.weight) for a, _, c in pairs)


def test_step_lr_sets_the_rate_of_the_step_sizes_alone(task, tuned):
    """step_lr = lr is the default's trajectory exactly; a 30x faster step rate moves the activation
    grids further from calibration's, the weights still learning at lr."""
    graph, stats, pixels, labels = task
    same = finetune(graph, stats, W4A4, pixels, labels, replace(OPTIONS, step_lr=OPTIONS.lr))
    faster = finetune(graph, stats, W4A4, pixels, labels, replace(OPTIONS, step_lr=30 * OPTIONS.lr))

    def moved(result) -> float:  # mean relative change of the activation steps
        return float(np.mean([abs(float(a.output_qparams.scale) / float(b.output_qparams.scale) - 1)
                              for a, b in zip(result.after.quantized_layers(), result.before.quantized_layers())]))

    assert all(np.array_equal(a.weight, b.weight) and np.array_equal(a.output_qparams.scale, b.output_qparams.scale)
               for a, b in zip(same.after.quantized_layers(), tuned.after.quantized_layers()))
    assert moved(faster) > 3 * moved(tuned) > 0, (moved(faster), moved(tuned))


@pytest.mark.parametrize("field,value", [("epochs", 0), ("lr", float("nan")), ("lr", 0.0), ("batch_size", 0),
                                         ("momentum", 1.0), ("images", 0), ("threads", True),
                                         ("distill", 1.5), ("distill", -0.1), ("distill", float("nan")),
                                         ("step_lr", 0.0), ("step_lr", float("inf")), ("optimizer", "rmsprop"),
                                         ("optimizer", None)])
def test_bad_options_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        FinetuneOptions(**{field: value})


def test_the_learning_rate_defaults_to_the_optimizers_own():
    assert FinetuneOptions().lr == 0.01 and FinetuneOptions(optimizer="adam").lr == 0.0001
    assert FinetuneOptions(lr=0.003, optimizer="adam").lr == 0.003


def _weight_moves(graph, result) -> tuple[torch.Tensor, torch.Tensor]:
    """|w_after - w_before| of every weight of the fine-tuned float weights, and of every learned step."""
    fake = result.fake_quant
    weights = torch.cat([(fake.weights[fake._key(node.name)].detach() - node.op.weight.float()).abs().flatten()
                         for node in graph.weighted()])
    start = FakeQuantGraph(graph, result.before)
    steps = torch.cat([(a.step.detach() - b.step.detach()).abs().flatten()
                       for a, b in zip([*fake.grids.values(), *fake.weight_grids.values()],
                                       [*start.grids.values(), *start.weight_grids.values()]) if a.step is not None])
    return weights, steps


def test_adams_first_step_moves_every_parameter_by_the_rate_whatever_its_gradient(task):
    """One batch, one step at the peak rate: Adam moves each weight and each step size by lr sign(g) (eq. 46),
    the same amount for every channel; SGD moves them by lr g, spread over orders of magnitude."""
    graph, stats, pixels, labels = task
    one_step = replace(OPTIONS, epochs=1, images=OPTIONS.batch_size, lr=1e-3)
    adam = finetune(graph, stats, W4A4, pixels, labels, replace(one_step, optimizer="adam"))
    for moves in _weight_moves(graph, adam):
        moved = moves[moves > 0]
        assert len(moved) > 0.5 * len(moves)
        torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=2e-3, atol=0)
    sgd_weights, _ = _weight_moves(graph, finetune(graph, stats, W4A4, pixels, labels, one_step))
    moved = sgd_weights[sgd_weights > 0]
    assert moved.max() > 100 * moved.median() or moved.median() > 100 * moved.min()


def test_adam_fine_tuning_lowers_the_loss_and_its_model_is_simulated_exactly(task):
    graph, stats, pixels, labels = task
    tuned = finetune(graph, stats, W4A4, pixels, labels, replace(OPTIONS, optimizer="adam", lr=3e-3))
    before, after = _task_loss(tuned.before, pixels, labels), _task_loss(tuned.after, pixels, labels)
    assert after < 0.8 * before, (before, after)
    assert all(row["differing"] == 0 for row in layer_agreement(tuned.after, pixels[:64]))


def test_finetune_command_writes_a_model_and_refuses_bad_options_in_one_line(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", train_per_class=8, test_per_class=2)
    common = ["--data", str(data), "--cache", str(tmp_path / "cache")]
    checkpoint = tmp_path / "net.npz"
    assert main(["train", "--arch", "Net", "--epochs", "1", "--batch-size", "16", "--out", str(checkpoint), *common]) == 0
    out = tmp_path / "ft.npz"
    assert main(["finetune", "--model", str(checkpoint), "--arch", "Net", "--batch-size", "16", "--calib-samples",
                 "40", "--layer-bits", "conv1=8,fc3=8", "--layer-abits", "fc2=8", "--float-control", "--distill", "0.5", "--optimizer", "adam", "--out", str(out),
                 "--json", str(tmp_path / "ft.json"), *common]) == 0
    printed = capsys.readouterr().out
    assert "before fine-tuning" in printed and "unquantized" in printed and out.is_file()
    figures = json.loads((tmp_path / "ft.json").read_text())
    assert 0 <= figures["float_control_accuracy"] <= 100 and figures["options"]["distill"] == 0.5
    assert figures["options"]["optimizer"] == "adam" and figures["options"]["lr"] == 0.0001
    bits = {layer.name: layer.weight_qparams.dtype.bits for layer in load_model(out).quantized_layers()}
    assert bits == {"conv1": 8, "conv2": 4, "fc1": 4, "fc2": 4, "fc3": 8}
    abits = {layer.name: layer.output_qparams.dtype.bits for layer in load_model(out).quantized_layers()}
    assert abits == {"conv1": 4, "conv2": 4, "fc1": 4, "fc2": 8, "fc3": 16}
    assert main(["verify", str(out), "--executors", "onnx_exact", "--images", "8", *common]) == 0
    assert "differing 0.0000%" in capsys.readouterr().out
    for bad, named in ((["--epochs", "0"], "--epochs"), (["--lr", "nan"], "--lr"), (["--wbits", "9"], "--wbits"),
                       (["--batch-size", "1000"], "--batch-size"), (["--train-images", "0"], "--train-images"),
                       (["--layer-bits", "conv1=9"], "--layer-bits"), (["--distill", "2"], "--distill"), (["--layer-bits", "nosuch=8"], "nosuch"),
                       (["--layer-abits", "fc2=1"], "--layer-abits"), (["--step-lr", "0"], "--step-lr"), (["--layer-abits", "nosuch=8"], "nosuch"),
                       (["--optimizer", "rmsprop"], "--optimizer")):
        assert main(["finetune", "-q", "--model", str(checkpoint), "--arch", "Net", *bad, *common]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("intq: error: ") and named in err, err


def test_a_step_pushed_below_its_floor_is_projected_back_onto_it(task, tuned):
    graph, _, _, _ = task
    model = FakeQuantGraph(graph, tuned.before)
    grids = [*model.grids.values(), *model.weight_grids.values()]
    learned = [grid for grid in grids if grid.step is not None]
    starts = [grid.step.detach().clone() for grid in learned]
    with torch.no_grad():
        for grid in learned:
            grid.step.neg_()  # an overshooting update: lr x gradient larger than the step itself
    model.hold_floors_()
    assert all(torch.equal(grid.step, start * 2.0 ** -8) for grid, start in zip(learned, starts))
    fixed = model.grids["t_input"]
    assert fixed.step is None and fixed.floor is None  # the input's grid is the model's own: never learned


def test_a_learning_rate_that_overshoots_still_gives_a_convertible_model(task):
    graph, stats, pixels, labels = task
    wild = finetune(graph, stats, W4A4, pixels, labels, FinetuneOptions(epochs=1, lr=20.0, batch_size=32,
                                                                        augment=False, seed=3))
    for before, after in zip(wild.before.quantized_layers(), wild.after.quantized_layers()):
        assert np.all(np.asarray(after.weight_qparams.scale) >= np.asarray(before.weight_qparams.scale) * 2.0 ** -8 * (1 - 1e-6))
    rows = layer_agreement(wild.after, pixels[:32])
    assert all(row["differing"] == 0 for row in rows), rows


def test_fine_tuning_can_start_from_the_learned_rounding(task):
    graph, stats, pixels, labels = task
    config = replace(W4A4, rounding=RoundingConfig("adaround", iterations=30, images=64, seed=0))
    images = graph.preprocessing.apply(pixels[:64])
    start = finetune(graph, stats, config, pixels, labels, OPTIONS, rounding_images=images)
    learned, _ = learned_integer_model(graph, stats, config, images)
    nearest = finetune(graph, stats, W4A4, pixels, labels, OPTIONS)
    assert all(np.array_equal(a.weight, b.weight) for a, b in zip(start.before.quantized_layers(), learned.quantized_layers()))
    assert not all(np.array_equal(a.weight, b.weight) for a, b in zip(start.before.quantized_layers(),
                                                                        nearest.before.quantized_layers()))
    rows = layer_agreement(start.after, pixels[:32])
    assert all(row["differing"] == 0 for row in rows), rows
    with pytest.raises(ValueError, match="rounding_images"):
        finetune(graph, stats, config, pixels, labels, OPTIONS)


def _float_logits(graph, pixels):
    with torch.no_grad():
        return run_float(graph, graph.preprocessing.apply(pixels))


def _divergence(graph, model, pixels) -> float:
    """KL(float || integer model) over `pixels`: how far the integer model's predictions are from the float's."""
    logits = dequantize(run_integer(model, pixels), model.output_qparams(), torch.float32)
    return float(distillation_loss(logits, _float_logits(graph, pixels), torch.zeros(len(pixels), dtype=torch.long), 1.0))


def test_distillation_follows_the_float_model_where_the_labels_are_noise(task):
    graph, stats, pixels, _ = task
    noise = torch.randint(0, 10, (len(pixels),), generator=torch.Generator().manual_seed(7))
    taught = finetune(graph, stats, W4A4, pixels, noise, replace(OPTIONS, distill=1.0))
    labelled = finetune(graph, stats, W4A4, pixels, noise, OPTIONS)
    start = _divergence(graph, taught.before, pixels)
    after, noisy = _divergence(graph, taught.after, pixels), _divergence(graph, labelled.after, pixels)
    assert after < 0.8 * start and noisy > 2 * start, (start, after, noisy)
    rows = layer_agreement(taught.after, pixels[:32])
    assert all(row["differing"] == 0 for row in rows), rows


def test_distillation_loss_blends_cross_entropy_and_the_teachers_divergence():
    generator = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    cross, kl = F.cross_entropy(logits, labels), (F.softmax(teacher, 1) * (F.log_softmax(teacher, 1)
                                                                           - F.log_softmax(logits, 1))).sum(1).mean()
    assert torch.allclose(distillation_loss(logits, teacher, labels, 0.0), cross)
    assert torch.allclose(distillation_loss(logits, teacher, labels, 1.0), kl)
    assert torch.allclose(distillation_loss(logits, teacher, labels, 0.25), 0.75 * cross + 0.25 * kl)
    assert float(distillation_loss(teacher, teacher, labels, 1.0)) == pytest.approx(0.0, abs=1e-6)
    teacher.requires_grad_(True)
    distillation_loss(logits.requires_grad_(True), teacher, labels, 1.0).backward()
    assert teacher.grad is None and logits.grad.abs().sum() > 0


def test_shifted_in_borders_take_the_pixel_that_preprocesses_to_zero(task):
    graph, _, pixels, _ = task
    fill = padding_pixels(graph, 3)
    assert fill.flatten().tolist() == [128.0, 128.0, 128.0]  # (p/255 - 0.5)/0.5 = 0 at p = 127.5
    images = pixels[:64]
    shifted = [augment_pixels(images, torch.Generator().manual_seed(seed), fill) for seed in range(6)]
    assert all(out.dtype == torch.uint8 and out.shape == images.shape for out in shifted)
    borders = [out for out in shifted if not any(torch.equal(out, v) for v in (images, images.flip(3)))]
    assert borders, "no seed shifted the batch"
    for out in borders:  # a shifted batch has at least one full row or column of the fill pixel in every image
        full = (out == 128).all(dim=1)
        assert bool((full.all(dim=1).any(dim=1) | full.all(dim=2).any(dim=1)).all())


def test_the_float_control_trains_the_same_loop_with_nothing_quantized(task, tuned):
    graph, stats, pixels, labels = task
    trained, history = finetune_float(graph, pixels, labels, OPTIONS)
    assert len(history) == OPTIONS.epochs and history[-1]["loss"] < history[0]["loss"]
    start = float(F.cross_entropy(_float_logits(graph, pixels), labels))
    assert float(F.cross_entropy(_float_logits(trained, pixels), labels)) < 0.8 * start
    assert all(not torch.equal(a.op.weight, b.op.weight) for a, b in zip(graph.weighted(), trained.weighted()))
    again, _ = finetune_float(graph, pixels, labels, OPTIONS)
    assert all(torch.equal(a.op.weight, b.op.weight) for a, b in zip(again.weighted(), trained.weighted()))
