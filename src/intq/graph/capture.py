"""torch.fx trace -> a flat graph of the ops intq supports, with BatchNorm folded into its conv (or a layer).

The captured graph (captured_graph.py, its names re-exported here) is plain data: a list of
`Node(name, op, inputs)` in execution order, ops being small dataclasses that hold float weights.
`run_float` executes it; `capture` checks that it reproduces the original module on an example input,
so a mis-captured model fails loudly.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing, PreprocessingError
from intq.graph.capture_activations import (ACTIVATION_FUNCTIONS, ELEMENTWISE_MODULES, INPLACE_CLAMPS, INPLACE_RELUS,
                                            Activation, ReLU, activation_call, activation_module, clamp_call,
                                            is_inplace)
from intq.graph.capture_rewrites import (DROPOUT_FUNCTIONS, AdaptiveAvgPool2d, Refused, Tracer, adaptive_pool,
                                         batchnorm_affine, conv_padding, dropout_call, flatten_call, flatten_dims,
                                         fold_replication, identity_module, mean_call, pool_window, replication_factor)
from intq.graph.capture_joins import JOINS, Add, Concat, Mul, join_call, operand_nodes  # noqa: F401
from intq.graph.capture_channels import ChannelGather, ChannelMoves  # noqa: F401 (ChannelGather: for convert)
from intq.graph.captured_graph import (REQUANTIZING, WEIGHTED, AvgPool2d, Conv2d, Flatten, Graph, Identity,  # noqa: F401
                                       Linear, MaxPool2d, Node, Op, apply_op, max_pool, run_float, with_users)


class CaptureError(Exception):
    """The model cannot be captured; the message names every offending node."""


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _from_module(module: nn.Module) -> Op | Refused | None:
    """The captured op of a leaf module, Refused(why) or None when unsupported."""
    if isinstance(module, nn.Conv2d):
        padding = conv_padding(module)
        if isinstance(padding, Refused):
            return padding
        bias = None if module.bias is None else module.bias.detach().clone()
        return Conv2d(module.weight.detach().clone(), bias, _pair(module.stride), _pair(padding),
                      _pair(module.dilation), module.groups)
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach().clone()
        return Linear(module.weight.detach().clone(), bias)
    if isinstance(module, ELEMENTWISE_MODULES):
        return activation_module(module)
    if isinstance(module, nn.AvgPool2d) and module.padding in (0, (0, 0)) and not module.ceil_mode:
        kernel = _pair(module.kernel_size)
        return AvgPool2d(kernel, _pair(module.stride) if module.stride is not None else kernel)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return AvgPool2d(None) if module.output_size in (1, (1, 1)) else adaptive_pool(module.output_size)
    if isinstance(module, nn.MaxPool2d) and (module.dilation not in (1, (1, 1)) or module.return_indices):
        return Refused(f"dilation={module.dilation}, return_indices={module.return_indices} "
                       f"(only dilation 1 without indices)")
    if isinstance(module, nn.MaxPool2d):
        stride = module.stride if module.stride is not None else module.kernel_size
        return MaxPool2d(_pair(module.kernel_size), _pair(stride), _pair(module.padding), bool(module.ceil_mode))
    if isinstance(module, nn.Flatten):
        return flatten_dims(module.start_dim, module.end_dim) or Flatten()
    if isinstance(module, nn.Identity):
        return Identity()
    identity = identity_module(module)
    if identity:
        return Identity() if identity is True else identity
    return None


def _from_call(node: torch.fx.Node) -> Op | tuple[Op, ...] | Refused | None:
    """The captured op(s) of a call_function / call_method node, Refused(why) or None when unsupported."""
    target = node.target
    if target in (F.relu, torch.relu, "relu", *INPLACE_RELUS):
        return ReLU()
    if target is F.relu6:
        return ReLU(6.0)
    if target in (torch.clamp, "clamp", F.hardtanh, *INPLACE_CLAMPS):
        return clamp_call(node)
    if target in ACTIVATION_FUNCTIONS:
        return activation_call(node)
    joined = join_call(node)  # add, cat, mul (capture_joins)
    if joined is not None:
        return joined
    if target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return AvgPool2d(None) if size in (1, (1, 1)) else adaptive_pool(size)
    if target in (torch.mean, "mean"):
        return _from_mean(node)
    if target is F.avg_pool2d and len(node.args) >= 2 and not node.kwargs:
        kernel = _pair(node.args[1])
        return AvgPool2d(kernel, _pair(node.args[2]) if len(node.args) > 2 else kernel)
    if target in (torch.flatten, "flatten"):
        return flatten_call(node) or Flatten()
    if target in ("view", "reshape"):
        return Flatten()  # without an example (trace alone): checked when the capture is verified
    if target is F.max_pool2d:
        return max_pool_call(node)
    if target in DROPOUT_FUNCTIONS:
        identity = dropout_call(node)
        return Identity() if identity is True else identity
    return None


def max_pool_call(node: torch.fx.Node) -> MaxPool2d | Refused:
    """F.max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False), by position or keyword."""
    values = dict(zip(("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                      node.args))
    values.update(node.kwargs)
    if values.get("dilation", 1) not in (1, (1, 1)) or values.get("return_indices"):
        return Refused(f"dilation={values.get('dilation', 1)}, return_indices={values.get('return_indices', False)} "
                       f"(only dilation 1 without indices)")
    kernel = _pair(values["kernel_size"])
    stride = values.get("stride")
    return MaxPool2d(kernel, _pair(stride) if stride else kernel, _pair(values.get("padding", 0)),
                     bool(values.get("ceil_mode", False)))


def _from_mean(node: torch.fx.Node) -> tuple[Op, ...] | Refused:
    """A mean over (H, W): a global average pool, then a flatten to (N, C) when keepdim=False."""
    form = mean_call(node)
    if isinstance(form, Refused):
        return form
    return (AvgPool2d(None),) if form == "keepdim" else (AvgPool2d(None), Flatten())


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.name} ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


def trace(model: nn.Module, example: torch.Tensor | None = None) -> Graph:
    """Symbolically trace `model` into a Graph; BatchNorm2d after a Conv2d (BatchNorm1d after a Linear) is
    folded into it, any other as a depthwise 1x1 Conv2d (a diagonal Linear) of its own. With an `example`
    input, shape arithmetic and channel chains are resolved on it (capture_channels.py)."""
    try:
        traced = torch.fx.GraphModule(model, Tracer().trace(model))
    except Exception as err:  # fx raises many types; the user needs the reason and the model
        raise CaptureError(f"{type(model).__name__} is not traceable by torch.fx: {err}") from None
    modules = dict(traced.named_modules())
    moves = ChannelMoves(traced, example) if example is not None else None
    nodes, unsupported, input_name, output_name = [], [], None, None
    aliases: dict[str, str] = {}  # a folded BatchNorm's output is its conv's output; an identity chain its start
    for fx_node in traced.graph.nodes:
        if fx_node.op == "placeholder":
            input_name = fx_node.name
            continue
        if fx_node.op == "output":
            unsupported += _chain_ends(moves, [fx_node.args[0]], nodes, aliases, modules)
            output_name = aliases.get(fx_node.args[0].name, fx_node.args[0].name)
            continue
        if moves.is_step(fx_node) if moves else (
                fx_node.op == "call_method" and fx_node.target == "size" or fx_node.target is operator.getitem):
            continue  # shape arithmetic (x.size(0), c // g) or a step of a channel chain
        bn = modules.get(fx_node.target) if fx_node.op == "call_module" else None
        affine = batchnorm_affine(bn) if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) else None
        if isinstance(affine, tuple) and _fold_batchnorm(nodes, fx_node, affine,
                                                         Conv2d if isinstance(bn, nn.BatchNorm2d) else Linear):
            aliases[fx_node.name] = aliases.get(fx_node.args[0].name, fx_node.args[0].name)
            continue
        if affine is not None:
            op = affine if isinstance(affine, Refused) else _batchnorm_layer(bn, affine)
        else:
            op = _from_module(modules[fx_node.target]) if fx_node.op == "call_module" else (
                _from_call(fx_node) if fx_node.op in ("call_function", "call_method") else None)
        if op is None or isinstance(op, Refused):
            unsupported.append(_describe(fx_node, modules) + (f": {op.reason}" if op else ""))
            continue
        operands = operand_nodes(fx_node)
        unsupported += _chain_ends(moves, operands, nodes, aliases, modules)
        sources = tuple(aliases.get(a.name, a.name) for a in operands)
        _append(nodes, fx_node.name, op, sources if isinstance(op, JOINS) else sources[:1])
        if operands and is_inplace(fx_node, modules):  # later readers of the overwritten operand read this node
            aliases[operands[0].name] = fx_node.name
    if unsupported:
        raise CaptureError(f"{type(model).__name__}: unsupported operations: " + "; ".join(unsupported))
    return with_users(Graph(input_name, nodes, output_name))


def _chain_ends(moves: ChannelMoves | None, operands: list[torch.fx.Node], nodes: list[Node], aliases: dict[str, str],
                modules: dict[str, nn.Module]) -> list[str]:
    """Capture each channel chain an op reads (capture_channels.py): an identity is an alias of its first
    tensor, a flatten or a move of channels a node under its last name; returns the refusals."""
    refusals = []
    for end, root, move in moves.ends(operands) if moves else ():
        if isinstance(move, Refused):
            refusals.append(f"{_describe(end, modules)}: {move.reason}")
        elif move == "identity":
            aliases[end.name] = aliases.get(root, root)
        else:
            nodes.append(Node(end.name, Flatten() if move == "flatten" else move, (aliases.get(root, root),)))
    return refusals


def _append(nodes: list[Node], name: str, op: Op | tuple[Op, ...], inputs: tuple[str, ...]) -> None:
    """One node, or a chain of them for a rewrite into several ops (the last one keeps the fx name)."""
    ops = op if isinstance(op, tuple) else (op,)
    for index, step in enumerate(ops):
        step_name = name if index == len(ops) - 1 else f"{name}_{type(step).__name__.lower()}"
        nodes.append(Node(step_name, step, inputs))
        inputs = (step_name,)


def resolve_adaptive_pools(graph: Graph, example: torch.Tensor, model_name: str) -> None:
    """Turn each AdaptiveAvgPool2d into AvgPool2d(kernel = stride = in/out) at the example's sizes (the
    first place they are known), or, for an output size a multiple of the input's, into an identity whose
    replication is folded into the flatten + Linear reading it (eq. 32); else refuse naming both sizes.
    Likewise refuse a product of operand shapes intq does not multiply (Mul.shape_problem)."""
    if not any(isinstance(node.op, (AdaptiveAvgPool2d, Mul)) for node in graph.nodes):
        return
    values = {graph.input_name: example}
    for node in graph.nodes:
        if isinstance(node.op, Mul) and (problem := node.op.shape_problem(*(values[name].shape for name in node.inputs))):
            raise CaptureError(f"{model_name}: {node.name} (mul): {problem}")
        inputs = [values[name] for name in node.inputs]
        if isinstance(node.op, AdaptiveAvgPool2d):
            window = pool_window(node.op, inputs[0].shape)
            factor = replication_factor(node.op, inputs[0].shape) if isinstance(window, str) else None
            if factor is not None:
                _fold_replication(graph, node, tuple(inputs[0].shape[1:]), factor, model_name)
            elif isinstance(window, str):
                raise CaptureError(f"{model_name}: {node.name} (AdaptiveAvgPool2d): {window}")
            node.op = Identity() if factor is not None else AvgPool2d(window, window)
        values[node.name] = apply_op(node.op, *inputs)


def _fold_replication(graph: Graph, node: Node, shape: tuple[int, int, int], factor: tuple[int, int],
                      model_name: str) -> None:
    """Fold the replication of `node` (an AdaptiveAvgPool2d to a multiple of its (C, H, W) input) into the
    Linear after its flatten (and any identities): its weight's replicated columns summed (eq. 32)."""
    chain, reader = [], node.name
    while len(graph.users[reader]) == 1 and isinstance(graph.node(graph.users[reader][0]).op, (Flatten, Identity)):
        reader = graph.users[reader][0]
        chain.append(graph.node(reader).op)
    users = graph.users[reader]
    if not any(isinstance(op, Flatten) for op in chain) or len(users) != 1 or \
            not isinstance(graph.node(users[0]).op, Linear):
        sizes = tuple(size * f for size, f in zip(shape[1:], factor))
        raise CaptureError(f"{model_name}: {node.name} (AdaptiveAvgPool2d): output size {sizes} is a multiple of the "
                           f"input size {shape[1:]}, a replication intq folds only into a flatten then one Linear; "
                           f"here it is read by {', '.join(users) or 'the output'}")
    linear = graph.node(users[0]).op
    linear.weight = fold_replication(linear.weight, shape[0], shape[1:], factor)


