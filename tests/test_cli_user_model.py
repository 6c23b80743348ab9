"""Every command on a user's own model file, weights and image folder, outside the repository
(issue 12): `intq quantize --model my_model.py:gray --weights my.pt --data my_images/`."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile import Hostile, run_cli

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.py"  # README's user-model example
GRAY = ("--size", "20", "--channels", "1", "--mean", "0.45", "--std", "0.22")


def _images(folder, count, side, seed, sizes=None):
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("test", count // 2)):
        for label in ("cats", "dogs"):
            (folder / split / label).mkdir(parents=True)
            for index in range(n):
                shape = sizes[index % len(sizes)] if sizes else (side, side)
                base = 60 if label == "cats" else 180
                pixels = np.clip(rng.normal(base, 40, (*shape, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / split / label / f"{index:03d}.png")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """README's example model file (examples/small_cnn.py), its weights and an image folder (mixed 24x24 and 30x26 RGB images), all outside the repository."""
    root = tmp_path_factory.mktemp("user")
    shutil.copy(EXAMPLE, root / "my_model.py")
    namespace = {}
    exec(compile(EXAMPLE.read_text(), "my_model.py", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["gray"]()
    with torch.no_grad():  # BatchNorm statistics other than the initial 0 and 1
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), root / "my.pt")
    _images(root / "my_images", 16, 24, 0, sizes=[(24, 24), (30, 26)])
    return root


def _quantize(user, *extra):
    return run_cli(["quantize", "--model", user / "my_model.py:gray", "--weights", user / "my.pt",
                    "--data", user / "my_images", *GRAY, "--cache", user / "cache", *extra])


def test_quantize_eval_verify_export_on_a_user_model_and_folder(user, tmp_path):
    out = tmp_path / "m.npz"
    result = _quantize(user, "--out", out, "--json", tmp_path / "q.json")
    assert result.code == 0, result.err
    assert "x = (p/255 - mean)/std, mean 0.45, std 0.22" in result.err and "on 16 test images" in result.out
    from intq.graph.model_file import load
    model = load(out)
    assert model.input.shape == (1, 20, 20) and model.input.preprocessing.mean == (0.45,)
    evaluated = run_cli(["eval", out, "--data", user / "my_images", "--cache", user / "cache"])
    assert evaluated.code == 0 and "on 16 images" in evaluated.out, evaluated.err  # size and channels from the model
    verified = run_cli(["verify", out, "--data", user / "my_images", "--cache", user / "cache",
                        "--executors", "c", "onnx_exact"])
    assert verified.code == 0 and verified.out.count("differing 0.0000%") == 2, verified.out + verified.err
    exported = run_cli(["export-c", out, "--out", tmp_path / "c", "--data", user / "my_images", "--cache", user / "cache"])
    assert exported.code == 0 and (tmp_path / "c" / "model.h").is_file(), exported.err
    onnx = run_cli(["export-onnx", out, "--out", tmp_path / "m.onnx"])
    assert onnx.code == 0 and "(N, 1, 20, 20)" in onnx.out, onnx.err


def test_a_flat_folder_calibrates_without_a_test_split(user, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((user / "my_images" / "train" / "cats").glob("*.png"))[:6]:
        shutil.copy(path, flat / path.name)
    result = run_cli(["quantize", "--model", user / "my_model.py:gray", "--weights", user / "my.pt", "--data", flat,
                      *GRAY, "--cache", tmp_path / "cache", "--out", tmp_path / "m.npz"])
    assert result.code == 0 and "no test split" in result.out, result.err
    assert (tmp_path / "m.npz").is_file()


CASES = [
    Hostile("user-factory-missing", "--model my_model.py:nope, a factory the file does not define", "no 'nope' in"),
    Hostile("user-weights-other-model", "--weights of the 1-channel model given to the 3-channel factory", "does not fit"),
    Hostile("user-weights-pickle", "--weights a whole pickled nn.Module (torch.save(model))", "not a plain state_dict"),
    Hostile("user-mixed-sizes", "an image folder of 24x24 and 26x30 images without --size", "pass --size"),
    Hostile("user-no-images", "--data an empty folder", "no images"),
    Hostile("user-mean-channels", "--mean with 2 values for 1-channel images", "names 2 channels"),
]
CHANGES = {"user-factory-missing": {"--model": "my_model.py:nope"}, "user-weights-other-model": {"--model": "my_model.py:rgb"},
           "user-weights-pickle": {"--weights": "pickled.pt"}, "user-mixed-sizes": {"--size": None},
           "user-no-images": {"--data": "empty"}, "user-mean-channels": {"--mean": "0.5 0.5"}}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_user_input_is_one_line_and_writes_nothing(user, tmp_path, case):
    (tmp_path / "empty").mkdir()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    options = {"--model": "my_model.py:gray", "--weights": "my.pt", "--data": "my_images", "--size": "20",
               "--channels": "1", "--mean": "0.45", "--std": "0.22", **CHANGES[case.id]}
    argv = ["quantize"]
    for option, value in options.items():
        if value is None:
            continue
        base = tmp_path if value in ("empty", "pickled.pt") else user
        words = value.split()
        argv += [option, *(str(base / w) if option in ("--model", "--weights", "--data") else w for w in words)]
    result = run_cli([*argv, "--cache", tmp_path / "cache", "--out", tmp_path / "out" / "m.npz"])
    assert result.code == 2 and case.expected in result.err, result.err
    assert not (tmp_path / "out").exists()


def test_mean_and_std_are_refused_with_a_study_model(tmp_path):
    result = run_cli(["sweep", "--model", "Net", "--mean", "0.4", "--std", "0.2", "--out", tmp_path / "s"])
    assert result.code == 2 and "trained on the study's" in result.err
