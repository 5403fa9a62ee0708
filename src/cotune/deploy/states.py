"""Role states across processes (the measurement channel: snapshots for evaluation and
checkpoints, restores on resume). A state is made of ``RoleState``s, tensors, numbers, strings
and containers; it travels as ``torch.save`` bytes of plain containers and is read back with
``weights_only=True``, so a peer's payload can never run code on the receiving side."""

from __future__ import annotations

import io
from typing import Any

import torch

from cotune.errors import ProtocolError
from cotune.train import RoleState

_TAG = "__cotune_role_state__"


def _plain(obj: Any) -> Any:
    if isinstance(obj, RoleState):
        return {_TAG: _plain(obj.state_dict())}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, torch.Tensor):  # (meta: a layer the node does not hold, as it is)
        return obj.detach() if obj.is_meta else obj.detach().cpu()
    return obj


def _rich(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TAG}:
            return RoleState.from_state_dict(_rich(obj[_TAG]))
        return {k: _rich(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_rich(v) for v in obj)
    return obj


def dump_state(state: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(_plain(state), buf)
    return buf.getvalue()


def load_state(data: bytes, map_location: Any = "cpu") -> Any:
    try:
        plain = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad payload
        raise ProtocolError(f"a peer's state could not be read: {err}") from None
    return _rich(plain)