def _fold_batchnorm(nodes: list[Node], fx_node: torch.fx.Node, affine: tuple[torch.Tensor, torch.Tensor],
                    layer: type) -> bool:
    """Fold BN (y = a x + b, eq. 13) into the `layer` (Conv2d for BatchNorm2d, Linear for BatchNorm1d) that
    produced its input and nothing else; the layer keeps its name. w' = a w per output channel, b' = a b + b_bn."""
    source = fx_node.args[0]
    producer = next((n for n in nodes if n.name == source.name), None)
    if producer is None or not isinstance(producer.op, layer) or len(source.users) != 1:
        return False
    factor, shift = affine
    weight = producer.op.weight
    bias = producer.op.bias if producer.op.bias is not None else torch.zeros_like(factor)
    producer.op.weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))  # (C_out,) -> (C_out, 1, ...)
    producer.op.bias = bias * factor + shift
    return True


def _batchnorm_layer(bn: nn.Module, affine: tuple[torch.Tensor, torch.Tensor]) -> Conv2d | Linear:
    """A BatchNorm with no layer to fold into, as the exact float layer computing y = a x + b (eq. 13):
    BatchNorm2d a depthwise 1x1 Conv2d (weight a as (C, 1, 1, 1), groups C), BatchNorm1d a Linear with
    the diagonal weight diag(a)."""
    factor, shift = affine
    if isinstance(bn, nn.BatchNorm2d):
        return Conv2d(factor.reshape(-1, 1, 1, 1).clone(), shift.clone(), groups=factor.numel())
    return Linear(torch.diag(factor), shift.clone())


