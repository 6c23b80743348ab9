"""What int8 buys: MACs counted from the captured graph, and energy and area estimated from a
published per-operation table.

Source: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
45 nm, 0.9 V; the 32-bit memory figures as tabulated from it by Han et al., "EIE", ISCA 2016.
Assumptions, stated in every report: a multiply-accumulate is one multiply at the operand width
plus one add at the accumulator width (int32 for integer models, float32 for float); weights and
activations live in on-chip SRAM (an 8 KB-class cache, 5 pJ per 32 bits; Net's weights fit) and
every weight is read once per image and every activation written once and read once; DRAM
(640 pJ per 32 bits) is shown for the case where the weights do not fit on chip.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from intq.graph.capture import Graph, run_float

ENERGY_PJ = {  # per operation (Horowitz 2014, 45 nm)
    "int8_add": 0.03, "int32_add": 0.1, "fp32_add": 0.9,
    "int8_mult": 0.2, "int32_mult": 3.1, "fp32_mult": 3.7,
    "sram_32bit": 5.0, "dram_32bit": 640.0,
}
AREA_UM2 = {  # per operator (Horowitz 2014, 45 nm)
    "int8_add": 36, "int32_add": 137, "fp32_add": 4184,
    "int8_mult": 282, "int32_mult": 3495, "fp32_mult": 7700,
}
SOURCE = ("Horowitz, ISSCC 2014 (45 nm): int8 add 0.03 pJ / 36 um2, int32 add 0.1 pJ / 137 um2, "
          "fp32 add 0.9 pJ / 4184 um2, int8 mult 0.2 pJ / 282 um2, int32 mult 3.1 pJ / 3495 um2, "
          "fp32 mult 3.7 pJ / 7700 um2; SRAM 5 pJ and DRAM 640 pJ per 32-bit access")


@dataclass(frozen=True)
class LayerCost:
    name: str
    params: int
    macs: int  # multiply-accumulates per image
    activations: int  # output values per image


def layer_costs(graph: Graph, input_shape: tuple[int, ...] = (3, 32, 32)) -> list[LayerCost]:
    """Per weighted layer: parameters and MACs per image, from output shapes of one float pass.

    conv: MACs = C_out * H_out * W_out * (C_in / groups) * k_h * k_w;  linear: out * in.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.no_grad():
        run_float(graph, torch.zeros(1, *input_shape), lambda name, value: shapes.__setitem__(name, tuple(value.shape)))
    costs = []
    for node in graph.weighted():
        weight = node.op.weight
        params = weight.numel() + (node.op.bias.numel() if node.op.bias is not None else 0)
        outputs = int(torch.tensor(shapes[node.name][1:]).prod())
        per_output = weight[0].numel()  # C_in/groups * k_h * k_w for a conv, in for a linear
        costs.append(LayerCost(node.name, params, outputs * per_output, outputs))
    return costs


def mac_energy_pj(bits: int | None) -> float:
    """Energy of one MAC: an int8 multiply + int32 add for integer models (<= 8-bit operands),
    an fp32 multiply + fp32 add for float (bits None)."""
    if bits is None:
        return ENERGY_PJ["fp32_mult"] + ENERGY_PJ["fp32_add"]
    return ENERGY_PJ["int8_mult"] + ENERGY_PJ["int32_add"]


def mac_area_um2(bits: int | None) -> float:
    """Silicon area of one MAC unit: the same multiply and add operators as mac_energy_pj."""
    if bits is None:
        return AREA_UM2["fp32_mult"] + AREA_UM2["fp32_add"]
    return AREA_UM2["int8_mult"] + AREA_UM2["int32_add"]


def model_costs(costs: list[LayerCost], weight_bits: int | None, activation_bits: int | None) -> dict:
    """Totals per image for one configuration (bits None: float32).

    memory traffic (bits) = weights * w_bits + activations * a_bits * 2 (written once, read once);
    energy = MACs * E_mac + traffic / 32 * E_access.
    """
    w_bits, a_bits = weight_bits or 32, activation_bits or 32
    macs = sum(c.macs for c in costs)
    weights = sum(c.params for c in costs)
    traffic_words = (weights * w_bits + sum(c.activations for c in costs) * a_bits * 2) / 32
    return {"params": weights, "macs": macs, "ideal_weight_bytes": weights * w_bits / 8,
            "arithmetic_uj": macs * mac_energy_pj(weight_bits) / 1e6,
            "sram_uj": traffic_words * ENERGY_PJ["sram_32bit"] / 1e6,
            "dram_weights_uj": weights * w_bits / 32 * ENERGY_PJ["dram_32bit"] / 1e6,
            "mac_area_um2": mac_area_um2(weight_bits)}


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_speed(forward, images: torch.Tensor) -> dict:
    """Latency of one image (median of 30) and throughput at batch 256 (median of 5)."""
    with torch.no_grad():
        latency = median_seconds(lambda: forward(images[:1]), 30)
        batch = images[:256]
        throughput = len(batch) / median_seconds(lambda: forward(batch), 5)
    return {"latency_ms_b1": latency * 1e3, "throughput_b256": throughput}
