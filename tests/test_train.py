"""The training recipe: our momentum SGD is torch.optim.SGD bit for bit; training is seeded."""
import pytest
import torch
import torch.nn.functional as F

from intq.cifar.models import Net
from intq.threads import intra_op_threads
from intq.cifar.train import (ClassifierRecipe, MomentumSGD, Recipe, accuracy, load_weights, save_weights,
                              train, train_classifier, weights_key)


@pytest.mark.parametrize("foreach", [True, False], ids=["SGD-foreach", "SGD-for-loop"])
def test_momentum_sgd_is_bit_identical_to_torch_sgd(foreach):
    """MomentumSGD (public Tensor.mul_/add_) against both of torch.optim.SGD's implementations."""
    torch.manual_seed(0)
    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    torch.manual_seed(1)
    ours, theirs = Net(), Net()
    theirs.load_state_dict(ours.state_dict())
    mine = MomentumSGD(list(ours.parameters()), lr=0.01, momentum=0.9)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, foreach=foreach)
    for step in range(10):
        x, y = images[4 * step : 4 * step + 4], labels[4 * step : 4 * step + 4]
        for model, optimizer in ((ours, mine), (theirs, reference)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), Net().parameters()))  # it trained


def test_training_calls_no_private_torch_function():
    """No torch._name in the training module's code (private calls break across PyTorch releases)."""
    import ast
    import inspect

    from intq.cifar import train as train_module

    tree = ast.parse(inspect.getsource(train_module))
    private = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.startswith("__") and ast.unparse(node.value).startswith("torch")]
    assert private == []


def test_training_is_seeded_logs_like_the_study_and_learns():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (400,))
    images = torch.randn(400, 3, 32, 32) * 0.3 + labels.float().reshape(-1, 1, 1, 1) / 5  # learnable
    runs, lines = [], []
    for _ in range(2):
        torch.manual_seed(5)
        model = Net()
        losses = train(model, images, labels, Recipe(epochs=2, log_every=50), seed=7, log=lines.append)
        runs.append((model, losses))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()))
    assert lines[0] == "[1,    50] loss: %.3f" % runs[0][1][0][2]
    assert runs[0][1][-1][2] < runs[0][1][0][2]


def test_weights_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = Net()
    save_weights(model, [(1, 2000, 2.2)], tmp_path / "w.npz")
    restored = Net()
    assert load_weights(restored, tmp_path / "w.npz") == [(1, 2000, 2.2)]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    assert load_weights(Net(), tmp_path / "missing.npz") is None


def test_accuracy_is_a_percentage():
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 50.0


def _learnable(count: int):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return torch.randn(count, 3, 32, 32, generator=generator) * 0.3 + labels.float().reshape(-1, 1, 1, 1) / 5, labels


def test_training_runs_on_the_recipes_threads_whatever_the_callers_count():
    images, labels = _learnable(200)
    weights = []
    for caller_threads in (1, 2):
        with intra_op_threads(caller_threads):
            torch.manual_seed(5)
            model = Net()
            train(model, images, labels, Recipe(epochs=1, log_every=10**9), seed=7, log=lambda line: None)
            assert torch.get_num_threads() == caller_threads
        weights.append(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_the_thread_count_is_part_of_the_weights_cache_key():
    assert weights_key("Net", Recipe(threads=1), 0, "data") != weights_key("Net", Recipe(threads=2), 0, "data")
    assert weights_key("Net", Recipe(), 0, "data") == weights_key("Net", Recipe(threads=1), 0, "data")


def test_intra_op_threads_restores_the_count_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with intra_op_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_classifier_training_records_its_thread_count():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    torch.manual_seed(0)
    history = train_classifier(Net(), images, labels, ClassifierRecipe(epochs=1, batch_size=8, threads=1), seed=0,
                               log=lambda line: None)
    assert history[0]["threads"] == 1
    history = train_classifier(Net(), images, labels, ClassifierRecipe(epochs=1, batch_size=8), seed=0,
                               log=lambda line: None)
    assert history[0]["threads"] == torch.get_num_threads()


def test_an_altered_or_truncated_weights_cache_is_not_used(tmp_path):
    """The weights cache carries a SHA-256 of its arrays: a changed value or a cut file means train again."""
    import numpy as np

    from intq.cifar.train import load_weights, save_weights

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    path = tmp_path / "w.npz"
    save_weights(model, [(0, 1, 0.5)], path)
    assert load_weights(torch.nn.Linear(4, 2), path) == [(0, 1, 0.5)]
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["param.weight"] = arrays["param.weight"] + 1e-3
    np.savez(path, **arrays)
    assert load_weights(torch.nn.Linear(4, 2), path) is None
    path.write_bytes(path.read_bytes()[:100])
    assert load_weights(torch.nn.Linear(4, 2), path) is None


def test_a_weights_cache_without_logged_losses_round_trips(tmp_path):
    """An empty array (no loss logged yet) hashes like any other: the cache is used, not refused."""
    from intq.cifar.train import load_weights, save_weights

    torch.manual_seed(0)
    save_weights(torch.nn.Linear(4, 2), [], tmp_path / "w.npz")
    assert load_weights(torch.nn.Linear(4, 2), tmp_path / "w.npz") == []
