"""PyTorch's own post-training static quantization of a float model: the peer `intq compare` measures
intq against, on the same float model and the same uint8 calibration images.

The peer is torchao's pt2e flow, PyTorch's current PTQ path: `torch.export` (batch dimension
dynamic), `prepare_pt2e` with `X86InductorQuantizer` and its default config (activations uint8 per
tensor over the full 0..255, histogram observers; weights int8 per output channel, symmetric; conv + BN
folded), calibration, `convert_pt2e`. Without reduce_range its oneDNN kernels may saturate int16 pair
sums on a CPU without VNNI (AVX2 only), as intq's `torch_quantized` notes say of its own. The converted model runs quantize/dequantize around float ops (int8 simulated);
`torch.compile` (inductor, with freezing) pattern-matches those into oneDNN int8 convolutions and
linears, which is how pt2e is deployed, so the compiled model is the one timed and scored. torch.ao's
FX mode (deprecated) runs only where pt2e cannot (torchao absent, a model torch.export refuses), and the
row says why.
"""
from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx

from intq.arith.preprocessing import STUDY_PREPROCESSING
from intq.extras import require

PT2E_ROW = "torchao pt2e (X86InductorQuantizer)"
FX_ROW = "torch.ao int8 (x86, FX)"
CALIBRATION_BATCH = 500


class PeerError(Exception):
    """Neither pt2e nor FX could quantize the model (names both reasons)."""


