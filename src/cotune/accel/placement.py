"""Which torch device each node computes on.

``train.device`` names the default (``auto``: CUDA when present, else Apple's MPS, else the CPU);
``train.node_devices`` overrides it per node kind (``server``, ``devices``, ``edges``) or per
node id. Names are resolved on the machine that runs the node, when the run starts, so a config
written on a laptop runs unchanged on a GPU box; asking for an accelerator the machine lacks is
a ``ConfigError`` naming the field, never a silent fallback to the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from cotune.config import NODE_KINDS
from cotune.errors import ConfigError
from cotune.runtime.ids import SERVER, device_index


def available(kind: str) -> bool:
    """Whether this machine can compute on ``kind`` (cpu, cuda, mps)."""
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend is not None and backend.is_available())
    return False


def resolve_device(spec: str, field: str = "train.device") -> torch.device:
    """The torch device ``spec`` names on this machine (``auto`` picks the best one)."""
    if spec == "auto":
        for kind in ("cuda", "mps"):
            if available(kind):
                return torch.device(kind, 0) if kind == "cuda" else torch.device(kind)
        return torch.device("cpu")
    dev = torch.device(spec)
    if not available(dev.type):
        raise ConfigError(
            f"{field}: {spec!r} is not available on this machine (it has: "
            f"{', '.join(k for k in ('cpu', 'cuda', 'mps') if available(k))}); "
            "use auto or cpu"
        )
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"{field}: {spec!r}, but this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    return dev


def node_kind(node_id: str) -> str:
    """``server``, ``devices`` or ``edges`` (every other infrastructure node)."""
    if node_id == SERVER:
        return "server"
    return "devices" if device_index(node_id) is not None else "edges"


def node_device(train: Any, node_id: str) -> torch.device:
    """Where node ``node_id`` computes: its id's entry, its kind's, else ``train.device``."""
    overrides: dict[str, str] = train.node_devices
    for key in (node_id, node_kind(node_id)):
        if key in overrides:
            return resolve_device(overrides[key], f"train.node_devices.{key}")
    return resolve_device(train.device)


def check_placement(cfg: Any, node_ids: list[str]) -> torch.device:
    """Resolve every node's device now (errors before any work) and return the server's. On
    the local engine all roles share one model, so every node must resolve to one device."""
    unknown = [k for k in cfg.train.node_devices if k not in (*NODE_KINDS, *node_ids)]
    if unknown:
        raise ConfigError(
            f"train.node_devices: no node {unknown[0]!r} in this run (nodes: "
            f"{', '.join(node_ids[:4])}{', ...' if len(node_ids) > 4 else ''})"
        )
    placed = {n: node_device(cfg.train, n) for n in node_ids}
    server = placed[SERVER]
    if cfg.engine.kind == "local":
        other = {n: d for n, d in placed.items() if d != server}
        if other:
            node, dev = next(iter(other.items()))
            raise ConfigError(
                f"train.node_devices: {node} on {dev} but the server on {server}; the local "
                "engine runs every role on one shared model, so they must be on one device "
                "(use engine.kind: isolated to place nodes apart)"
            )
    return server


def move_to(model: torch.nn.Module, device: torch.device) -> None:
    """Move a model's real tensors to ``device``; parameters a partially loaded node does not
    hold stay on ``meta``. bitsandbytes parameters quantize themselves on this move."""
    model._apply(lambda t: t if t.is_meta else t.to(device))


def place_model(loaded: Any, cfg: Any, device: torch.device) -> None:
    """Make ``loaded`` (fresh from a loader) a node's model on ``device``: the base quantized
    as ``model.quantize`` asks, moved there, computing as ``train`` asks. Before adapters go in."""
    from cotune.accel.compute import AUTOCAST_DTYPES, compute_from, set_compute
    from cotune.accel.quantize import check_quantize, quantize_base

    mode = cfg.model.quantize
    if mode != "none":
        check_quantize(mode, device)
        anatomy = loaded.anatomy
        blocks = [anatomy.block_path(i) for i in range(anatomy.num_layers)]
        base_dtype = next(p.dtype for p in loaded.model.parameters())
        compute_dtype = AUTOCAST_DTYPES.get(cfg.train.autocast, base_dtype)
        quantize_base(loaded.model, blocks, mode, compute_dtype)
    move_to(loaded.model, device)
    set_compute(loaded.model, compute_from(cfg.train))
