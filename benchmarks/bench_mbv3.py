"""The reference executor on the MobileNetV3-style example (issue 13): its throughput against PyTorch
float at batch 256 (median of --repeats rounds, the two timed in turn in one process), and the time of
each lookup-table activation against the layer whose output it reads (each op timed alone over the
batch, in the reference's chunks). Issue 13's bars: reference >= 0.5x float; the tables cost no more
than the layers they follow. Run by hand after `intq quantize` wrote the integer model:

    .venv/bin/python benchmarks/bench_mbv3.py --model examples/mobilenet_v3.py:cifar \
        --weights examples/mobilenet_v3.pt --int-model mobilenet_v3.npz --data DIR [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench_executors import interleaved_medians
from intq.executors.reference import CHUNK, pixels_to_input, run_integer, run_op
from intq.graph.integer_model import IntegerModel, QLookup
from intq.graph.model_file import load
from intq.workflows.subject import InputOptions, inputs_for, load_data
from intq.workflows.user_model import load_user_model


def op_medians(model: IntegerModel, pixels: torch.Tensor, repeats: int) -> dict[str, float]:
    """{op name: median seconds over `repeats` rounds} of each op run alone (no fusion) on `pixels`,
    in the reference's chunks of CHUNK images, summed over the chunks."""
    rounds: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for _ in range(repeats):
            totals: dict[str, float] = defaultdict(float)
            for chunk in pixels.split(CHUNK):
                values = {model.input_name: pixels_to_input(chunk, model)}
                for op in model.layers:
                    inputs = [values[name] for name in op.inputs]
                    start = time.perf_counter()
                    values[op.name] = run_op(op, *inputs)
                    totals[op.name] += time.perf_counter() - start
            for name, seconds in totals.items():
                rounds[name].append(seconds)
    return {name: statistics.median(values) for name, values in rounds.items()}


def lookup_rows(model: IntegerModel, seconds: dict[str, float]) -> list[dict]:
    """One row per lookup op: its time and that of the op whose output it reads."""
    return [{"lookup": op.name, "kind": op.kind, "follows": op.inputs[0], "lookup_s": seconds[op.name],
             "follows_s": seconds[op.inputs[0]]} for op in model.layers if isinstance(op, QLookup)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="examples/mobilenet_v3.py:cifar")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--int-model", type=Path, required=True, help="the .npz intq quantize wrote for --model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", default=".cache/intq")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    integer = load(args.int_model)
    model = load_user_model(args.model, args.weights)
    data = load_data(args.data, args.cache, inputs_for(integer, InputOptions()))
    batch = data.test_images[:256]
    preprocessing = integer.input.preprocessing
    with torch.no_grad():
        seconds = interleaved_medians({"PyTorch float32": lambda: model(preprocessing.apply(batch)),
                                       "intq reference": lambda: run_integer(integer, batch)}, args.repeats)
    ops = op_medians(integer, batch, args.repeats)
    lookups = lookup_rows(integer, ops)
    ratio = seconds["PyTorch float32"] / seconds["intq reference"]
    lookup_total, follows_total, all_ops = (sum(row["lookup_s"] for row in lookups),
                                            sum(row["follows_s"] for row in lookups), sum(ops.values()))
    print(f"{args.model}, {args.threads} threads, batch 256, median of {args.repeats}")
    for label, value in seconds.items():
        print(f"  {label:<18}{value:>8.3f} s/batch {len(batch) / value:>8.0f} img/s")
    print(f"  reference / float throughput: {ratio:.2f}x (bar: >= 0.5x)")
    print(f"ops alone (unfused, {len(ops)} ops): {all_ops:.3f} s; lookup tables {lookup_total:.3f} s "
          f"({100 * lookup_total / all_ops:.1f}%), the layers they follow {follows_total:.3f} s "
          f"({100 * follows_total / all_ops:.1f}%); tables / layers = {lookup_total / follows_total:.2f} (bar: <= 1)")
    for row in lookups:
        print(f"  {row['lookup']:<28}{row['kind']:<12}{row['lookup_s'] * 1e3:>8.1f} ms  after {row['follows']:<28}"
              f"{row['follows_s'] * 1e3:>8.1f} ms")
    print(json.dumps({"model": args.model, "threads": args.threads, "seconds": seconds, "ratio": ratio,
                      "lookup_s": lookup_total, "follows_s": follows_total, "ops_s": all_ops, "lookups": lookups}))


if __name__ == "__main__":
    main()
