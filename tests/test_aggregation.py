import math
import subprocess
import sys

import pytest
import torch

from cotune.aggregation import (
    coordinate_median,
    get_aggregator,
    proximal_loss,
    trimmed_mean,
    weighted_average,
)
from cotune.errors import ConfigError, ProtocolError

X = {"w": torch.tensor([1.0, 2.0])}
U = [{"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([5.0, 1.0])}]
W = [1, 3]
AVG = [4.25, 1.75]  # (1·[2, 4] + 3·[5, 1]) / 4


def vals(state):
    return state["w"].tolist()


def test_weighted_average_and_fedavg_lr1_is_exact():
    assert vals(weighted_average(U, W)) == AVG
    assert vals(weighted_average(U)) == [3.5, 2.5]
    rng = torch.Generator().manual_seed(0)
    ups = [
        {"a": torch.randn(5, 3, generator=rng), "b": torch.randn(4, generator=rng)}
        for _ in range(3)
    ]
    g = {"a": torch.randn(5, 3, generator=rng) * 1e6, "b": torch.randn(4, generator=rng)}
    out = get_aggregator("fedavg").aggregate(g, ups, [3, 1, 7])
    ref = weighted_average(ups, [3, 1, 7])
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    hand = (3 * ups[0]["a"].double() + ups[1]["a"].double() + 7 * ups[2]["a"].double()) / 11
    assert torch.allclose(out["a"].double(), hand, atol=1e-6)
    assert vals(get_aggregator("fedavg", eta=0.5).aggregate(X, U, W)) == [2.625, 1.875]


def test_fedavgm_two_steps():
    agg = get_aggregator("fedavgm", eta=1.0, momentum=0.9)
    g1 = [1 - 4.25, 2 - 1.75]
    x1 = agg.aggregate(X, U, W)
    assert vals(x1) == pytest.approx([1 - g1[0], 2 - g1[1]])  # v = g: plain FedAvg
    x2 = agg.aggregate(x1, U, W)  # g2 = 0, v = 0.9·g1
    assert vals(x2) == pytest.approx([x - 0.9 * g for x, g in zip(vals(x1), g1)])


def fedopt_by_hand(rule, eta=0.1, b1=0.9, b2=0.99, tau=1e-3):
    x, m, v, out = [1.0, 2.0], [0.0, 0.0], [tau**2, tau**2], []
    for _ in range(2):
        for i in range(2):
            g = x[i] - AVG[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            if rule == "adagrad":
                v[i] = v[i] + g * g
            elif rule == "adam":
                v[i] = b2 * v[i] + (1 - b2) * g * g
            else:  # yogi
                v[i] = v[i] - (1 - b2) * g * g * math.copysign(1.0, v[i] - g * g)
            x[i] = x[i] - eta * m[i] / (math.sqrt(v[i]) + tau)
        out.append(list(x))
    return out


@pytest.mark.parametrize(
    "name, rule", [("fedadam", "adam"), ("fedyogi", "yogi"), ("fedadagrad", "adagrad")]
)
def test_adaptive_server_optimizers_first_two_steps(name, rule):
    agg = get_aggregator(name, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x1 = agg.aggregate(X, U, W)
    x2 = agg.aggregate(x1, U, W)
    want = fedopt_by_hand(rule)
    assert vals(x1) == pytest.approx(want[0], rel=1e-6)
    assert vals(x2) == pytest.approx(want[1], rel=1e-6)
    sd = agg.state_dict()
    again = get_aggregator(name, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    again.load_state_dict(sd)
    assert torch.equal(again.aggregate(x2, U, W)["w"], agg.aggregate(x2, U, W)["w"])


def test_robust_aggregators_resist_an_outlier():
    ups = [{"w": torch.tensor([v, -v])} for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    assert vals(coordinate_median(ups)) == [3.0, -3.0]
    assert vals(coordinate_median(ups[1:])) == [3.5, -3.5]  # even count: mean of the middle two
    assert vals(trimmed_mean(ups, 0.2)) == [3.0, -3.0]  # drops 1 and 1000
    g = {"w": torch.zeros(2)}
    assert vals(get_aggregator("median").aggregate(g, ups)) == [3.0, -3.0]
    assert vals(get_aggregator("trimmed_mean", beta=0.2).aggregate(g, ups, [1, 1, 1, 1, 99])) == [
        3.0,
        -3.0,
    ]
    with pytest.raises(ProtocolError, match="leaves nothing"):
        trimmed_mean(ups[:2], 0.5)


def test_proximal_loss():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = proximal_loss({"w": w}, {"w": torch.zeros(2)}, mu=0.1)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert w.grad.tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(ProtocolError, match="no global value"):
        proximal_loss({"v": w}, {"w": w}, 0.1)


def test_registry_and_input_errors():
    with pytest.raises(ConfigError, match=r"unknown aggregator 'fedsgd' \(known: fedavg, fedavgm"):
        get_aggregator("fedsgd")
    with pytest.raises(
        ConfigError, match=r"fedadam: unknown option\(s\) momentum \(allowed: eta, beta1"
    ):
        get_aggregator("fedadam", momentum=0.9)
    with pytest.raises(ConfigError, match="tau"):
        get_aggregator("fedyogi", tau=0)
    with pytest.raises(ProtocolError, match="update 1: keys differ"):
        weighted_average([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])
    with pytest.raises(ProtocolError, match="shape"):
        get_aggregator("fedavg").aggregate(X, [{"w": torch.zeros(3)}])
    with pytest.raises(ProtocolError, match="weights"):
        weighted_average(U, [0, 0])


def test_import_does_not_pull_transformers():
    code = (
        "import cotune.aggregation, cotune.sim.profiles, sys; print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
