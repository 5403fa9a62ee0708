"""Put adapters into a model (target matching, layer filter, freezing) and handle them as a set."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from cotune.config import PeftSection
from cotune.errors import AdapterError
from cotune.peft.base import AdapterLayer, LayerSpec, get_method, in_out_features, is_adaptable

_PLAIN = re.compile(r"[A-Za-z0-9_]+")
_LAYER_CONTAINERS = ("layer", "layers", "h", "block", "blocks")
DEFAULT_HEADS = ("classifier", "score")


class _Anatomy(Protocol):
    def layer_of(self, path: str) -> int | None: ...


def is_plain(pattern: str) -> bool:
    """A plain name matches the last path component; anything else is a full-path regex."""
    return _PLAIN.fullmatch(pattern) is not None


def matches_target(pattern: str, path: str) -> bool:
    if is_plain(pattern):
        return path.rsplit(".", 1)[-1] == pattern
    return re.fullmatch(pattern, path) is not None


def pattern_key(patterns: Iterable[str], path: str) -> str | None:
    """The first rank/alpha_pattern key matching `path`, with PEFT's rule `(.*\\.)?(key)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def parse_layer_index(path: str) -> int | None:
    """Block index of `path`: the first integer component right after a `layer`/`h`/`layers` container."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit() and parts[i - 1] in _LAYER_CONTAINERS:
            return int(parts[i])
    return None


def base_module_paths(model: nn.Module) -> list[str]:
    """Module paths as in the un-adapted model (adapter internals hidden, adapted layers by their own path)."""
    out: list[str] = []
    skip: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(s) for s in skip):
            continue
        out.append(name)
        if isinstance(mod, AdapterLayer):
            skip.append(name + ".")
    return out


def _find_heads(model: nn.Module, head_paths: list[str] | None) -> list[str]:
    names = dict(model.named_modules())
    if head_paths is None:
        return [h for h in DEFAULT_HEADS if h in names]
    missing = [h for h in head_paths if h not in names]
    if missing:
        raise AdapterError(
            f"head module(s) {missing} not found in the model; top-level modules: {list(dict(model.named_children()))}"
        )
    return list(head_paths)


class AdapterSet:
    """The adapters injected into one model, plus the trainable head modules (PEFT's modules_to_save)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: PeftSection,
        layers: dict[str, AdapterLayer],
        head_paths: list[str],
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.method = cfg.method
        self.layers = layers
        self.head_paths = head_paths

    def _heads(self) -> Iterable[tuple[str, nn.Module]]:
        return ((h, self.model.get_submodule(h)) for h in self.head_paths)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is adapter state (live, not cloned), keyed by the model's own names."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.layers.items():
            out.update({f"{path}.{k}": v for k, v in layer.adapter_tensors().items()})
        for h, mod in self._heads():
            out.update({f"{h}.{k}": v for k, v in mod.state_dict(keep_vars=True).items()})
        return out

    def named_trainable(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for path, layer in self.layers.items():
            out.update(
                {f"{path}.{k}": p for k, p in layer.adapter_named_parameters() if p.requires_grad}
            )
        for h, mod in self._heads():
            out.update({f"{h}.{k}": p for k, p in mod.named_parameters() if p.requires_grad})
        return out

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable().values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.named_trainable().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.named_tensors().items()}

    @torch.no_grad()
    def load_state_dict(self, sd: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        own = self.named_tensors()
        unexpected = sorted(set(sd) - set(own))
        missing = sorted(set(own) - set(sd))
        if unexpected or (strict and missing):
            raise AdapterError(
                f"adapter state dict does not fit: unexpected keys {unexpected[:8]}, missing keys {missing[:8]}"
                + (f"; expected keys look like {sorted(own)[:4]}" if unexpected else "")
            )
        if self.merged:
            raise AdapterError("cannot load adapter weights while merged; call unmerge() first")
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise AdapterError(
                    f"adapter tensor {k}: shape {tuple(v.shape)} does not fit {tuple(own[k].shape)}"
                )
            own[k].copy_(v)

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers.values())

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge every adapter and put the plain base layers back (for export); the set is empty after."""
        self.merge()
        for path, layer in self.layers.items():
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, layer.base_layer)
        self.layers = {}
        return self.model

    def set_stage(self, stage: str, **options: Any) -> None:
        """Switch a staged method (MoSLD, MoDULA) to `stage`: changes which parameters require grad.

        The options (and so a saved adapter's config) record the stage. A `Trainer` built before the
        switch still holds the old trainable set: build a new one for the next stage.
        """
        staged = [layer for layer in self.layers.values() if hasattr(layer, "set_stage")]
        if not staged or len(staged) != len(self.layers):
            raise AdapterError(f"method {self.method!r} has no training stages")
        for layer in staged:
            layer.set_stage(stage, **options)  # type: ignore[operator]
        new = {**self.cfg.options, "stage": stage, **options}
        self.cfg = self.cfg.model_copy(update={"options": new})

    @property
    def has_regularizer(self) -> bool:
        """Whether some layer's method can add a training loss (one whose class defines
        ``regularization_loss``); False: ``regularization_loss`` is always None, so a caller
        may skip binding tensors to ask (a device cohort asks once per member and step)."""
        return any(
            type(layer).regularization_loss is not AdapterLayer.regularization_loss
            for layer in self.layers.values()
        )

    def regularization_loss(self) -> torch.Tensor | None:
        return regularization_over(self.layers.values())


def regularization_over(layers: Iterable[AdapterLayer]) -> torch.Tensor | None:
    """The sum of ``layers``' method regularizers (None: none of them has one)."""
    losses = [loss for layer in layers if (loss := layer.regularization_loss()) is not None]
    return torch.stack(losses).sum() if losses else None


def _candidates_text(paths: list[str]) -> str:
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return f"linear module names: {names}; e.g. paths {paths[:3]}"


def inject_adapters(
    model: nn.Module,
    cfg: PeftSection,
    *,
    anatomy: _Anatomy | None = None,
    head_paths: list[str] | None = None,
) -> AdapterSet:
    """Wrap every targeted linear layer with the method's AdapterLayer and freeze everything else."""
    method = get_method(cfg.method)
    options = method.parse_options(cfg.options)
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise AdapterError("the model already has adapters injected; load a fresh model first")

    heads = _find_heads(model, head_paths) if cfg.train_head else []
    modules = dict(model.named_modules())
    # Like PEFT, never target inside a module that is trained whole.
    linear = [
        p
        for p, m in modules.items()
        if p and is_adaptable(m) and not any(p == h or p.startswith(h + ".") for h in heads)
    ]

    selected: list[str] = []
    for pattern in cfg.target_modules:
        try:
            hits = [p for p in linear if matches_target(pattern, p)]
        except re.error as e:
            raise AdapterError(
                f"peft.target_modules: {pattern!r} is not a valid regex ({e})"
            ) from e
        if not hits:
            raise AdapterError(
                f"peft.target_modules: {pattern!r} matches no linear module; {_candidates_text(linear)}"
            )
        selected += [p for p in hits if p not in selected]
    selected = [p for p in linear if p in selected]  # model order, so RNG use matches PEFT's

    if cfg.layers is not None:

        def index(p: str) -> int | None:
            return anatomy.layer_of(p) if anatomy is not None else parse_layer_index(p)

        found = {i for p in selected if (i := index(p)) is not None}
        absent = sorted(set(cfg.layers) - found)
        if absent:
            raise AdapterError(
                f"peft.layers: block(s) {absent} hold no targeted module; targeted blocks: {sorted(found)}"
            )
        selected = [p for p in selected if index(p) in cfg.layers]

    for attr in ("rank_pattern", "alpha_pattern"):
        for key in getattr(cfg, attr):
            try:
                hit = any(pattern_key([key], p) for p in selected)
            except re.error as e:
                raise AdapterError(f"peft.{attr}: key {key!r} is not a valid regex ({e})") from e
            if not hit:
                raise AdapterError(
                    f"peft.{attr}: key {key!r} matches no targeted module; targeted: {_candidates_text(selected)}"
                )

    specs: dict[str, LayerSpec] = {}
    for path in selected:
        rk, ak = pattern_key(cfg.rank_pattern, path), pattern_key(cfg.alpha_pattern, path)
        r = cfg.rank_pattern[rk] if rk is not None else cfg.r
        alpha = cfg.alpha_pattern[ak] if ak is not None else cfg.alpha
        layer = modules[path]
        fan_in, fan_out = in_out_features(layer)
        shape = (fan_out, fan_in)
        if r >= min(shape):
            src = f"rank_pattern[{rk!r}]" if rk is not None else "peft.r"
            raise AdapterError(
                f"{src} = {r} is not below min(in, out) = {min(shape)} of {path} (weight {shape})"
            )
        specs[path] = LayerSpec(path, r, alpha, cfg.dropout, cfg.use_rslora, options)

    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, AdapterLayer] = {}
    for path, spec in specs.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = method.layer_cls(modules[path], spec)
        setattr(parent, child, layer)
        layer.set_trainable()
        layers[path] = layer
    for h in heads:
        head = model.get_submodule(h)
        train_in_float32(head)
        head.requires_grad_(True)
    return AdapterSet(model, cfg, layers, heads)


def train_in_float32(head: nn.Module) -> None:
    """A module trained whole (a classification head) keeps float32 weights over a half-
    precision base, as the adapters do: AdamW on float16 weights turns its epsilon (1e-8) into
    0 and the first update into inf, and bfloat16 drops updates below 1/256 of a weight. Its
    inputs (the base's hidden states) are cast up on the way in."""
    floats = [p for p in head.parameters() if p.is_floating_point()]
    if all(p.dtype == torch.float32 for p in floats):
        return
    head.float()
    head.register_forward_pre_hook(_float32_inputs, with_kwargs=True)


def _float32_inputs(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def up(a: Any) -> Any:
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}