@dataclass
class Peer:
    """One compare row's model: `forward` maps uint8 pixels to logits; `bytes` is its serialized tensors."""

    row: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    bytes: int
    notes: list[str] = field(default_factory=list)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of `tensors` as torch.save writes them (compare's measure for the float and PyTorch int8 models)."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return len(buffer.getvalue())


def state_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes(module.state_dict())


def graph_tensors(graph_module: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors the graph reads (its get_attr nodes): a converted pt2e model keeps the float
    weights it no longer uses as parameters, so its state_dict would overstate its size."""
    state = graph_module.state_dict()
    return {node.target: state[node.target] for node in graph_module.graph.nodes
            if node.op == "get_attr" and node.target in state}


def calibrate(model: Callable[[torch.Tensor], torch.Tensor], calibration: torch.Tensor, normalize) -> None:
    """Run the observed model on every calibration image, CALIBRATION_BATCH at a time."""
    with torch.no_grad():
        for start in range(0, len(calibration), CALIBRATION_BATCH):
            model(normalize(calibration[start : start + CALIBRATION_BATCH]))


def pt2e_quantize(model: torch.nn.Module, calibration: torch.Tensor,
                  normalize=STUDY_PREPROCESSING.apply) -> torch.fx.GraphModule:
    """torchao pt2e static PTQ with X86InductorQuantizer's default config, calibrated on the uint8
    `calibration` images (normalized as the float model expects): convert_pt2e's model."""
    with _quiet_torch_logs():  # torchao's import logs a torch deprecation notice of its own
        flow = require("torchao.quantization.pt2e.quantize_pt2e", "intq compare's torchao pt2e row")
        x86 = require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "intq compare's torchao pt2e row")
    example = normalize(calibration[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model.eval(), (example,),
                                       dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = flow.prepare_pt2e(exported, quantizer)
        calibrate(prepared, calibration, normalize)
        return flow.convert_pt2e(prepared)


def compiled_int8(converted: torch.fx.GraphModule, normalize, batch_sizes: Iterable[int],
                  channels_and_size: tuple[int, ...]) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """(forward on uint8 pixels, compile seconds): the converted model under torch.compile with
    inductor's freezing, which lowers its quantize/dequantize patterns to oneDNN int8 kernels;
    compiled here for each of `batch_sizes` (every shape compare runs), so later calls only run."""
    compiled = torch.compile(converted)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return compiled(normalize(pixels))

    start = time.perf_counter()
    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        for size in sorted(set(batch_sizes)):
            forward(torch.zeros((size, *channels_and_size), dtype=torch.uint8))
    return forward, time.perf_counter() - start


def pt2e_peer(model: torch.nn.Module, calibration: torch.Tensor, normalize, batch_sizes: Iterable[int],
              compile_model: bool = True) -> Peer:
    """The pt2e row: compiled to int8 kernels when torch.compile works (and `compile_model`), else the
    converted model in eager, said so."""
    converted = pt2e_quantize(model, calibration, normalize)
    size = tensor_bytes(graph_tensors(converted))
    eager = Peer(PT2E_ROW, lambda pixels: converted(normalize(pixels)), size,
                 ["eager: quantize/dequantize around float ops (int8 simulated, not int8 speed)"])
    if not compile_model:
        return eager
    try:
        forward, seconds = compiled_int8(converted, normalize, batch_sizes, tuple(calibration.shape[1:]))
    except Exception as error:  # noqa: BLE001 -- any compiler failure leaves the eager model, said so
        eager.notes.append(f"torch.compile failed: {first_line(error)}")
        return eager
    return Peer(PT2E_ROW, forward, size, [f"torch.compile (inductor, freezing): oneDNN int8 kernels, "
                                          f"compiled in {seconds:.0f} s for batch sizes {sorted(set(batch_sizes))}"])


def fx_peer(model: torch.nn.Module, calibration: torch.Tensor, normalize, why: str) -> Peer:
    """torch.ao FX mode (deprecated), the fallback where pt2e cannot run; `why` names the reason."""
    ao_model = torch_ao_quantize(model, calibration, normalize)
    return Peer(FX_ROW, on_x86_engine(ao_model, normalize), state_bytes(ao_model),
                [f"fallback: torchao pt2e could not run ({why})"])


def peer_quantize(model: torch.nn.Module, calibration: torch.Tensor, normalize, batch_sizes: Iterable[int],
                  compile_model: bool = True) -> Peer:
    """PyTorch's PTQ of `model`: pt2e, else (torchao absent, export or pt2e refusing the model) FX;
    PeerError when neither can."""
    try:
        return pt2e_peer(model, calibration, normalize, batch_sizes, compile_model)
    except Exception as error:  # noqa: BLE001 -- the reason goes into the row's note
        why = first_line(error)
    try:
        return fx_peer(model, calibration, normalize, why)
    except Exception as error:  # noqa: BLE001 -- both reasons go into one line
        raise PeerError(f"PyTorch's own quantization cannot take this model: torchao pt2e: {why}; "
                        f"torch.ao FX: {first_line(error)}") from None


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Torch's own loggers at ERROR for the duration (torchao's import and inductor log warnings that
    are not the user's concern)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def reshape_views(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The model traced with every .view turned into .reshape: torch.ao's quantized convolutions
    return channels-last tensors, on which the study's `x.view(-1, 400)` fails."""
    traced = torch.fx.symbolic_trace(model)
    for node in traced.graph.nodes:
        if node.op == "call_method" and node.target == "view":
            node.target = "reshape"
    traced.recompile()
    return traced


def torch_ao_quantize(model: torch.nn.Module, calibration: torch.Tensor, normalize=STUDY_PREPROCESSING.apply) -> torch.nn.Module:
    """torch.ao FX post-training static quantization with the x86 qconfig, calibrated on uint8 images."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao announces its own deprecation on every call
        example = normalize(calibration[:2])
        prepared = prepare_fx(reshape_views(model.eval()), get_default_qconfig_mapping("x86"), (example,))
        calibrate(prepared, calibration, normalize)
        return convert_fx(prepared)


def on_x86_engine(ao_model: torch.nn.Module, normalize=STUDY_PREPROCESSING.apply):
    """torch.ao's model on uint8 pixels, run under the engine it was converted for (another
    executor may have selected a different one)."""
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = "x86"
        return ao_model(normalize(pixels))
    return forward
