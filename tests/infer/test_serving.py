"""Serving many devices (HAT): concurrent generations share one cloud that may batch them."""

from __future__ import annotations

import pytest

from cotune.infer.generate import UGenerator
from cotune.infer.serving import MEMORY_BPS, Cloud, middle_weight_bytes, serve
from cotune.infer.split import UCut
from cotune.infer.timeline import Timeline
from cotune.sim.profiles import get_profile
from tests.infer.test_generate import decoder, noisy_drafter

PHONE, JETSON, A100 = get_profile("phone-mid"), get_profile("jetson"), get_profile("a100")


@pytest.fixture(scope="module")
def traces():
    """Real generations: counted FLOPs and encoded bytes (chunked prefill, drafts rejected too)."""
    lm = decoder("gpt2", layers=4)
    gen = UGenerator(lm.anatomy, UCut(1, 1), drafter=noisy_drafter(lm.anatomy.hidden_size, 0.3),
                     gamma=3, prefill_chunk=4)  # fmt: skip
    out = {}
    for k, prompt in enumerate([[5, 9, 3, 7, 11, 2, 8, 4, 6, 10], [12, 3, 5, 7, 9, 2, 4]]):
        tl = Timeline(PHONE, A100)
        out[k] = gen.generate(prompt, 12, timeline=tl).trace, tl.token_times
    return lm, out


def test_one_device_without_batching_is_the_single_device_timeline(traces):
    _, out = traces
    for trace, times in out.values():
        res = serve({"device-0": trace}, {"device-0": PHONE}, Cloud(A100, batching=False))
        assert res["devices"]["device-0"]["token_times_s"] == pytest.approx(times, rel=1e-12)
        assert 0 < res["cloud_utilisation"] < 1 and res["max_batch_seen"] == 1


def test_a_shared_cloud_queues_and_batching_amortises_the_weight_reads(traces):
    lm, out = traces
    trace = out[0][0]
    n = 16
    names = [f"device-{i}" for i in range(n)]
    profiles = {d: (PHONE if i % 2 else JETSON) for i, d in enumerate(names)}
    # a cloud whose passes are memory-bound: each reads 2 GB of middle weights
    slow = Cloud(A100, weight_bytes=2e9, mem_bps=MEMORY_BPS["a100"], batching=False)
    fifo = serve({d: trace for d in names}, profiles, slow)
    alone = serve({"device-0": trace}, {"device-0": JETSON}, slow)
    batched = serve({d: trace for d in names}, profiles, Cloud(
        A100, weight_bytes=2e9, mem_bps=MEMORY_BPS["a100"], batching=True))  # fmt: skip
    # sharing a FIFO cloud slows every device down; batching wins most of it back
    assert fifo["tbt_s_mean"] > alone["tbt_s_mean"]
    assert batched["tbt_s_mean"] < fifo["tbt_s_mean"]
    assert batched["passes"] < fifo["passes"] and batched["mean_batch"] > 1
    assert batched["cloud_busy_s"] < fifo["cloud_busy_s"]
    assert all(len(v["token_times_s"]) == 12 for v in batched["devices"].values())
    assert 0 < batched["cloud_utilisation"] <= 1 and 0 < fifo["cloud_utilisation"] <= 1
    # compute-bound passes (no memory bound): batching saves no cloud time
    cb = serve({d: trace for d in names}, profiles, Cloud(A100, batching=True))
    cf = serve({d: trace for d in names}, profiles, Cloud(A100, batching=False))
    assert cb["cloud_busy_s"] == pytest.approx(cf["cloud_busy_s"])
    # the middle's weight bytes come from the model
    assert middle_weight_bytes(lm.anatomy, 1, 1) == sum(
        p.numel() * 4 for i in (1, 2) for p in lm.anatomy.blocks[i].parameters()
    )


def test_max_batch_is_respected_and_checked(traces):
    _, out = traces
    trace = out[1][0]
    names = [f"device-{i}" for i in range(8)]
    res = serve({d: trace for d in names}, {d: PHONE for d in names},
                Cloud(A100, weight_bytes=1e9, mem_bps=1e12, max_batch=3))  # fmt: skip
    assert res["max_batch_seen"] <= 3
    with pytest.raises(ValueError, match="max_batch"):
        serve({"device-0": trace}, {"device-0": PHONE}, Cloud(A100, max_batch=0))
