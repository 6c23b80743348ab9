"""Hostile options and checkpoints (issue 10): each gets one clear line from the real CLI, before any
work, and nothing is written where nothing should be.

Every case builds its input beside a shared tiny image folder, runs `intq ...` in-process (run_cli:
no traceback, exactly one `intq: error:` line), and checks the message fragment. A case that must
write nothing snapshots its workspace before and after: every file and folder the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import write_image_folder
from hostile import Hostile, run_cli
from intq.cifar.models import ARCHITECTURES
from intq.cifar.train import save_weights

CASES = [
    Hostile("checkpoint-truncated", "the checkpoint .npz cut to its first 3,000 bytes",
            "not a readable .npz checkpoint (File is not a zip file)"),
    Hostile("checkpoint-missing-array", "the checkpoint lacks param.fc1.weight", "missing array 'param.fc1.weight'"),
    Hostile("checkpoint-wrong-shape", "param.fc1.weight holds 10 rows instead of 120",
            "'param.fc1.weight' has shape (10, 400), a Net needs (120, 400)"),
    Hostile("checkpoint-wrong-dtype", "param.fc1.weight stored as int32", "'param.fc1.weight' is int32, a Net needs float32"),
    Hostile("checkpoint-other-architecture", "a ResNet-20 checkpoint quantized as --arch Net",
            "is not a parameter of a Net (another architecture?)"),
    Hostile("checkpoint-corrupt-array", "one byte flipped inside fc1's array (the zip's CRC no longer matches)",
            "array 'param.fc1.weight' is unreadable (Bad CRC-32"),
    Hostile("checkpoint-nan-weight", "one NaN in fc2's weights", "layer 'fc2': weight has 1 NaN/Inf values"),
    Hostile("checkpoint-missing", "quantize names a checkpoint that does not exist", "no such file: "),
    Hostile("model-missing-eval", "eval names a model file that does not exist", "no such file: "),
    Hostile("model-missing-verify", "verify names a model file that does not exist", "no such file: "),
    Hostile("model-is-a-folder", "export-c is given a folder as MODEL.npz", "is not a file"),
    Hostile("sweep-model-missing", "sweep --model names a checkpoint that does not exist", "no such file: "),
    Hostile("calib-samples-zero", "quantize --calib-samples 0", "--calib-samples must be at least 1, got 0"),
    Hostile("calib-samples-negative", "quantize --calib-samples -5 (used 395 images before)",
            "--calib-samples must be at least 1, got -5"),
    Hostile("calib-samples-too-many", "quantize --calib-samples 500 with 40 training images",
            "--calib-samples 500: there are only 40 training images"),
    Hostile("sweep-calib-samples-zero", "sweep --calib-samples 0", "--calib-samples must be at least 1, got 0"),
    Hostile("nsigma-nan", "--method 'nsigma(nan)' (crashed before)", "nsigma(k) needs a finite k with 0 < k <= 1000, got nan"),
    Hostile("nsigma-negative", "--method 'nsigma(-3)' (a 10% model with exit 0 before)",
            "nsigma(k) needs a finite k with 0 < k <= 1000, got -3.0"),
    Hostile("percentile-over-100", "--method 'percentile(200)' (accepted before)",
            "percentile(p) needs 50 < p <= 100 (the share of values kept, in %), got 200.0"),
    Hostile("method-bad-argument", "--method 'mse(3)': mse takes no argument", "only nsigma(K) and percentile(P) take an argument"),
    Hostile("method-not-a-number", "sweep --methods 'percentile(high)'", "--methods: range method 'percentile(high)': 'high' is not a number"),
    Hostile("wbits-out-of-range", "quantize --method mse --wbits 9", "--wbits: bit widths must be 2..8, got 9"),
    Hostile("abits-out-of-range", "quantize --method mse --abits 40", "--abits: bit widths must be 2..8, got 40"),
    Hostile("sweep-wbits-out-of-range", "sweep --wbits 8,1", "--wbits: bit widths must be 2..8, got [8, 1]"),
    Hostile("sensitivity-bits-out-of-range", "sensitivity --bits 1", "--bits: bit widths must be 2..8, got 1"),
    Hostile("bits-with-a-preset", "quantize --wbits 4 without --method (silently ignored before)",
            "--wbits: only with --method (a sweep cell)"),
    Hostile("layer-bits-unknown-layer", "sweep --layer-bits bogus=4 (exit 0 with an all-error report before)",
            "--layer-bits: per-layer bits name unknown layers bogus"),
    Hostile("layer-bits-no-name", "sweep --layer-bits =4", "--layer-bits: expected LAYER=BITS, got '=4'"),
    Hostile("layer-bits-twice", "sweep --layer-bits conv1=4,conv1=8", "--layer-bits: layer conv1 named more than once"),
    Hostile("sweep-cell-fails", "every sweep cell fails to convert (fc3 bias 1e9 overflows int32): report written, exit 2",
            "1 of 1 cells failed; first minmax per-channel W8A8: layer 'fc3': bias does not fit int32"),
    Hostile("verify-images-zero", "verify --images 0 (crashed before)", "--images must be at least 1, got 0"),
    Hostile("verify-images-negative", "verify --images -3 (used 197 images before)", "--images must be at least 1, got -3"),
    Hostile("verify-images-too-many", "verify --images 1000 with 20 test images", "--images 1000: there are only 20 test images"),
    Hostile("export-c-images-zero", "export-c --images 0", "--images must be at least 1, got 0"),
    Hostile("inspect-images-zero", "inspect --images 0", "--images must be at least 1, got 0"),
    Hostile("max-drop-negative", "sensitivity --max-drop -1", "--max-drop must be at least 0, got -1.0"),
    Hostile("max-drop-nan", "sensitivity --max-drop nan", "--max-drop must be at least 0, got nan"),
    Hostile("train-epochs-zero", "train --epochs 0", "--epochs must be at least 1, got 0"),
    Hostile("train-batch-size-zero", "train --batch-size 0", "--batch-size must be at least 1, got 0"),
    Hostile("train-lr-nan", "train --lr nan", "--lr must be a finite number above 0, got nan"),
    Hostile("train-out-under-a-file", "train --out FILE/net.npz: refused before any training",
            "is not a folder"),
    Hostile("quantize-out-is-a-folder", "quantize --out names an existing folder", "is a folder; expected a file"),
    Hostile("quantize-disk-full", "the disk fills while quantize writes its .npz (ENOSPC)",
            "No space left on device"),
    Hostile("weights-times-1e-38", "every weight of a NetWithBias x 1e-38 (bincount crashed in the observers "
            "before); its fc3 bias now names the real problem", "layer 'fc3': bias does not fit int32"),
    Hostile("dead-activations", "a ResNet-20 whose first BatchNorm bias is -100: a constant-zero activation "
            "range converts with a sane scale", "integer-only"),
]


@dataclass(frozen=True)
class Inputs:
    """Shared inputs (outside each case's workspace) and the CLI's --data/--cache arguments."""

    root: Path
    common: list[str]

    @property
    def net(self) -> Path:
        return self.root / "net.npz"


@dataclass(frozen=True)
class Build:
    argv: Callable[[Inputs, Path], list]  # (inputs, workspace) -> argv, after crafting any file in workspace
    code: int = 2
    writes: bool = False  # False: the workspace must be byte-for-byte the same afterwards
    prepare: Callable[[Path, pytest.MonkeyPatch], None] | None = None  # e.g. make the disk full


def _crafted(inputs: Inputs, work: Path, change: Callable[[dict], dict]) -> Path:
    arrays = dict(np.load(inputs.net))
    path = work / "crafted.npz"
    np.savez(path, **change(arrays))
    return path


def _quantize(checkpoint, inputs: Inputs, work: Path, *options, arch="Net") -> list:
    return ["quantize", checkpoint, "--arch", arch, "--out", work / "out.npz", *options, *inputs.common]


def _truncated(inputs: Inputs, work: Path) -> Path:
    path = work / "truncated.npz"
    path.write_bytes(inputs.net.read_bytes()[:3000])
    return path


def _flipped(inputs: Inputs, work: Path) -> Path:
    data = bytearray(inputs.net.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside fc1's 192,000 bytes, the largest array
    path = work / "flipped.npz"
    path.write_bytes(bytes(data))
    return path


def _nan_weight(arrays: dict) -> dict:
    weight = arrays["param.fc2.weight"].copy()
    weight[0, 0] = np.nan
    return {**arrays, "param.fc2.weight": weight}


def _saved(work: Path, arch: str, change: Callable[[torch.nn.Module], None] = lambda model: None) -> Path:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    with torch.no_grad():
        change(model)
    path = work / f"{arch}.npz"
    save_weights(model, [(1, 0, 1.0)], path)
    return path


def _tiny_weights(model) -> None:
    for name, parameter in model.named_parameters():
        if name.endswith("weight"):
            parameter.mul_(1e-38)


def _dead_first_layer(model) -> None:
    model.bn.bias.fill_(-100.0)


def _disk_full(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing any file opened in `work` raises ENOSPC, as on a full disk."""
    import errno
    import os

    from intq import files

    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if "w" in mode and str(work) in os.readlink(f"/proc/self/fd/{fd}"):
            def write(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            handle.write = write
        return handle

    monkeypatch.setattr(files.os, "fdopen", fdopen)


def _sweep(inputs: Inputs, work: Path, *options) -> list:
    return ["sweep", "--out", work / "sweep", "--methods", "minmax", "--wbits", "8", "--abits", "8", *options,
            *inputs.common]


def _model(inputs: Inputs) -> Path:
    return inputs.root / "model.npz"


BUILDS: dict[str, Build] = {
    "checkpoint-truncated": Build(lambda i, w: _quantize(_truncated(i, w), i, w)),
    "checkpoint-missing-array": Build(lambda i, w: _quantize(_crafted(
        i, w, lambda a: {k: v for k, v in a.items() if k != "param.fc1.weight"}), i, w)),
    "checkpoint-wrong-shape": Build(lambda i, w: _quantize(_crafted(
        i, w, lambda a: {**a, "param.fc1.weight": a["param.fc1.weight"][:10]}), i, w)),
    "checkpoint-wrong-dtype": Build(lambda i, w: _quantize(_crafted(
        i, w, lambda a: {**a, "param.fc1.weight": a["param.fc1.weight"].astype(np.int32)}), i, w)),
    "checkpoint-other-architecture": Build(lambda i, w: _quantize(_saved(w, "resnet20"), i, w)),
    "checkpoint-corrupt-array": Build(lambda i, w: _quantize(_flipped(i, w), i, w)),
    "checkpoint-nan-weight": Build(lambda i, w: _quantize(_crafted(i, w, _nan_weight), i, w)),
    "checkpoint-missing": Build(lambda i, w: _quantize(w / "nothing.npz", i, w)),
    "model-missing-eval": Build(lambda i, w: ["eval", w / "nothing.npz", *i.common]),
    "model-missing-verify": Build(lambda i, w: ["verify", w / "nothing.npz", *i.common]),
    "model-is-a-folder": Build(lambda i, w: ["export-c", w, "--out", w / "c", *i.common]),
    "sweep-model-missing": Build(lambda i, w: _sweep(i, w, "--model", w / "nothing.npz")),
    "calib-samples-zero": Build(lambda i, w: _quantize(i.net, i, w, "--calib-samples", 0)),
    "calib-samples-negative": Build(lambda i, w: _quantize(i.net, i, w, "--calib-samples", -5)),
    "calib-samples-too-many": Build(lambda i, w: _quantize(i.net, i, w, "--calib-samples", 500)),
    "sweep-calib-samples-zero": Build(lambda i, w: _sweep(i, w, "--calib-samples", 0)),
    "nsigma-nan": Build(lambda i, w: _quantize(i.net, i, w, "--method", "nsigma(nan)")),
    "nsigma-negative": Build(lambda i, w: _quantize(i.net, i, w, "--method", "nsigma(-3)")),
    "percentile-over-100": Build(lambda i, w: _quantize(i.net, i, w, "--method", "percentile(200)")),
    "method-bad-argument": Build(lambda i, w: _quantize(i.net, i, w, "--method", "mse(3)")),
    "method-not-a-number": Build(lambda i, w: _sweep(i, w, "--methods", "percentile(high)")),
    "wbits-out-of-range": Build(lambda i, w: _quantize(i.net, i, w, "--method", "mse", "--wbits", 9)),
    "abits-out-of-range": Build(lambda i, w: _quantize(i.net, i, w, "--method", "mse", "--abits", 40)),
    "sweep-wbits-out-of-range": Build(lambda i, w: _sweep(i, w, "--wbits", "8,1")),
    "sensitivity-bits-out-of-range": Build(lambda i, w: ["sensitivity", "--bits", 1, "--out", w / "s", *i.common]),
    "bits-with-a-preset": Build(lambda i, w: _quantize(i.net, i, w, "--wbits", 4)),
    "layer-bits-unknown-layer": Build(lambda i, w: _sweep(i, w, "--layer-bits", "bogus=4")),
    "layer-bits-no-name": Build(lambda i, w: _sweep(i, w, "--layer-bits", "=4")),
    "layer-bits-twice": Build(lambda i, w: _sweep(i, w, "--layer-bits", "conv1=4,conv1=8")),
    "sweep-cell-fails": Build(lambda i, w: _sweep(i, w, "--model", _saved(
        w, "NetWithBias", lambda m: m.fc3.bias.fill_(1e9)), "--arch", "NetWithBias"), writes=True),
    "verify-images-zero": Build(lambda i, w: ["verify", _model(i), "--images", 0, *i.common]),
    "verify-images-negative": Build(lambda i, w: ["verify", _model(i), "--images", -3, *i.common]),
    "verify-images-too-many": Build(lambda i, w: ["verify", _model(i), "--images", 1000, *i.common]),
    "export-c-images-zero": Build(lambda i, w: ["export-c", _model(i), "--images", 0, "--out", w / "c", *i.common]),
    "inspect-images-zero": Build(lambda i, w: ["inspect", "--images", 0, "--out", w / "i", *i.common]),
    "max-drop-negative": Build(lambda i, w: ["sensitivity", "--max-drop", -1, "--out", w / "s", *i.common]),
    "max-drop-nan": Build(lambda i, w: ["sensitivity", "--max-drop", "nan", "--out", w / "s", *i.common]),
    "train-epochs-zero": Build(lambda i, w: ["train", "--epochs", 0, "--out", w / "t.npz", *i.common]),
    "train-batch-size-zero": Build(lambda i, w: ["train", "--batch-size", 0, "--out", w / "t.npz", *i.common]),
    "train-lr-nan": Build(lambda i, w: ["train", "--lr", "nan", "--out", w / "t.npz", *i.common]),
    "train-out-under-a-file": Build(lambda i, w: ["train", "--arch", "Net", "--out", i.net / "t.npz", *i.common]),
    "quantize-out-is-a-folder": Build(lambda i, w: ["quantize", i.net, "--arch", "Net", "--out", w, *i.common]),
    "quantize-disk-full": Build(lambda i, w: _quantize(i.net, i, w), prepare=_disk_full),
    "weights-times-1e-38": Build(lambda i, w: _quantize(_saved(w, "NetWithBias", _tiny_weights), i, w,
                                                        arch="NetWithBias")),
    "dead-activations": Build(lambda i, w: _quantize(_saved(w, "resnet20", _dead_first_layer), i, w,
                                                     arch="resnet20"), code=0, writes=True),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    from intq import save
    from intq.graph.config import RECOMMENDED
    from intq.graph.convert import convert
    from conftest import calibrated, make_pixels

    root = tmp_path_factory.mktemp("hostile-cli")
    data = write_image_folder(root / "data", train_per_class=4, test_per_class=2)
    torch.manual_seed(0)
    net = ARCHITECTURES["Net"]().eval()
    save_weights(net, [(1, 0, 1.0)], root / "net.npz")
    save(convert(*calibrated(net, make_pixels(8)), RECOMMENDED), root / "model.npz")
    return Inputs(root, ["--data", data, "--cache", root / "cache"])


def _state(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_every_case_has_a_build():
    assert sorted(BUILDS) == sorted(case.id for case in CASES)
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_hostile_cli_input(case: Hostile, inputs: Inputs, tmp_path, monkeypatch):
    build = BUILDS[case.id]
    argv = build.argv(inputs, tmp_path)
    if build.prepare:
        build.prepare(tmp_path, monkeypatch)
    before = _state(tmp_path)
    result = run_cli(argv)
    assert result.code == build.code, result.err
    assert case.expected in (result.err if build.code else result.out), result.err
    if not build.writes:
        assert _state(tmp_path) == before
