"""``models.digest``: a fingerprint of a loaded base, equal wherever the same base is loaded."""

import torch

from cotune.config import ModelSection
from cotune.data import build_tokenizer
from cotune.models import load_model
from cotune.models.digest import (
    digest_differences,
    library_versions,
    vocabulary_digest,
    weights_digest,
)


def random_gpt2(seed=0, dtype="float32"):
    section = ModelSection(name_or_path="random:gpt2", task="causal_lm", dtype=dtype)
    return load_model(section, vocab_size=300, seed=seed).model


def test_the_same_base_gives_the_same_digest_and_a_changed_tensor_is_named():
    a, b = weights_digest(random_gpt2()), weights_digest(random_gpt2())
    assert a == b and len(a) == len(dict(random_gpt2().named_parameters()))
    assert all(len(v) == 8 and int(v, 16) >= 0 for v in a.values())
    model = random_gpt2()
    name, p = next(iter(model.named_parameters()))
    with torch.no_grad():
        p.view(-1)[0] += 1e-3
    assert digest_differences(a, weights_digest(model)) == [name]
    other = weights_digest(random_gpt2(seed=1))  # another random init: its weights differ
    assert 0 < len(digest_differences(a, other)) < len(a)  # (norms start at ones either way)


def test_every_dtype_is_read_as_its_bytes_and_missing_tensors_count():
    half = weights_digest(random_gpt2(dtype="bfloat16"))
    assert half.keys() == weights_digest(random_gpt2()).keys() and half != weights_digest(
        random_gpt2()
    )
    a = {"x": "00000001", "y": "00000002"}
    assert digest_differences(a, {"x": "00000001"}) == ["y"]
    assert digest_differences(a, {**a, "z": "00000003"}) == ["z"]
    assert set(library_versions()) == {"cotune", "torch", "transformers"}


def test_a_tokenizer_is_known_by_its_vocabulary():
    """The run's own BPE (a random model's) and an HF tokenizer: the same vocabulary gives the
    same digest, another vocabulary another one."""
    texts = ["the cat sat on the mat", "a dog ate the bone"] * 20
    a, b = build_tokenizer(None, texts, 300), build_tokenizer(None, texts, 300)
    other = build_tokenizer(None, ["entirely different words here"] * 40, 300)
    assert vocabulary_digest(a) == vocabulary_digest(b) != vocabulary_digest(other)
    minilm = load_model(ModelSection(name_or_path="minilm", task="classification"), num_labels=2)
    hf = build_tokenizer(minilm.tokenizer, [], 300)
    assert vocabulary_digest(hf) == vocabulary_digest(build_tokenizer(minilm.tokenizer, [], 300))
    assert vocabulary_digest(hf) != vocabulary_digest(a)
