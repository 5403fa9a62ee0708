"""The cut of a split model, shared by the split-learning paradigms (``split``, ``splitfed``,
``splitfrozen``): which blocks each side holds (``Layout``), the checks a server makes of what
crosses the cut, the activations' dtype, global clipping across both sides, each side's
regularizer and memory estimate, and the helpers that join or average the two sides' states."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cotune.config import RunConfig
from cotune.errors import ConfigError, ProtocolError
from cotune.models import Activations, LoadedModel, Segment
from cotune.paradigms.options import OPTIONS, CutOptions, parse_options
from cotune.peft import AdapterSet, regularization_over
from cotune.runtime import Message
from cotune.runtime.node import NodeModel
from cotune.runtime.validate import check_activation, meta_number
from cotune.train import RoleState
from cotune.train.memory import MemoryEstimate, MemoryProbe, probe_ids


def activation_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype of the residual stream a segment hands on: the base's (``model.dtype``; the
    adapters' float32 and autocast's matmuls do not change it)."""
    return getattr(torch, cfg.model.dtype)


def check_cut(
    msg: Message, *, hidden_size: int, dtype: torch.dtype, task: str, labels: bool
) -> Message:
    """Shape/dtype/NaN checks of a device's cut activations (ProtocolError naming them)."""
    name = f"message {msg.kind!r} from {msg.sender!r}"
    want = ["hidden", "attention_mask"] + (["labels"] if labels else [])
    for key in want:
        if key not in msg.tensors:
            raise ProtocolError(f"{name}: missing tensor {key!r} (has {sorted(msg.tensors)})")
    h = check_activation(
        f"{name}: tensor 'hidden'", msg.tensors["hidden"], shape=[None, None, hidden_size],
        dtype=dtype,
    )  # fmt: skip
    b, t = h.shape[:2]
    check_activation(
        f"{name}: tensor 'attention_mask'",
        msg.tensors["attention_mask"],
        shape=[b, t],
        dtype=torch.long,
    )
    meta_number(msg, "device_reg", 0.0)  # added to the step's loss: a number, or absent
    meta_number(msg, "round", 0, minimum=0)  # the round the server's work is charged to
    if labels:
        shape = [b] if task == "classification" else [b, t]
        check_activation(
            f"{name}: tensor 'labels'", msg.tensors["labels"], shape=shape, dtype=torch.long
        )
    return msg


def admit_upload(
    msg: Message,
    check: Callable[[Message], Any],
    queue: list[tuple[float, int, Message]],
    bad: list[tuple[str, str]],
    on_bad_message: str,
) -> None:
    """A split server's intake of a device's cut upload: queued by arrival once ``check``
    passes; a ``ProtocolError`` ends the run under ``on_bad_message: stop``, else the device
    and the error go to ``bad`` (the server rejects that device's step) and the run goes on."""
    try:
        check(msg)
    except ProtocolError as err:
        if on_bad_message == "stop":
            raise
        bad.append((msg.sender, str(err)))
        return
    queue.append((msg.arrival or 0.0, len(queue), msg))


@dataclass
class Layout:
    bottom: Segment
    server: Segment
    top: Segment | None
    device_names: list[str]
    server_names: list[str]


def make_layout(model: NodeModel, cfg: RunConfig, opts: CutOptions) -> Layout:
    """Segments for ``opts`` and which adapter parameters live on which side (ConfigError if bad)."""
    anatomy = model.loaded.anatomy
    n, cut = anatomy.num_layers, opts.cut
    where = "paradigm.options"
    if not 1 <= cut <= n:
        raise ConfigError(
            f"{where}.cut: {cut} is outside the model ({cfg.model.name_or_path} has {n} "
            f"blocks; the device needs at least one block: 1 <= cut < {n})"
        )
    top_start = n
    if opts.u_shaped:
        top_start = n if opts.cut_top is None else opts.cut_top
        if not cut < top_start <= n:
            raise ConfigError(
                f"{where}.cut_top: {top_start} must satisfy cut ({cut}) < cut_top <= {n} so the "
                "server keeps at least one block"
            )
    elif opts.cut_top is not None:
        raise ConfigError(f"{where}.cut_top is only used with u_shaped: true")
    elif cut == n:
        raise ConfigError(
            f"{where}.cut: {cut} leaves the server nothing (the model has {n} blocks); use "
            f"cut < {n}, or u_shaped: true with cut_top"
        )
    bottom = anatomy.segment(0, cut, embed=True, head=False)
    server = anatomy.segment(cut, top_start, embed=False, head=not opts.u_shaped)
    top = anatomy.segment(top_start, n, embed=False, head=True) if opts.u_shaped else None
    names = list(model.trainer.params)
    dev = [k for k in names if bottom.owns(k) or (top is not None and top.owns(k))]
    srv = [k for k in names if k not in set(dev)]
    for side, got in (("device", dev), ("server", srv)):
        if not got:
            raise ConfigError(
                f"{where}: with cut={cut} the {side} side owns no adapter parameter; adapt "
                "layers on both sides of the cut (peft.layers / peft.target_modules) or move the cut"
            )
    return Layout(bottom, server, top, dev, srv)


