"""MACs from the captured graph match a hand count; energy and area follow the cited table."""
import pytest
import torch

from intq.graph.capture import capture
from intq.workflows.costs import ENERGY_PJ, layer_costs, mac_area_um2, model_costs
from intq.cifar.models import Net, NetWithBias


def test_net_macs_match_the_hand_count():
    costs = layer_costs(capture(Net(), torch.randn(1, 3, 32, 32)))
    assert [c.macs for c in costs] == [6 * 28 * 28 * 75, 16 * 10 * 10 * 150, 48_000, 10_080, 840]
    assert sum(c.params for c in costs) == 61_770


def test_bias_counts_as_parameters():
    costs = layer_costs(capture(NetWithBias(), torch.randn(1, 3, 32, 32)))
    assert costs[-1].params == 850


def test_int8_model_costs_follow_the_table():
    costs = layer_costs(capture(Net(), torch.randn(1, 3, 32, 32)))
    float_costs, int8_costs = model_costs(costs, None, None), model_costs(costs, 8, 8)
    assert float_costs["ideal_weight_bytes"] == 4 * int8_costs["ideal_weight_bytes"] == 4 * 61_770
    macs = 651_720
    assert int8_costs["arithmetic_uj"] == pytest.approx(macs * (ENERGY_PJ["int8_mult"] + ENERGY_PJ["int32_add"]) / 1e6)
    assert float_costs["arithmetic_uj"] == pytest.approx(macs * 4.6 / 1e6)
    assert mac_area_um2(None) / mac_area_um2(8) == pytest.approx((7700 + 4184) / (282 + 137))
