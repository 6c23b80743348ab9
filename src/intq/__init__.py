"""intq: post-training quantization of PyTorch CNNs to integer-only inference.

One call, from a float model and calibration images (uint8 pixels, or float images under `input`):

    model_q = quantize(model, loader, input={"mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.243, 0.261)})

The four steps it runs, each public:

    graph = capture(model, example)                      # torch.fx -> supported ops, BN folded
    stats = collect_statistics(graph, float_batches)     # one streaming pass
    model_q = convert(graph, stats, RECOMMENDED)         # IntegerModel: int8/int32 + multipliers
    logits = run_integer(model_q, uint8_pixels)          # exact integer reference executor
    save(model_q, "model.npz"); load("model.npz")        # numpy .npz, no pickle

Learned rounding (AdaRound, BRECQ/QDrop) for weights below 8 bits, in the one call:

    quantize(model, loader, config=dataclasses.replace(RECOMMENDED, rounding=RoundingConfig("brecq")))
"""
__version__ = "0.2.0"  # before the imports: the model file records it

from intq.arith.preprocessing import Preprocessing
from intq.graph.capture import capture
from intq.graph.config import RECOMMENDED, STUDY, QConfig, RoundingConfig
from intq.graph.convert import collect_statistics, convert
from intq.executors.reference import run_integer
from intq.graph.integer_model import IntegerModel
from intq.graph.model_file import load, save
from intq.workflows.quantize_api import quantize

__all__ = ["quantize", "capture", "collect_statistics", "convert", "run_integer", "save", "load", "IntegerModel",
           "QConfig", "RoundingConfig", "Preprocessing", "RECOMMENDED", "STUDY"]
