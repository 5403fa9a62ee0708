"""secagg.py: the masks cancel in the sum, dropped devices' masks are rebuilt from shares, the
server's view of one update is noise, and tampering is caught."""

from __future__ import annotations

import pytest
import torch

from cotune.errors import ProtocolError
from cotune.secagg import (
    FIELD,
    Quantizer,
    SecAggClient,
    SecAggServer,
    combine_secret,
    neighbours,
    split_secret,
)

IDS = [f"device-{i}" for i in range(6)]


def protocol(degree, threshold, dropped=(), n=5000):
    clients = {u: SecAggClient(u, 3) for u in IDS}
    adv = {u: c.advertise() for u, c in clients.items()}
    server = SecAggServer(3, threshold, {u: [a["c_pk"], a["s_pk"]] for u, a in adv.items()},
                          neighbours(IDS, degree, b"seed"))  # fmt: skip
    inbox = server.route(
        {u: c.share(server.keys, server.nbrs[u], threshold) for u, c in clients.items()}
    )
    for u, c in clients.items():
        c.receive(inbox[u])
    q = Quantizer(0.1, 16)
    g = torch.Generator().manual_seed(0)
    x = {u: torch.randn(n, generator=g) * 0.02 for u in IDS}
    weights = {u: 10 + i for i, u in enumerate(IDS)}
    masked = {
        u: c.masked(q.encode(x[u], weights[u])) for u, c in clients.items() if u not in dropped
    }
    survived = sorted(masked)
    revealed = {u: clients[u].unmask(list(dropped), survived) for u in survived}
    total = server.unmasked_sum(masked, revealed, set(IDS))
    return q, x, weights, masked, survived, total


@pytest.mark.parametrize(("degree", "dropped"), [(None, ()), (None, ("device-2",)),
                                                  (4, ("device-1", "device-4"))])  # fmt: skip
def test_the_unmasked_sum_is_the_plain_sum_within_quantization(degree, dropped):
    q, x, w, _, survived, total = protocol(degree, 3, dropped)
    summed, weight = q.decode(total)
    want = sum(w[u] * x[u].double().clamp(-0.1, 0.1) for u in survived)
    assert weight == sum(w[u] for u in survived)
    # Each value is rounded by at most half a step, times its weight.
    assert (summed - want).abs().max() <= weight * 0.5 / q.scale + 1e-9


def test_the_server_cannot_read_one_update_from_what_it_receives():
    q, x, w, masked, _, _ = protocol(None, 3)
    y = masked["device-0"].double()
    # The masked vector is uniform over the field, uncorrelated with the update it hides...
    assert abs(float(y.mean()) / FIELD - 0.5) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([y[:-1], x["device-0"].double()]))[0, 1])) < 0.05
    # ... and decoding it alone gives noise, not the update.
    alone, _ = q.decode(masked["device-0"])
    assert (alone - w["device-0"] * x["device-0"].double()).abs().mean() > 100 * 0.02


def test_shares_need_the_threshold_and_a_device_never_reveals_both_secrets():
    secret = bytes(range(32))
    shares = split_secret(secret, 3, 5)
    assert combine_secret(shares[1:4]) == secret
    assert combine_secret(shares[:2]) != secret  # below the threshold: another secret
    c = SecAggClient("device-0", 1)
    with pytest.raises(ProtocolError, match="both secrets"):
        c.unmask(["device-1"], ["device-1"])
    server = SecAggServer(1, 3, {}, {})
    with pytest.raises(ProtocolError, match="2 shares of device-1's secret, 3 needed"):
        server._collect(
            "device-1", {"a": {"device-1": shares[0].hex()}, "b": {"device-1": shares[1].hex()}}
        )


def test_a_tampered_share_is_refused():
    clients = {u: SecAggClient(u, 1) for u in IDS[:3]}
    adv = {u: c.advertise() for u, c in clients.items()}
    keys = {u: [a["c_pk"], a["s_pk"]] for u, a in adv.items()}
    nbrs = neighbours(IDS[:3], None, b"s")
    out = {u: c.share(keys, nbrs[u], 2) for u, c in clients.items()}
    blob = bytearray(bytes.fromhex(out["device-0"]["device-1"]))
    blob[-1] ^= 1
    with pytest.raises(ProtocolError, match="failed to decrypt"):
        clients["device-1"].receive({"device-0": blob.hex()})


def test_sparse_neighbours_are_symmetric_and_of_the_asked_degree():
    ids = [f"device-{i}" for i in range(10)]
    nb = neighbours(ids, 4, b"x")
    assert all(len(v) == 4 for v in nb.values())
    assert all(u in nb[v] for u in ids for v in nb[u])
