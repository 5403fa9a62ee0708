"""Server-side aggregation of adapter states (dicts of tensors keyed by parameter name).

An aggregator turns the global state and the clients' returned states into the next global
state in two steps: a *reducer* combines the client states (sample-weighted mean, coordinate-wise
median, trimmed mean), then a *server optimizer* applies the pseudo-gradient
``g = global − reduced`` (FedAvg, FedAvgM, and FedAdagrad/FedAdam/FedYogi from Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021, Algorithm 2: m_{-1}=0, v_{-1}=τ², no bias
correction). Reductions run in float64 and are cast back to the global state's dtype.

This module imports torch but not transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from cotune.errors import ConfigError, ProtocolError
from cotune.paradigms.options import AGGREGATOR_OPTIONS

State = Mapping[str, Tensor]


def _check_updates(updates: Sequence[State], reference: State | None = None) -> list[str]:
    if not updates:
        raise ProtocolError("aggregation needs at least one client update, got none")
    ref = reference if reference is not None else updates[0]
    keys = sorted(ref)
    for i, u in enumerate(updates):
        if set(u) != set(keys):
            missing, extra = sorted(set(keys) - set(u)), sorted(set(u) - set(keys))
            raise ProtocolError(
                f"update {i}: keys differ (missing {missing[:3]}, extra {extra[:3]})"
            )
        for k in keys:
            if u[k].shape != ref[k].shape:
                raise ProtocolError(
                    f"update {i}: {k} has shape {tuple(u[k].shape)}, expected {tuple(ref[k].shape)}"
                )
    return keys


def _wide(device: torch.device) -> torch.dtype:
    """Accumulation dtype: float64, except where the device has none (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _stack(updates: Sequence[State], key: str) -> Tensor:
    wide = _wide(updates[0][key].device)
    return torch.stack([u[key].detach().to(wide) for u in updates])


def weighted_average(
    updates: Sequence[State], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Sample-weighted mean (FedAvg); ``weights=None`` is the plain mean."""
    keys = _check_updates(updates)
    w = (
        torch.ones(len(updates), dtype=torch.float64)
        if weights is None
        else torch.tensor(list(weights), dtype=torch.float64)
    )
    if w.numel() != len(updates) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ProtocolError(
            f"aggregation weights must be {len(updates)} non-negative numbers with a positive sum, got {list(w.tolist())}"
        )
    w = w / w.sum()
    out = {}
    for k in keys:
        s = _stack(updates, k)
        out[k] = torch.tensordot(w.to(s.device, s.dtype), s, dims=1).to(updates[0][k].dtype)
    return out


def coordinate_median(updates: Sequence[State]) -> dict[str, Tensor]:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    keys = _check_updates(updates)
    n = len(updates)
    out = {}
    for k in keys:
        s = _stack(updates, k).sort(dim=0).values
        mid = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        out[k] = mid.to(updates[0][k].dtype)
    return out


def trimmed_mean(updates: Sequence[State], beta: float) -> dict[str, Tensor]:
    """Coordinate-wise mean after dropping the ``floor(beta·n)`` smallest and largest values."""
    keys = _check_updates(updates)
    n = len(updates)
    cut = int(beta * n)
    if n - 2 * cut < 1:
        raise ProtocolError(f"trimmed mean with beta={beta} leaves nothing of {n} updates")
    return {
        k: _stack(updates, k).sort(dim=0).values[cut : n - cut].mean(dim=0).to(updates[0][k].dtype)
        for k in keys
    }


def proximal_loss(params: State, global_params: State, mu: float) -> Tensor:
    """FedProx term ``mu/2 · Σ ||w − w_global||²`` over ``params``' keys (global is constant)."""
    terms = []
    for name, p in params.items():
        if name not in global_params:
            raise ProtocolError(f"proximal_loss: {name!r} has no global value")
        terms.append((p - global_params[name].detach().to(p.device, p.dtype)).pow(2).sum())
    if not terms:
        raise ProtocolError("proximal_loss: no parameters given")
    return 0.5 * mu * torch.stack(terms).sum()


class Aggregator:
    """FedAvg with server learning rate ``eta``: x ← x − η·(x − reduced). With η = 1 the
    result is exactly the reduced state. Subclasses change the server step."""

    name = "fedavg"

    def __init__(self, eta: float = 1.0, reducer: str = "mean", trim_beta: float = 0.1) -> None:
        if eta <= 0:
            raise ConfigError(f"aggregator {self.name}: eta must be > 0, got {eta}")
        if reducer not in ("mean", "median", "trimmed_mean"):
            raise ConfigError(
                f"aggregator {self.name}: reducer {reducer!r} is not one of mean, median, trimmed_mean"
            )
        if not 0.0 <= trim_beta < 0.5:
            raise ConfigError(
                f"aggregator {self.name}: trim_beta must be in [0, 0.5), got {trim_beta}"
            )
        self.eta, self.reducer, self.trim_beta = eta, reducer, trim_beta
        self.rounds = 0
        self.state: dict[str, dict[str, Tensor]] = {}  # server optimizer buffers, e.g. {"m": {...}}

    def reduce(
        self, updates: Sequence[State], weights: Sequence[float] | None = None
    ) -> dict[str, Tensor]:
        """Combine client states; the robust reducers ignore ``weights``."""
        if self.reducer == "median":
            return coordinate_median(updates)
        if self.reducer == "trimmed_mean":
            return trimmed_mean(updates, self.trim_beta)
        return weighted_average(updates, weights)

    def aggregate(
        self, global_state: State, updates: Sequence[State], weights: Sequence[float] | None = None
    ) -> dict[str, Tensor]:
        """Next global state from the current one and the clients' returned states."""
        _check_updates(updates, global_state)
        self.rounds += 1
        return self._apply(global_state, self.reduce(updates, weights))

    def aggregate_partial(
        self, global_state: State, updates: Sequence[State], weights: Sequence[float] | None = None
    ) -> dict[str, Tensor]:
        """Like `aggregate`, for clients that each return only some tensors (those they train):
        each tensor is combined over the updates that hold it; a tensor no update holds keeps
        its global value. With full updates this is `aggregate`."""
        if not updates:
            raise ProtocolError("aggregation needs at least one client update, got none")
        w = list(weights) if weights is not None else [1.0] * len(updates)
        groups: dict[tuple[int, ...], list[str]] = {}
        for i, u in enumerate(updates):
            extra = sorted(set(u) - set(global_state))
            if extra:
                raise ProtocolError(f"update {i}: tensors {extra[:3]} are not in the global state")
        for k in global_state:
            groups.setdefault(tuple(i for i, u in enumerate(updates) if k in u), []).append(k)
        self.rounds += 1
        out = {k: global_state[k] for k in groups.get((), [])}
        for holders, keys in groups.items():
            if not holders:
                continue
            part = [{k: updates[i][k] for k in keys} for i in holders]
            sub = {k: global_state[k] for k in keys}
            _check_updates(part, sub)
            out.update(self._apply(sub, self.reduce(part, [w[i] for i in holders])))
        return {k: out[k] for k in global_state}

    def _apply(self, global_state: State, reduced: dict[str, Tensor]) -> dict[str, Tensor]:
        """The server step from the reduced client state."""
        if type(self) is Aggregator and self.eta == 1.0:
            return reduced  # exactly the (weighted) mean: no x − (x − avg) rounding
        out = {}
        for k, x in global_state.items():
            x64 = x.detach().to(_wide(x.device))
            g = x64 - reduced[k].to(x64.dtype)
            out[k] = (x64 - self.step(k, g)).to(x.dtype)
        return out

    def step(self, key: str, g: Tensor) -> Tensor:
        """The amount to subtract from the global value for pseudo-gradient ``g``."""
        return self.eta * g

    def _buf(self, name: str, key: str, like: Tensor, fill: float = 0.0) -> Tensor:
        buf = self.state.setdefault(name, {})
        if key not in buf:
            buf[key] = torch.full_like(like, fill)
        return buf[key]

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "state": {n: {k: v.clone() for k, v in b.items()} for n, b in self.state.items()},
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.rounds = int(sd["rounds"])
        self.state = {n: {k: v.clone() for k, v in b.items()} for n, b in sd["state"].items()}


class FedAvgM(Aggregator):
    """Server momentum (Hsu et al. 2019): v ← β·v + g; x ← x − η·v."""

    name = "fedavgm"

    def __init__(self, eta: float = 1.0, momentum: float = 0.9, **kw: Any) -> None:
        super().__init__(eta, **kw)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"aggregator fedavgm: momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def step(self, key: str, g: Tensor) -> Tensor:
        v = self._buf("v", key, g)
        v.mul_(self.momentum).add_(g)
        return self.eta * v


class _FedOpt(Aggregator):
    """Reddi et al. Algorithm 2 with Δ = −g: m ← β1·m + (1−β1)·g; v ← rule(v, g²);
    x ← x − η·m / (√v + τ)."""

    def __init__(
        self,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **kw: Any,
    ) -> None:
        super().__init__(eta, **kw)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and tau > 0):
            raise ConfigError(
                f"aggregator {self.name}: need 0 <= beta1, beta2 < 1 and tau > 0, got {beta1}, {beta2}, {tau}"
            )
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, key: str, g: Tensor) -> Tensor:
        m = self._buf("m", key, g)
        m.mul_(self.beta1).add_((1 - self.beta1) * g)
        v = self._buf("v", key, g, fill=self.tau**2)
        v.copy_(self.second_moment(v, g * g))
        return self.eta * m / (v.sqrt() + self.tau)


class FedAdagrad(_FedOpt):
    name = "fedadagrad"

    def second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        return v + g2


class FedAdam(_FedOpt):
    name = "fedadam"

    def second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * g2


class FedYogi(_FedOpt):
    name = "fedyogi"

    def second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        return v - (1 - self.beta2) * g2 * torch.sign(v - g2)


def _median(**kw: Any) -> Aggregator:
    return Aggregator(reducer="median", **kw)


def _trimmed(beta: float = 0.1, **kw: Any) -> Aggregator:
    return Aggregator(reducer="trimmed_mean", trim_beta=beta, **kw)


AGGREGATORS = {
    "fedavg": Aggregator,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "median": _median,
    "trimmed_mean": _trimmed,
}


OPTIONS = AGGREGATOR_OPTIONS  # name -> the options it takes (validated at config load)


def get_aggregator(name: str, **options: Any) -> Aggregator:
    """An aggregator by name, e.g. ``get_aggregator("fedadam", eta=1e-2, tau=1e-3)``."""
    try:
        factory = AGGREGATORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown aggregator {name!r} (known: {', '.join(AGGREGATORS)})"
        ) from None
    allowed = OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"aggregator {name}: unknown option(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )
    return factory(**options)