def capture(model: nn.Module, example: torch.Tensor, preprocessing: Preprocessing = STUDY_PREPROCESSING) -> Graph:
    """trace(model), then prove on `example` that the graph computes what the model computes.

    `preprocessing` is how the model's float input comes from uint8 pixels (eq. 25; default: the
    study's (p/255 - 0.5)/0.5); the graph keeps it for calibration and conversion. An `example` of
    uint8 pixels is preprocessed with it; a float one is used as it is (it only proves the graph)."""
    model = model.eval()
    if example.dtype == torch.uint8:
        example = _preprocessed(preprocessing, example)
    with torch.no_grad():
        try:
            expected = model(example)
        except RuntimeError as err:  # a wrong input shape: name the layer, what it expects and what it got
            _check_input_shape(trace(model), example, type(model).__name__)
            raise CaptureError(f"{type(model).__name__} fails on input of shape {tuple(example.shape)}: "
                               f"{_first_line(err)}") from None
    graph = trace(model, example)  # shape arithmetic and channel chains resolved on the example
    graph.preprocessing = preprocessing
    _check_weights_finite(graph)
    with torch.no_grad():
        try:
            resolve_adaptive_pools(graph, example, type(model).__name__)
            got = run_float(graph, example)
        except RuntimeError as err:
            raise CaptureError(f"{type(model).__name__}: captured graph fails on the example input ({err}); "
                               f"is every view/reshape a flatten of all but the batch dimension?") from None
    if not graph_agrees(got, expected):
        raise CaptureError(f"{type(model).__name__}: captured graph disagrees with the model; "
                           f"is every view/reshape a flatten of all but the batch dimension?")
    return graph


