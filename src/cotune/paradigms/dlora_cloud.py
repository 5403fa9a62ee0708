"""DLoRA's cloud role (``Cloud``): it holds the frozen backbone and runs the blocks for whichever
device is stepping, calling out to that device for the LoRA branch of every active module
(``RemoteDelta``: the branch's forward and backward are the device's), and merges the modules a
device killed into its copy of the backbone. See ``dlora.py`` for the protocol.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cotune.accel.compute import compute_of, without_checkpointing
from cotune.errors import ProtocolError
from cotune.models import Activations
from cotune.paradigms.base import reply
from cotune.peft.grouped import bind_state
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext

log = logging.getLogger(__name__)


def lora_flops(layer: Any, x: torch.Tensor) -> int:
    """Forward FLOPs of a LoRA branch on ``x`` (the two rank-r products)."""
    r, fin = layer.lora_A.weight.shape
    fout = layer.lora_B.weight.shape[0]
    return 2 * (x.numel() // x.shape[-1]) * r * (fin + fout)


class RemoteDelta(torch.autograd.Function):
    """The LoRA branch computed on the device: forward and backward are message exchanges.

    ``anchor`` (an empty tensor that requires grad) keeps the branch in the graph even where
    ``x`` needs no gradient (the first block's input), since the device's LoRA still does.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, anchor: torch.Tensor, cloud: Cloud, path: str
    ) -> torch.Tensor:
        ctx.cloud, ctx.path = cloud, path
        return cloud.exchange("lora_fwd", path, x, "x", "y")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        need = bool(ctx.needs_input_grad[0])
        gx = ctx.cloud.exchange("lora_bwd", ctx.path, grad, "g", "gx", need_gx=need)
        return (gx if need else None), None, None, None


class Cloud(Role):
    """Runs the frozen blocks for whichever device is stepping; calls out to it per active module.

    The cloud's own role, on the driver's node. Per device it keeps the tensors of the modules
    that device killed (merged into "its copy of the backbone"), and computes those with them.
    """

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.node_id)
        self.ctx = ctx
        anatomy = ctx.model.loaded.anatomy
        n = anatomy.num_layers
        self.body = anatomy.segment(0, n, embed=False, head=False)
        self.embed = anatomy.segment(0, 0, embed=True, head=False)
        self.layers = ctx.model.adapters.layers
        self.pending: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {}
        self.merged: dict[str, dict[str, torch.Tensor]] = {}  # device → killed modules' tensors
        self.device, self.meta = "", {}
        self.lora_flops = self.fwd_flops = 0
        self.anchor = torch.empty(0, requires_grad=True)
        if compute_of(ctx.model.loaded.model).checkpointing:
            log.info(
                "dlora: the cloud's blocks run without gradient checkpointing (their "
                "LoRA branches are on the devices; a recompute would ask them again)"
            )

    def exchange(
        self, kind: str, path: str, t: torch.Tensor, key: str, back: str, **meta: Any
    ) -> torch.Tensor | None:
        msg = Message(
            kind, SERVER, self.device, {key: t.detach()}, {**self.meta, **meta, "layer": path}
        )
        assert self.ctx.grid is not None
        return self.ctx.grid.request(msg).tensors.get(back)

    def _patched(self, active: set[str], merged: dict[str, torch.Tensor]) -> list[Any]:
        """Route the cloud's own layers for this forward: active modules to the device, killed
        ones through the device's merged tensors (the instance attribute is removed after)."""
        for path, layer in self.layers.items():
            own = {k: v for k, v in merged.items() if k.startswith(path + ".")}

            def fwd(x: torch.Tensor, layer: Any = layer, path: str = path, own=own) -> torch.Tensor:
                y = layer.base_forward(x)
                if path in active:
                    self.lora_flops += 3 * lora_flops(layer, x)  # ran on the device
                    return y + RemoteDelta.apply(x, self.anchor, self, path).to(y.dtype)
                # Killed: merged into this device's backbone, frozen.
                with torch.no_grad(), bind_state({path: layer}, own):
                    return y + layer.delta(x).to(y.dtype)

            layer.forward = fwd  # instance attribute: shadows the class's forward
        return list(self.layers.values())

    def on_forward(self, msg: Message) -> Message:
        self.device, self.meta = msg.sender, {"round": msg.meta["round"]}
        active = tuple(msg.meta["active"])
        self.lora_flops = 0
        killed = set(self.layers) - set(active)
        merged = self.merged.get(msg.sender, {})
        missing = sorted(p for p in killed if not any(k.startswith(p + ".") for k in merged))
        if missing:
            raise ProtocolError(
                f"{msg.describe()}: modules {missing[:3]} are neither active nor killed"
            )
        patched = self._patched(set(active), merged)
        mask = msg.tensors["mask"]
        if "input_ids" in msg.tensors:  # embed: cloud — the device sent its token ids
            with torch.no_grad():
                hidden = self.embed(msg.tensors["input_ids"], mask).hidden
        else:
            hidden = msg.tensors["hidden"]
        try:
            # Recomputing a block in the backward would ask the device for its branches again
            # (and the patched forwards are gone by then): the cloud keeps its activations.
            with torch.enable_grad(), without_checkpointing(self.ctx.model.loaded.model):
                out, self.fwd_flops = self.ctx.meter.flops.run(
                    "dlora-cloud-fwd",
                    lambda h, m, a: self.body(Activations(h, m)),
                    hidden,
                    mask,
                    active,
                )
        finally:
            for layer in patched:
                del layer.forward
        self.pending[msg.sender] = (out.hidden, active)
        return reply(msg, "hidden", {"hidden": out.hidden.detach()}, **self.meta)

    def on_backward(self, msg: Message) -> Message:
        hidden, active = self.pending.pop(msg.sender)
        grad, meter = msg.tensors["grad"], self.ctx.meter
        bwd = 0
        if hidden.requires_grad:
            _, bwd = meter.flops.run(
                "dlora-cloud-bwd", lambda g, a: hidden.backward(g), grad, active
            )
        # What ran here, less the LoRA branches the device ran inside these calls.
        flops = max(self.fwd_flops + bwd - self.lora_flops, 0)
        meter.compute(flops, waits_for=msg.sender, label="backbone")
        return reply(msg, "ack", **self.meta)

    def on_kill(self, msg: Message) -> Message:
        # The killed modules' tensors: merged into this device's copy of the backbone.
        self.merged.setdefault(msg.sender, {}).update(
            {k: v.detach().clone() for k, v in msg.tensors.items()}
        )
        return reply(msg, "merged", round=msg.meta["round"])
