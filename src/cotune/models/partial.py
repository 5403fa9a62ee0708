"""``load_segment``: a device builds the whole model skeleton but materialises only its segment.

Every parameter the segment does not own stays on the ``meta`` device (shape and dtype, no
storage). Owned parameters are read one by one from the checkpoint's safetensors file(s)
(:mod:`cotune.models.checkpoint`), so a device never reads or holds the other layers. Shared
buffers (position ids, rotary tables) are small and kept real; buffers inside foreign blocks go
to meta too.

Random initialisation must equal ``load_model``'s value for value, yet HF draws the whole model's
init from one RNG stream. So the RNG is *replayed*: a random op on a meta tensor runs once on a
throw-away CPU tensor of the same shape, advancing the generator exactly as the real op would,
and the draws for owned parameters land in their real tensors. Peak extra memory is the largest
single non-owned tensor (while it is drawn), never the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from cotune.config import ModelSection
from cotune.errors import ModelError
from cotune.models.checkpoint import open_checkpoint
from cotune.models.loading import (
    ANATOMIES,
    ATTN_IMPLEMENTATION,
    LoadedModel,
    auto_class,
    family_of,
    finish_loading,
    prepare_config,
)
from cotune.models.segment import Segment

_META = torch.device("meta")


def load_segment(
    cfg: ModelSection,
    start: int,
    end: int,
    *,
    embed: bool | None = None,
    head: bool | None = None,
    num_labels: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> tuple[LoadedModel, Segment]:
    """Load only what ``anatomy.segment(start, end, embed=..., head=...)`` runs.

    The returned model has the full structure; parameters outside the segment are on ``meta``.
    Weights and random init equal those of ``load_model(cfg, ..., seed=seed)``. Bad bounds are a
    ``ModelError`` (raised before any weight is read).
    """
    config, path, num_labels = prepare_config(cfg, num_labels=num_labels, vocab_size=vocab_size)
    if path is not None and vocab_size is not None and vocab_size > config.vocab_size:
        raise ModelError(
            f"load_segment cannot grow the vocabulary of {cfg.name_or_path!r} from "
            f"{config.vocab_size} to {vocab_size} (new rows are drawn from the whole table); "
            "use load_model"
        )
    auto = auto_class(cfg.task)
    # A dry build on meta (no RNG, no memory) names every parameter and validates the bounds; it
    # also records the order in which parameters are registered, which the random build follows.
    registered: list[tuple[str, tuple[int, ...], nn.Parameter]] = []

    def record(module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        registered.append((name, tuple(param.shape), param))  # keeps ids alive and unique
        return param

    with _on_registration(record), torch.device(_META), torch.random.fork_rng(devices=[]):
        dry = auto.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    family = family_of(config.model_type)
    dry_segment = ANATOMIES[family](dry, cfg.task).segment(start, end, embed=embed, head=head)
    owned = {id(p) for p, names in _param_groups(dry) if any(dry_segment.owns(n) for n in names)}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if path is None:
            keep = [id(p) in owned for _, _, p in registered]
            model = _build_random(auto, config, registered, keep)
        else:
            model = _build_pretrained(auto, config, path, dry_segment, cfg.task)
    _drop_foreign_buffers(model, dry_segment)
    loaded = finish_loading(model, cfg, path, num_labels)
    return loaded, loaded.anatomy.segment(start, end, embed=embed, head=head)


def materialized_nbytes(module: nn.Module) -> int:
    """Bytes of parameter and buffer storage actually allocated (meta tensors count 0; shared
    storage, as in tied embeddings, counts once)."""
    seen: set[int] = set()
    total = 0
    tensors = [*module.parameters(), *module.buffers()]
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# ---------------------------------------------------------------- random models


def _build_random(
    auto: Any,
    config: Any,
    registered: list[tuple[str, tuple[int, ...], nn.Parameter]],
    keep: list[bool],
) -> nn.Module:
    """Run HF's own ``from_config`` (construction + init + tying) with the parameters the segment
    does not own sent to meta as they are registered; the RNG replay keeps every draw in step.

    The same construction registers the same parameters in the same order as the dry build, whose
    final model told which registered objects end up owned (after tying, under any name).
    """
    count = iter(range(len(registered)))

    def place(module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        i = next(count, None)
        if i is None or registered[i][:2] != (name, tuple(param.shape)):
            raise ModelError(f"{config.model_type}: model construction is not repeatable ({name})")
        if keep[i] or param.device.type == "meta":
            return param
        return nn.Parameter(param.detach().to(_META), requires_grad=param.requires_grad)

    with _on_registration(place), _ReplayRandomOnMeta():
        return auto.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)


# ---------------------------------------------------------------- pretrained checkpoints


def _build_pretrained(
    auto: Any, config: Any, path: str, dry_segment: Segment, task: str
) -> nn.Module:
    """As ``from_pretrained`` does: an uninitialised skeleton, the checkpoint's tensors, then
    HF's init for what the checkpoint lacks (a new classifier), with the RNG replayed."""
    from transformers import initialization as hf_init

    index = open_checkpoint(path, getattr(dry_segment.anatomy.model, "base_model_prefix", ""))
    # HF's dtype="auto": the config's dtype, else the checkpoint's (a fresh head is drawn in it).
    dtype = config.dtype or index.float_dtype()
    to_meta = _on_registration(
        lambda m, n, p: nn.Parameter(p.detach().to(_META), requires_grad=p.requires_grad)
    )
    with to_meta, hf_init.no_init_weights():
        model = auto.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    model.tie_weights()
    owns = dry_segment.owns  # names are identical in the dry and the real skeleton
    wanted: dict[str, tuple[nn.Parameter, list[str]]] = {}
    for param, names in _param_groups(model):
        key = next((k for k in map(index.key, names) if k is not None), None)
        if key is not None and index.shapes[key] != tuple(param.shape):
            if task != "classification":
                raise ModelError(
                    f"{path}: {key} has shape {list(index.shapes[key])}, the model expects "
                    f"{list(param.shape)}"
                )
            key = None  # ignore_mismatched_sizes, as load_model: a fresh head
        if not any(owns(n) for n in names):
            # HF initialises only what the checkpoint lacks; flag the rest so the replay skips it.
            param._is_hf_initialized = key is not None  # type: ignore[attr-defined]
        elif key is None:
            _replace(model, names, torch.empty(param.shape, dtype=param.dtype), param, False)
        else:
            wanted[key] = (param, names)
    for key, value in index.read(wanted):
        param, names = wanted[key]
        _replace(model, names, value.to(param.dtype), param, True)
    # Persistent buffers the checkpoint stores (none in today's families; old ones are ignored).
    persistent = set(model.state_dict(keep_vars=True))
    for name, buf in list(model.named_buffers()):
        key = index.key(name)
        if name in persistent and key is not None and owns(name.rpartition(".")[0]):
            buf.copy_(dict(index.read([key]))[key])
            buf._is_hf_initialized = True  # type: ignore[attr-defined]
    with _ReplayRandomOnMeta():
        model.initialize_weights()
    return model