def graph_agrees(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether the captured graph's float output is the model's up to float32 rounding: the same shape
    and |got - expected| <= 1e-4 + 1e-4 |expected| + 1e-3 max|expected| elementwise. The last term
    scales with the output: folding BatchNorm reorders float32 sums, and a deep network amplifies those
    differences (ResNet-50 with random weights: 2.3e-4 on logits of magnitude 1.6), while a wrong
    view, op or wiring moves the output by a share of its range, far beyond 1e-3 of it."""
    if got.shape != expected.shape:
        return False
    tolerance = 1e-4 + 1e-4 * expected.abs() + 1e-3 * expected.abs().max()
    return bool(((got - expected).abs() <= tolerance).all())


def _preprocessed(preprocessing: Preprocessing, pixels: torch.Tensor) -> torch.Tensor:
    try:
        return preprocessing.apply(pixels)
    except PreprocessingError as err:
        raise CaptureError(f"the example input: {err}") from None


def _check_weights_finite(graph: Graph) -> None:
    for node in graph.weighted():
        for label, tensor in (("weight", node.op.weight), ("bias", node.op.bias)):
            if tensor is not None and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise CaptureError(f"layer {node.name!r}: {label} has {bad} NaN/Inf values")


def expected_input(op: Op, x: torch.Tensor) -> str | None:
    """What a conv or linear layer needs of its input `x`, when `x` does not provide it, else None:
    a conv needs (N, C_in, H, W) with C_in = weight.shape[1] * groups and H, W at least the dilated
    kernel after padding; a linear needs (N, in_features) with in_features = weight.shape[1]."""
    if isinstance(op, Conv2d):
        channels = op.weight.shape[1] * op.groups
        if x.dim() != 4 or x.shape[1] != channels:
            return f"expects (N, {channels}, H, W), got {tuple(x.shape)}"
        for size, kernel, pad, dilation, axis in zip(x.shape[2:], op.weight.shape[2:], op.padding, op.dilation, "HW"):
            if size + 2 * pad < dilation * (kernel - 1) + 1:
                return f"needs {axis} >= {dilation * (kernel - 1) + 1 - 2 * pad}, got {tuple(x.shape)}"
    if isinstance(op, Linear) and (x.dim() != 2 or x.shape[1] != op.weight.shape[1]):
        return f"expects (N, {op.weight.shape[1]}), got {tuple(x.shape)}"
    return None


def _check_input_shape(graph: Graph, example: torch.Tensor, model_name: str) -> None:
    """Run the graph on `example` (which the model itself failed on), naming the first layer whose
    input has the wrong shape, and the model's input shape, instead of a raw torch error."""
    values = {graph.input_name: example}
    for node in graph.nodes:
        inputs = [values[name] for name in node.inputs]
        problem = expected_input(node.op, inputs[0])
        if problem is not None:
            raise CaptureError(f"{model_name}: layer {node.name!r} {problem} "
                               f"(from an input of shape {tuple(example.shape)})")
        try:
            values[node.name] = apply_op(node.op, *inputs)
        except RuntimeError as err:
            raise CaptureError(f"{model_name}: layer {node.name!r} fails on an input of shape "
                               f"{tuple(example.shape)}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
