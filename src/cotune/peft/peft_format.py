"""Save and load adapters in Hugging Face PEFT's on-disk layout (read PEFT 0.21 to match; no PEFT import).

Layout: `adapter_config.json` (a serialised `LoraConfig`) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight`; trained heads (`modules_to_save`) are stored under
their plain parameter names, `base_model.model.classifier.weight`, as PEFT 0.21 writes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from cotune.config import PeftSection
from cotune.errors import AdapterError
from cotune.peft.base import AdapterLayer, available_methods, get_method, is_adaptable
from cotune.peft.inject import AdapterSet, base_module_paths, inject_adapters, is_plain, pattern_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {
    "classification": "SEQ_CLS",
    "causal_lm": "CAUSAL_LM",
    "SEQ_CLS": "SEQ_CLS",
    "CAUSAL_LM": "CAUSAL_LM",
}
# PeftModelForSequenceClassification always adds these to modules_to_save.
SEQ_CLS_HEADS = ("classifier", "score")
# PEFT LoRA features cotune has no equivalent for (unless a registered method claims the field).
UNSUPPORTED_FIELDS = (
    "use_dora", "use_bdlora", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
    "alora_invocation_tokens", "lora_bias", "layer_replication", "target_parameters",
    "trainable_token_indices", "use_qalora", "lora_ga_config", "exclude_modules",
)  # fmt: skip
# init_lora_weights values that only set A/B (others, like pissa/olora/loftq, also rewrite the base).
SAFE_INITS = (True, False, "gaussian", "eva")


def peft_targets(
    paths: Sequence[str],
    target_modules: str | Sequence[str],
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> list[str]:
    """The module paths stock PEFT would adapt, following its `check_target_module_exists` rules."""
    layer_ids = (
        [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    )
    lp = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    out = []
    for key in paths:
        if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
            continue
        if isinstance(target_modules, str):
            if re.fullmatch(target_modules, key):
                out.append(key)
            continue
        if key in target_modules:  # an exact path skips the layer filter in PEFT too
            out.append(key)
            continue
        if not any(key.endswith(f".{t}") for t in target_modules):
            continue
        if layer_ids:
            regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in lp] or [
                r".*?\.[^.]*\.(?P<idx>\d+)\."
            ]
            m = next((m for r in regexes if (m := re.match(r, key))), None)
            if m is None or int(m.group("idx")) not in layer_ids:
                continue
        out.append(key)
    return out


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _peft_target_fields(
    adapters: AdapterSet, excluded: list[str]
) -> tuple[list[str], list[int] | None]:
    """Write target names (+ layers_to_transform) when PEFT resolves them to exactly our layers, else exact paths."""
    cfg, adapted = adapters.cfg, list(adapters.layers)
    paths = base_module_paths(adapters.model)
    if all(is_plain(p) for p in cfg.target_modules):
        names = sorted(set(cfg.target_modules))
        if peft_targets(paths, names, cfg.layers, None, excluded) == adapted:
            return names, cfg.layers
    if peft_targets(paths, adapted, None, None, excluded) != adapted:
        raise AdapterError(
            f"PEFT never adapts modules inside modules_to_save {excluded}, but these are adapted: "
            f"{[p for p in adapted if p not in peft_targets(paths, adapted, None, None, excluded)]}"
        )
    return adapted, None


def save_adapter(
    adapters: AdapterSet, out_dir: str | Path, *, base_model_name_or_path: str | None, task: str
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` that stock PEFT loads."""
    from safetensors.torch import save_file

    spec = get_method(adapters.method)
    layer_cls = spec.layer_cls
    if layer_cls.peft_type is None:
        raise AdapterError(
            f"method {adapters.method!r} has no Hugging Face PEFT equivalent; it cannot be saved in PEFT format"
        )
    if task not in TASK_TYPES:
        raise AdapterError(
            f"save_adapter: unknown task {task!r}; expected one of {sorted(TASK_TYPES)}"
        )
    task_type = TASK_TYPES[task]
    cfg = adapters.cfg
    heads = list(adapters.head_paths)
    excluded = heads + (
        [h for h in SEQ_CLS_HEADS if h not in heads] if task_type == "SEQ_CLS" else []
    )
    target_modules, layers = _peft_target_fields(adapters, excluded)
    # A rank-f export keeps each layer's scaling: alpha/r needs alpha*f, alpha/sqrt(r) needs alpha*sqrt(f).
    f = layer_cls.peft_rank_factor
    af = f**0.5 if cfg.use_rslora else f
    config: dict[str, Any] = {
        "peft_type": layer_cls.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r * f,
        "lora_alpha": _num(cfg.alpha * af),
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": target_modules,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "rank_pattern": {k: v * f for k, v in cfg.rank_pattern.items()},
        "alpha_pattern": {k: _num(v * af) for k, v in cfg.alpha_pattern.items()},
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in adapters.layers.values()),
        "bias": "none",
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
    }
    config.update(layer_cls.peft_config_fields(spec.parse_options(cfg.options)))
    for path, layer in adapters.layers.items():  # layers saved at another rank (fused LoRA)
        m = layer.peft_rank_scale()
        if m != 1:
            config["rank_pattern"][path] = layer.r * f * m
            config["alpha_pattern"][path] = _num(
                layer.alpha * af * (m**0.5 if cfg.use_rslora else m)
            )
    found: dict[str, torch.Tensor] = {}
    for path, layer in adapters.layers.items():  # method-specific key spelling and export form
        found.update(
            {f"{path}.{layer_cls.peft_tensor_name(k)}": t for k, t in layer.peft_tensors().items()}
        )
    for name, t in adapters.named_tensors().items():
        if not any(name.startswith(p + ".") for p in adapters.layers):
            found[name] = t  # heads (modules_to_save)
    tensors = {PREFIX + k: t.detach().to("cpu").contiguous().clone() for k, t in found.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(
            f"{path}: not found; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return config


def _pick_method(config: dict[str, Any], path: Path) -> type[AdapterLayer]:
    peft_type = config.get("peft_type")
    methods = [get_method(n).layer_cls for n in available_methods()]
    same = [m for m in methods if m.peft_type is not None and m.peft_type == peft_type]
    if not same:
        raise AdapterError(
            f"{path}: peft_type {peft_type!r} is not supported; supported: {sorted({m.peft_type for m in methods if m.peft_type})}"
        )
    # A variant method (DoRA, KaSA, ...) claims its PEFT field; the plain method takes the rest.
    chosen = next((m for m in same if m.peft_claims(config)), None)
    chosen = chosen or next((m for m in same if m.peft_variant is None), same[0])
    bad = [f for f in UNSUPPORTED_FIELDS if config.get(f) and f != chosen.peft_variant]
    if bad:
        raise AdapterError(
            f"{path}: PEFT feature(s) {bad} are not supported by cotune (method {chosen.method!r})"
        )
    if config.get("init_lora_weights", True) not in SAFE_INITS and not chosen.peft_claims(config):
        raise AdapterError(
            f"{path}: init_lora_weights={config['init_lora_weights']!r} also changes the base weights; save it from PEFT "
            "with path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    return chosen


def _find_heads(paths: Iterable[str], names: Sequence[str]) -> list[str]:
    return [
        p for p in paths if any(p.endswith(n) for n in names)
    ]  # PEFT's rule for modules_to_save


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> AdapterSet:
    """Inject and fill adapters from a PEFT-layout directory (written by cotune or by stock PEFT)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    config = _read_config(cfg_path)
    layer_cls = _pick_method(config, cfg_path)
    paths = base_module_paths(model)
    mts = list(config.get("modules_to_save") or [])
    if config.get("task_type") == "SEQ_CLS":
        mts += [h for h in SEQ_CLS_HEADS if h not in mts]
    heads = _find_heads(paths, mts)
    tm = config.get("target_modules")
    if not tm or tm == "all-linear":
        raise AdapterError(
            f"{cfg_path}: target_modules={tm!r} is not supported; list the module names"
        )
    targets = peft_targets(
        paths, tm, config.get("layers_to_transform"), config.get("layers_pattern"), mts
    )
    modules = dict(model.named_modules())
    for p in targets:
        if not is_adaptable(modules[p]):
            raise AdapterError(
                f"{cfg_path}: target {p} is a {type(modules[p]).__name__}; cotune adapts only Linear/Conv1D"
            )
    if not targets:
        raise AdapterError(f"{cfg_path}: target_modules {tm!r} match no module of this model")
    rank_pattern = {
        k: v
        for k, v in (config.get("rank_pattern") or {}).items()
        if any(pattern_key([k], p) for p in targets)
    }
    alpha_pattern = {
        k: v
        for k, v in (config.get("alpha_pattern") or {}).items()
        if any(pattern_key([k], p) for p in targets)
    }
    try:
        cfg = PeftSection(
            method=layer_cls.method,
            r=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            use_rslora=bool(config.get("use_rslora", False)),
            target_modules=[re.escape(p) for p in targets],
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            layers=None,
            train_head=bool(heads),
            options=layer_cls.options_from_peft(config),
        )
    except ValidationError as e:
        raise AdapterError(f"{cfg_path}: invalid adapter config: {e}") from e

    if not w_path.is_file():
        raise AdapterError(
            f"{w_path}: not found; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        raw = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{w_path}: cannot read safetensors file ({e})") from e

    adapters = inject_adapters(model, cfg, head_paths=heads)
    own = adapters.named_tensors()
    sd: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        name = key.removeprefix(PREFIX).replace(
            ".modules_to_save.", "."
        )  # old PEFT spelled heads so
        layer_path = next((p for p in adapters.layers if name.startswith(p + ".")), None)
        if layer_path is not None:
            name = f"{layer_path}.{layer_cls.tensor_name_from_peft(name[len(layer_path) + 1 :])}"
        if name not in own:
            raise AdapterError(
                f"{w_path}: key {key!r} matches no adapter or head tensor; expected keys like {sorted(own)[:3]}"
            )
        sd[name] = t
    missing = [k for k in own if k not in sd and not any(k.startswith(h + ".") for h in heads)]
    if missing:
        raise AdapterError(f"{w_path}: missing adapter tensors {missing[:6]}")
    adapters.load_state_dict(
        sd, strict=False
    )  # heads absent from the file keep the base's weights, as in PEFT
    return adapters