# ---------------------------------------------------------------- shared machinery


def _param_groups(model: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Each distinct parameter with all its names (a tied embedding has two)."""
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(name)
    return list(groups.values())


def _replace(
    model: nn.Module, names: list[str], value: torch.Tensor, old: nn.Parameter, loaded: bool
) -> None:
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    new._is_hf_initialized = loaded  # type: ignore[attr-defined]  # HF's init skips loaded ones
    for name in names:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = new


def _drop_foreign_buffers(model: nn.Module, segment: Segment) -> None:
    """Buffers inside blocks the segment does not run go to meta too (shared ones stay)."""
    anatomy = segment.anatomy
    for name, buf in list(model.named_buffers()):
        layer = anatomy.layer_of(name)
        if layer is not None and not segment.start <= layer < segment.end:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.to(_META)


@contextlib.contextmanager
def _on_registration(hook: Any) -> Iterator[None]:
    """Pass every parameter registered on any module through ``hook(module, name, param)``."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, None if param is None else hook(module, name, param))

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _ReplayRandomOnMeta(TorchDispatchMode):
    """A random op on a meta tensor also runs on an empty CPU tensor of the same shape, strides
    and dtype, so the CPU generator advances exactly as if the tensor were real."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and _touches_meta((args, kwargs)):
            func(*tree_map(_cpu_stand_in, args), **tree_map(_cpu_stand_in, kwargs))
        return func(*args, **kwargs)


def _touches_meta(tree: Any) -> bool:
    found = False

    def visit(x: Any) -> Any:
        nonlocal found
        if isinstance(x, torch.Tensor | torch.device):
            found |= (x.device if isinstance(x, torch.Tensor) else x).type == "meta"
        return x

    tree_map(visit, tree)
    return found


def _cpu_stand_in(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    return torch.device("cpu") if isinstance(x, torch.device) and x == _META else x
