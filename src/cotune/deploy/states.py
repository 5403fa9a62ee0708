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
    try:
        return _rich(plain)
    except Exception as err:  # noqa: BLE001 - a role state with missing or mistyped fields
        raise ProtocolError(f"a peer's state is not a role state: {err}") from None


def check_state(state: Any) -> None:
    """Refuse a state a peer sent (``ProtocolError`` naming the field) when one of its role
    states has fields of the wrong type or a non-finite parameter. (Its layout is not held to
    an earlier one: a device's parameters may legitimately change shape, e.g. the rank it is
    given, or be let go between rounds.) The server keeps such a state out of evaluations and
    checkpoints."""
    _check(state, "state")


def _check(obj: Any, where: str) -> None:
    if isinstance(obj, RoleState):
        _check_role_state(obj, where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check(v, f"{where}[{k!r}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check(v, f"{where}[{i}]")


def _check_role_state(st: RoleState, where: str) -> None:
    if not isinstance(st.params, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in st.params.items()
    ):
        raise ProtocolError(f"{where}.params is not a mapping of names to tensors")
    if not isinstance(st.optim, dict) or not all(isinstance(v, dict) for v in st.optim.values()):
        raise ProtocolError(f"{where}.optim is not a mapping of names to optimizer states")
    if st.step < 0:
        raise ProtocolError(f"{where}.step is negative ({st.step})")
    for field in ("rng", "cuda_rng"):
        rng = getattr(st, field)
        if rng is not None and not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
            raise ProtocolError(f"{where}.{field} is not a generator state (uint8 tensor)")
    for field in ("sampler", "scaler"):
        if getattr(st, field) is not None and not isinstance(getattr(st, field), dict):
            raise ProtocolError(f"{where}.{field} is not a mapping")
    for name, t in st.params.items():
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"{where}.params[{name!r}] holds a non-finite value")
