"""Several roles' adapters in one batched forward: row group ``i`` of the batch runs through
role ``i``'s adapter tensors, the frozen base runs once for all rows.

In-process simulation trains many devices over one shared base (``cotune.train.state``); run
one after another, K devices with batch b cost K small forwards, which on a CPU is far slower
than one forward of K·b rows. ``row_groups`` lets a paradigm run a *cohort* of devices as one
batch while every device keeps its own adapter tensors: autograd sees each device's tensors as
separate leaves, so one backward gives every device exactly its own gradient.

Additive methods (``base(x) + delta(x)``) share the base product; a method may also compute
every group's delta at once (``AdapterLayer.grouped_delta``: plain LoRA with equal groups runs
two batched matmuls over the stacked per-group A and B). Methods that override
``adapted_forward`` (DoRA, BoRA) run per group, which is still correct, just not faster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from cotune.errors import AdapterError
from cotune.peft.base import AdapterLayer


@contextmanager
def bind_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily make ``module``'s parameters/buffers (by local dotted name) be ``tensors``.

    The entries are swapped in the owning module's tables (not ``.data``), so a graph built
    inside the block keeps pointing at these tensors after the block ends.
    """
    saved: list[tuple[dict, str, object]] = []
    try:
        for name, tensor in tensors.items():
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            table = owner._parameters if attr in owner._parameters else owner._buffers
            if attr not in table:
                raise AdapterError(f"{type(module).__name__}: no parameter or buffer {name!r}")
            saved.append((table, attr, table[attr]))
            table[attr] = tensor
        yield
    finally:
        for table, attr, old in reversed(saved):
            table[attr] = old


def split_by_layer(
    layers: Mapping[str, AdapterLayer], params: Mapping[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Model-level names (``<layer path>.<local name>``) → per-layer local dicts, plus the rest
    (e.g. a trainable head, which is not an adapter layer)."""
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in params.items():
        path, local = _layer_of(layers, name)
        if path is None:
            rest[name] = tensor
        else:
            per_layer.setdefault(path, {})[local] = tensor
    return per_layer, rest


def _layer_of(layers: Mapping[str, AdapterLayer], name: str) -> tuple[str | None, str]:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if path in layers:
            return path, ".".join(parts[i:])
    return None, name


@contextmanager
def row_groups(
    layers: Mapping[str, AdapterLayer],
    rows: Sequence[int],
    params: Sequence[Mapping[str, torch.Tensor]],
) -> Iterator[None]:
    """Within the block, rows ``rows[i]`` of every batch through ``layers`` use ``params[i]``
    (model-level names, e.g. a role state's tensors). Names outside the adapter layers (a
    trainable head) cannot differ per row group: ``AdapterError``."""
    if len(rows) != len(params):
        raise AdapterError(f"row_groups: {len(rows)} row counts for {len(params)} tensor sets")
    split = [split_by_layer(layers, p) for p in params]
    for _, rest in split:
        if rest:
            raise AdapterError(
                f"row_groups: {sorted(rest)[:3]} are not adapter-layer tensors; a cohort can only "
                "differ in adapter layers"
            )
    touched = [layers[path] for path in split[0][0]]
    for layer in touched:
        if layer.merged:
            raise AdapterError(f"{layer.path}: a merged adapter cannot run per-row groups")
        layer.row_groups = (list(rows), [s[0].get(layer.path, {}) for s in split])
    try:
        yield
    finally:
        for layer in touched:
            layer.row_groups = None


@contextmanager
def bind_state(
    layers: Mapping[str, AdapterLayer], params: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Bind one role's tensors (model-level names) into ``layers`` for the block (e.g. to
    compute that role's regularizer while a cohort's tensors are leaves)."""
    per_layer, _ = split_by_layer(layers, params)
    with ExitStack() as stack:
        for path, own in per_layer.items():
            stack.enter_context(bind_tensors(layers[path], own))
        yield