def cut_options(cfg: RunConfig) -> CutOptions:
    """The run's split options (``split`` or ``splitfed``), as every node reads them."""
    return parse_options(OPTIONS[cfg.paradigm.name], cfg.paradigm.options)  # type: ignore[return-value]


def global_clip(opts: CutOptions, cfg: RunConfig) -> bool:
    """Clipping by the norm across the cut is on: server and devices exchange squared norms."""
    return opts.clip == "global" and cfg.train.max_grad_norm is not None


def side_reg(
    adapters: AdapterSet, owns: Callable[[str], bool]
) -> Callable[[], torch.Tensor | None]:
    """The adapter method's regularizer over the layers one side holds (None: nothing to add)."""
    layers = [layer for path, layer in adapters.layers.items() if owns(path)]

    def reg() -> torch.Tensor | None:
        return regularization_over(layers)

    return reg


def sq_norm(grads: list[torch.Tensor]) -> float:
    """Sum of the tensors' squared L2 norms, in float64 over float32 norms (one host sync)."""
    if not grads:
        return 0
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)]).tolist()
    return sum(x**2 for x in norms)


def clip_coef(max_norm: float | None, total_sq: float) -> float | None:
    """``clip_grad_norm_``'s factor for a norm computed across the cut (None: no clipping)."""
    if max_norm is None:
        return None
    return min(1.0, max_norm / (total_sq**0.5 + 1e-6))


def segment_memory(
    loaded: LoadedModel, cfg: RunConfig, segment: Segment, *, train: bool
) -> MemoryEstimate:
    """Peak memory of the role running ``segment``: only its weights, adapters, optimizer state
    and saved activations (forward-only segments: no grads, no optimizer, no saved tensors)."""
    ids = probe_ids(cfg, loaded.model)
    mask = ids.clone()
    inputs: torch.Tensor | Activations = ids
    if not segment.embed:
        d = loaded.anatomy.hidden_size
        hidden = torch.zeros(*ids.shape, d, device=ids.device, dtype=activation_dtype(cfg),
                             requires_grad=True)  # fmt: skip
        inputs = Activations(hidden, mask)
    was = loaded.model.training
    loaded.model.train(train)
    try:
        est = MemoryProbe().estimate("segment", segment, segment, inputs, mask)
    finally:
        loaded.model.train(was)
    if train:
        return est
    # Forward only: no gradients, optimizer state or saved tensors; working set ≈ a few hidden
    # states of the batch (input, residual, attention/MLP output).
    act = 4 * ids.numel() * loaded.anatomy.hidden_size * 4
    weights = est.weights
    return MemoryEstimate(weights, 0, 0, act, weights + act)


def device_memory(loaded: LoadedModel, cfg: RunConfig, layout: Layout) -> MemoryEstimate:
    """A training device's estimate: its bottom segment, plus its top one when U-shaped."""
    parts = [segment_memory(loaded, cfg, layout.bottom, train=True)]
    if layout.top is not None:
        parts.append(segment_memory(loaded, cfg, layout.top, train=True))
    fields = ("weights", "grads", "optimizer", "activations", "total")
    return MemoryEstimate(*(sum(getattr(m, f) for m in parts) for f in fields))


def combined(device: RoleState, server: RoleState) -> RoleState:
    """The whole adapter (device side + server side) as one state, for eval and export."""
    return RoleState(params={**device.params, **server.params})


def split_extra(
    opts: CutOptions, layout: Layout, params: dict[str, torch.Tensor], skipped: int, rejected: int
) -> dict[str, object]:
    return {
        "cut": opts.cut,
        "u_shaped": opts.u_shaped,
        "device_trainable_params": sum(params[k].numel() for k in layout.device_names),
        "server_trainable_params": sum(params[k].numel() for k in layout.server_names),
        "skipped_batches": skipped,
        "rejected_updates": rejected,
    }


def owned_by_device(layout: Layout, path: str) -> bool:
    return layout.bottom.owns(path) or (layout.top is not None and layout.top.owns(path))


def weighted_mean(
    tensors: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum((w / total) * t[k] for t, w in zip(tensors, weights)) for k in tensors[0]}


@dataclass
class StepLog:
    """What a split server logs of one device's step."""

    device: str
    loss: float
    lr: float
    examples: int


def micro_meta(index: int) -> dict[str, int]:
    """A gradient's micro-batch index for its meta; left out for the first (a step without
    accumulation sends exactly the messages, and bytes, it always did)."""
    return {"micro": index} if index else {}
