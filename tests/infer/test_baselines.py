"""The baselines and the simulated timeline: same tokens as the model's own generate, costs
where each design puts them."""

from __future__ import annotations

import torch

from cotune.infer.baselines import cloud_only, device_only, small_draft_speculative
from cotune.infer.command import choose_prefill_chunk
from cotune.infer.generate import UGenerator
from cotune.infer.speculative import MiddleAdapter
from cotune.infer.split import UCut
from cotune.infer.timeline import Timeline
from cotune.sim.profiles import get_profile

from .test_generate import decoder

PHONE, A100 = get_profile("phone-mid"), get_profile("a100")


def test_baselines_generate_the_same_tokens_and_put_the_work_where_they_say():
    big, small = decoder("gpt2", layers=4), decoder("gpt2", layers=1, seed=7)
    prompt = list(range(2, 18))
    ref = big.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, 16:].tolist()  # fmt: skip
    runs = {}
    for name, fn in {
        "cloud": lambda tl: cloud_only(big.anatomy, prompt, 10, timeline=tl),
        "device": lambda tl: device_only(big.anatomy, prompt, 10, timeline=tl),
        "spec": lambda tl: small_draft_speculative(big.anatomy, small.anatomy, prompt, 10,
                                                   gamma=3, timeline=tl),  # fmt: skip
        "ushape": lambda tl: UGenerator(big.anatomy, UCut(1, 1), gamma=0).generate(
            prompt, 10, timeline=tl),
        "hat": lambda tl: UGenerator(big.anatomy, UCut(1, 1), drafter=MiddleAdapter(
            big.anatomy.hidden_size), gamma=3).generate(prompt, 10, timeline=tl),
    }.items():  # fmt: skip
        tl = Timeline(PHONE, A100)
        out = fn(tl)
        assert out.tokens == ref, name
        assert len(tl.token_times) == 10 and tl.token_times == sorted(tl.token_times), name
        runs[name] = (out, tl.summary())
    cloud, device = runs["cloud"][1], runs["device"][1]
    assert cloud["device_flops"] == 0 and device["cloud_flops"] == 0 and device["bytes_up"] == 0
    # The same model's work: the cloud-only run counts what the device-only run counts.
    assert cloud["cloud_flops"] == device["device_flops"]
    u = runs["ushape"][1]
    # Split or not, the same work: the U-shaped sides add up to the whole model's FLOPs.
    assert u["device_flops"] + u["cloud_flops"] == device["device_flops"]
    assert 0 < u["cloud_flops"] < u["device_flops"]  # 2 of 4 blocks, but also the head
    # Token-level links carry ids; the U-shaped split carries hidden states.
    assert runs["ushape"][0].link.bytes_up > 10 * runs["cloud"][0].link.bytes_up
    assert runs["spec"][0].drafted > 0 and runs["hat"][0].decode_rounds < 9


def test_the_prefill_chunk_is_chosen_by_simulated_time_to_first_token():
    lm = decoder("llama", layers=3)
    gen = UGenerator(lm.anatomy, UCut(1, 1), gamma=0)
    best, ttft = choose_prefill_chunk(gen, list(range(2, 42)), PHONE, A100)
    assert set(ttft) == {40, 20, 10} and best == min(ttft, key=ttft.get)
    assert gen.prefill_chunk is None  # left as it was


def test_parallel_drafting_overlaps_drafting_with_verification_when_the_guess_holds():
    lm = decoder("gpt2", layers=4)
    # An untrained drafter on a random model is accepted nearly always: guesses hold.
    gen = UGenerator(lm.anatomy, UCut(1, 1), drafter=MiddleAdapter(lm.anatomy.hidden_size), gamma=3)
    prompt = list(range(2, 14))
    serial, parallel = Timeline(PHONE, A100), Timeline(PHONE, A100, parallel_drafting=True)
    a = gen.generate(prompt, 16, timeline=serial)
    b = gen.generate(prompt, 16, timeline=parallel)
    assert a.tokens == b.tokens and any(s.guessed for s in a.trace)
    assert serial.token_times[0] == parallel.token_times[0]  # the prefill is the same
    assert parallel.token_times[-1] < serial.token_times[-1]
    assert serial.device_flops == parallel.device_flops  # same work, earlier
    kinds = [s.kind for s in a.trace]
    assert kinds[0] == "prefill" and set(kinds[1:]) <= {"speculative", "plain"}
    assert sum(s.tokens for s in a.trace) == 16
