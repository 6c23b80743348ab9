"""`intq finetune`: its parser (added by cli.py) and its body (arguments checked, the workflow called,
its figures printed), beside commands.py's so that the command of issue 14's fine-tuning stays in one place."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from intq.command_checks import ABITS_HELP, at_least, bit_width, layer_bits, range_method
from intq.commands import _dataset, _float_model_inputs, _json_target, _save_json, provenance
from intq.files import check_writable
from intq.graph.config import ROUNDINGS
from intq.qat.finetune import FinetuneOptions
from intq.qat.optimizers import OPTIMIZERS
from intq.workflows.finetune import finetune_checkpoint
from intq.workflows.subject import load_float_model, model_name
from intq.workflows.sweep import CALIBRATION_IMAGES, GRANULARITIES, SweepCell, cell_config, checked_count

_log = logging.getLogger(__name__)  # progress messages; results are printed to stdout


def add_finetune(commands, add_model, add_common, add_json) -> None:
    """The `finetune` subcommand's parser; cli.py hands over its shared option groups (model, common, json)."""
    command = commands.add_parser(
        "finetune", help="quantization-aware fine-tuning with learned step sizes (LSQ), then an integer model",
        description="Calibrate and convert as intq quantize does (a sweep cell: --method, --wbits, --abits, "
        "--granularity), then train a few epochs with fake quantization on exactly the integer model's grids, "
        "learning the weights, biases and every step size (LSQ), and convert again on the learned grids. "
        "Writes the integer model (.npz) and prints float, before and after integer-only test accuracy.")
    add_model(command)
    command.add_argument("--method", default="mse", help="range method of the starting grids (default: mse)")
    command.add_argument("--wbits", type=int, default=4, help="weight bits, 2..8 (default: 4)")
    command.add_argument("--abits", type=int, default=4, help="activation bits, 2..8 (default: 4)")
    command.add_argument("--granularity", choices=GRANULARITIES, default="per-channel", help="(default: per-channel)")
    command.add_argument("--layer-bits", metavar="LAYER=B,...", help="weight bits per layer, e.g. conv=8,fc=8")
    command.add_argument("--layer-abits", metavar="NODE=B,...", help=ABITS_HELP)
    command.add_argument("--rounding", choices=ROUNDINGS, default="nearest",
                         help="start from this rounding: nearest, or learned (adaround, brecq) on the calibration images")
    command.add_argument("--epochs", type=int, default=1, help="(default: 1)")
    command.add_argument("--optimizer", default="sgd", metavar="|".join(OPTIMIZERS),
                         help="sgd (with momentum 0.9) or adam (per-element steps; suits folded BatchNorm) (default: sgd)")
    command.add_argument("--lr", type=float, default=None,
                         help="peak learning rate, cosine to 0 (default: 0.01 with sgd, 0.0001 with adam)")
    command.add_argument("--step-lr", type=float, default=None, metavar="LR",
                         help="peak learning rate of the step sizes, cosine to 0 (default: --lr, as LSQ)")
    command.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    command.add_argument("--train-images", type=int, default=None,
                         help="training images per epoch, a seeded random subset each epoch (default: all)")
    command.add_argument("--no-augment", action="store_true", help="no random shifts and flips")
    command.add_argument("--distill", type=float, default=0.0, metavar="A",
                         help="weight in [0, 1] of the float model's own predictions in the loss, the rest "
                         "cross-entropy with the labels (knowledge distillation; default: 0)")
    command.add_argument("--float-control", action="store_true",
                         help="also fine-tune the float model the same way with nothing quantized and print its "
                         "test accuracy: what the extra training alone buys")
    command.add_argument("--threads", type=int, default=1,
                         help="intra-op threads; the result depends on them (default: 1)")
    command.add_argument("--calib-samples", type=int, default=None,
                         help="training images to calibrate on (default: 10000, or all when fewer)")
    command.add_argument("--out", metavar="MODEL.npz", type=Path, default=None,
                         help="(default: runs/<model>/<model>-<cell>-ft<epochs>-int.npz)")
    add_common(command)
    add_json(command)


def finetune_command(args: argparse.Namespace) -> None:
    json_target = _json_target(args)
    range_method("--method", args.method)
    bit_width("--wbits", args.wbits)
    bit_width("--abits", args.abits)
    at_least("--calib-samples", args.calib_samples, 1)
    try:
        options = FinetuneOptions(args.epochs, args.lr, args.batch_size, augment=not args.no_augment,
                                  images=args.train_images, seed=args.seed, threads=args.threads,
                                  distill=args.distill, step_lr=args.step_lr, optimizer=args.optimizer)
    except ValueError as err:
        field = str(err).split()[1]  # "fine-tuning <field> must ..."
        option = "train-images" if field == "images" else field.replace("_", "-")
        raise argparse.ArgumentTypeError(f"--{option}: {err}") from None
    cell = SweepCell(args.method, args.granularity, args.wbits, args.abits, rounding=args.rounding)
    per_layer, per_node = layer_bits(args.layer_bits), layer_bits(args.layer_abits, "--layer-abits")
    try:  # the sweep cell's config: --layer-bits, --layer-abits checked, a learned --rounding seeded by --seed
        config = cell_config(cell, per_layer, seed=args.seed, layer_abits=per_node)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    inputs = _float_model_inputs(args, args.model)
    start = "" if args.rounding == "nearest" else f"-{args.rounding}"
    label = f"{cell.method}-w{cell.wbits}a{cell.abits}-{cell.granularity}{'-mixed' * bool(per_layer or per_node)}{start}-ft{args.epochs}"
    out = check_writable(args.out or Path("runs") / model_name(args.model) / f"{model_name(args.model)}-{label}-int.npz")
    data = _dataset(args, inputs)
    samples = checked_count("--calib-samples", args.calib_samples, len(data.train_images), "training images",
                            CALIBRATION_IMAGES)
    per_epoch = min(options.images or len(data.train_images), len(data.train_images))
    if options.batch_size > per_epoch:
        raise argparse.ArgumentTypeError(f"--batch-size {options.batch_size}: more than the {per_epoch:,} training "
                                         "images per epoch")
    name, model = load_float_model(args.model, data, args.cache, seed=args.seed, arch=args.arch, weights=args.weights)
    _log.info(f"{name}: {config.name}; calibrating on {samples:,} images, fine-tuning {args.epochs} epoch(s) on "
              f"{per_epoch:,} training images")
    metadata = provenance(args, args.model, name, Path(args.model) if args.model.endswith(".npz") else None)
    result = finetune_checkpoint(model, data, config, samples, args.seed, options, out, metadata, inputs.declared,
                                 control=args.float_control)
    measured = (f"no test split in {data.source}, so no accuracy measured" if result["after_accuracy"] is None else
                f"{config.name}, integer-only on {result['test_images']:,} test images: float "
                f"{result['float_accuracy']:.2f}%, before fine-tuning {result['before_accuracy']:.2f}%, after "
                f"{result['after_accuracy']:.2f}% ({result['finetune_seconds']:.0f} s)"
                + ("" if result["float_control_accuracy"] is None else
                   f"; float after the same fine-tuning, unquantized: {result['float_control_accuracy']:.2f}%"))
    print(f"{out}: {result['bytes']:,} bytes; {measured}")
    _save_json(json_target, {"model": args.model, "config": config.name, "calibration_images": samples, **result})
