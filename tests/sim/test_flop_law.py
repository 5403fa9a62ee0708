"""The FlopCounter's learned FLOP law must reproduce torch's own count exactly."""

import torch

from cotune.config import ModelSection, PeftSection
from cotune.flops import flop_counter
from cotune.models import load_model, task_loss
from cotune.peft import inject_adapters
from cotune.sim.costs import FlopCounter


def exact(fn, *args):
    with flop_counter() as mode:
        fn(*args)
    return int(mode.get_total_flops())


def test_learned_law_matches_counted_flops_for_new_shapes():
    for family, task in (("bert", "classification"), ("gpt2", "causal_lm"), ("llama", "causal_lm")):
        loaded = load_model(
            ModelSection(name_or_path=f"random:{family}", task=task), num_labels=3, vocab_size=300
        )
        inject_adapters(
            loaded.model,
            PeftSection(target_modules=[".*(query|value|c_attn|q_proj|v_proj)$"]),
            anatomy=loaded.anatomy,
            head_paths=loaded.anatomy.head_paths(),
        )
        forward = loaded.anatomy.full()

        def step(ids, forward=forward, task=task):
            logits = forward(ids, torch.ones_like(ids))
            labels = (
                torch.zeros(ids.shape[0], dtype=torch.long) if task == "classification" else ids
            )
            task_loss(logits, labels, task).backward()

        counter = FlopCounter()
        for shape in ((4, 9), (4, 17), (2, 11), (3, 5), (2, 6)):  # four to solve, one to verify
            ids = torch.randint(2, 300, shape)
            counter.run("k", step, ids, dims=shape)
        assert counter.has_law("k"), family
        for shape in ((5, 13), (8, 31), (1, 2)):
            ids = torch.randint(2, 300, shape)
            _, predicted = counter.run("k", step, ids, dims=shape)
            assert predicted == exact(step, ids), (family, shape)


def test_no_law_without_dims_or_when_verification_fails():
    counter = FlopCounter()
    weird = {(1, 1): 5, (2, 1): 7, (1, 2): 11, (3, 3): 1}
    for dims, flops in weird.items():
        counter._learn("w", dims, flops)
    assert not counter.has_law("w")


def test_padding_free_law_counts_real_tokens_and_matches_counted_flops():
    """A padding-free step's FLOPs depend on its real tokens N, not only on its shape: the
    law over (B, T, N) predicts torch's count, and batches of one shape with other N are
    counted apart."""
    from cotune.models.packing import padding_free, token_dims

    loaded = load_model(
        ModelSection(name_or_path="random:bert", task="classification"),
        num_labels=3,
        vocab_size=300,
    )
    inject_adapters(
        loaded.model,
        PeftSection(target_modules=["query", "value"]),
        anatomy=loaded.anatomy,
        head_paths=loaded.anatomy.head_paths(),
    )
    forward = loaded.anatomy.full()

    def step(ids, mask):
        with padding_free():
            logits = forward(ids, mask)
        task_loss(logits, torch.zeros(ids.shape[0], dtype=torch.long), "classification").backward()

    def padded(lengths):
        t = max(lengths)
        mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
        return torch.randint(2, 300, mask.shape).masked_fill(mask == 0, 0), mask

    counter = FlopCounter()
    seen = [(9, 3, 4, 9), (17, 17, 2, 5), (11, 4), (5, 5, 5), (8, 1, 1, 1, 2), (6, 6)]
    for lengths in seen:
        ids, mask = padded(lengths)
        counter.run("k", step, ids, mask, dims=token_dims(mask, True))
    assert counter.has_law("k")
    for lengths in ((13, 2, 7, 7, 1), (31, 30), (2,), (9, 3, 4, 8)):  # the last: seen shape, new N
        ids, mask = padded(lengths)
        _, predicted = counter.run("k", step, ids, mask, dims=token_dims(mask, True))
        assert predicted == exact(step, ids, mask), lengths
    padded_count = exact(lambda i, m: task_loss(forward(i, m), torch.zeros(4, dtype=torch.long),
                                                "classification").backward(), *padded((9, 3, 4, 9)))  # fmt: skip
    assert exact(step, *padded((9, 3, 4, 9))) < padded_count


def test_a_law_predicts_only_shapes_within_the_span_of_what_it_counted():
    """Batches of one B and T (a fixed max_length) determine the law along N only: other N
    are predicted, another T is counted (and then joins the law)."""

    def law(b, t, n):
        return 7 * n + 3 * b * t * t + 11 * b + 2 * b * t

    counter = FlopCounter()
    counter._learn("k", (8, 32, 200), law(8, 32, 200))
    counter._learn("k", (8, 32, 210), law(8, 32, 210))
    assert not counter.has_law("k")  # two shapes fit any law: nothing verified it yet
    counter._learn("k", (8, 32, 220), law(8, 32, 220))
    assert counter.has_law("k")
    assert counter.known("k", (8, 32, 251)) == law(8, 32, 251)
    assert counter.known("k", (8, 16, 100)) is None
    counter._learn("k", (8, 16, 100), law(8, 16, 100))
    assert counter.known("k", (8, 16, 90)) == law(8, 16, 90)
    counter._learn("k", (8, 16, 90), law(8, 16, 90) + 1)  # a count the law gets wrong
    assert not counter.has_law("k")


def test_a_law_with_work_shared_by_the_rows_of_a_batch():
    """Work done once per batch for its positions (transformers 5.17's rotary tables, a
    matmul over ``[1, T]``) is the law's ``T`` term; a run with one batch size learns its law
    from as many shapes as before the term (three lengths and one to verify)."""

    def flops(b, t):
        return 7 * b * t + 3 * b * t * t + 11 * b + 16 * t

    counter = FlopCounter()
    for dims in ((4, 9), (4, 17), (2, 11), (3, 5), (2, 6)):
        counter._learn("k", dims, flops(*dims))
    assert counter.has_law("k")
    assert all(counter.known("k", d) == flops(*d) for d in ((5, 13), (8, 31), (1, 2)))
    one_size = FlopCounter()
    for t in (9, 17, 11, 5):
        one_size._learn("k", (4, t), flops(4, t))
    assert one_size.has_law("k") and one_size.known("k", (4, 40)) == flops(4, 40)
    assert one_size.known("k", (3, 40)) is None  # another batch size: counted, not guessed
