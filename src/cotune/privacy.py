"""User-level differential privacy for federated rounds (DP-FedAvg, McMahan et al., ICLR 2018).

Each device's update (its adapter minus the round's global adapter, every tensor together) is
clipped to L2 norm ``clip``; Gaussian noise of standard deviation ``noise_multiplier · clip`` is
added to the sum of the clipped updates (``central``: by the server, before averaging over the
round's participants) or to each update on its device (``local``). The privacy spent is tracked by
Opacus's accountant (RDP or PRV), never by hand: central DP composes one subsampled Gaussian
mechanism per round with sampling rate ``participants / population`` (the accountant assumes
Poisson sampling; cotune samples a fixed number of devices, the usual approximation); local DP
charges each device one unsampled Gaussian mechanism per round it took part in.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from cotune.errors import ConfigError


def _accountant_class(kind: str) -> Any:
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:
        raise ConfigError(
            "train.dp needs Opacus's privacy accountants: pip install 'cotune[dp]'"
        ) from None
    return {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]


def _wider_orders(default: list[float]) -> list[float]:
    """RDP orders past Opacus's default grid (1.1 to 63): down to 1.01, and up to 4096 5%
    apart."""
    high, x = [], 64.0
    while x <= 4096:
        high.append(float(round(x)))
        x *= 1.05
    return [1 + k / 100 for k in range(1, 10)] + list(default) + high


def _at_grid_edge(order: float, default: list[float]) -> bool:
    return order <= default[0] or order >= default[-1]


def rdp_epsilon(accountant: Any, delta: float) -> float:
    """An RDP accountant's epsilon at ``delta``, at the order that bounds it tightest. Much
    noise over few rounds is tightest above the default grid's last order (63), very little
    noise below its first (1.1): there the default bound is loose (2-5x at strong noise) and
    Opacus warns, so the grid is widened (~20x the work, which is why not always)."""
    with _edge_warnings_ignored():  # answered by the wider grid (or inf: no noise at all)
        eps, order = accountant.get_privacy_spent(delta=delta)
        if not _at_grid_edge(order, accountant.DEFAULT_ALPHAS):
            return float(eps)
        grid = _wider_orders(accountant.DEFAULT_ALPHAS)
        return float(accountant.get_privacy_spent(delta=delta, alphas=grid)[0])


@contextlib.contextmanager
def _edge_warnings_ignored() -> Iterator[None]:
    """Opacus's warning that the best order sits at the edge of the grid it was given."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest)")
        yield


def default_delta(population: int) -> float:
    """``1 / n^1.1``: below one over the number of devices, as user-level DP asks."""
    return 1.0 / max(2, population) ** 1.1


def noise_for_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str
) -> float:
    """The noise multiplier that spends ``target_epsilon`` over ``rounds`` releases (RDP: at
    the tightest order, as ``rdp_epsilon`` accounts it)."""
    cls = _accountant_class(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    def search(**orders: Any) -> float | ValueError:
        """The noise on that grid, or Opacus's error when none up to its limit will do."""
        args = {"target_epsilon": target_epsilon, "target_delta": delta,
                "sample_rate": sample_rate, "steps": rounds, "accountant": accountant}  # fmt: skip
        with _edge_warnings_ignored():  # the search's tries far from the answer: not news
            try:
                return float(get_noise_multiplier(**args, **orders))
            except ValueError as err:
                return err

    sigma = search()
    # RDP: the default grid cannot bound below ~0.1 at any noise, and an answer whose best
    # order sits at its edge is looser than the ledger's (rdp_epsilon): search wider.
    if accountant == "rdp" and (
        isinstance(sigma, ValueError)
        or _best_order_at_edge(cls, [(sigma, sample_rate, rounds)], delta)
    ):
        sigma = search(alphas=_wider_orders(cls.DEFAULT_ALPHAS))
    if isinstance(sigma, ValueError):
        raise ConfigError(
            f"train.dp.target_epsilon: {target_epsilon:g} cannot be spent over {rounds} "
            f"release(s) at sampling rate {sample_rate:g} and delta {delta:g} by any noise "
            f"multiplier Opacus considers ({sigma}); ask for a larger epsilon or delta"
        )
    return sigma


def _best_order_at_edge(cls: Any, history: list[tuple[float, float, int]], delta: float) -> bool:
    """Whether an RDP accountant with ``history`` bounds epsilon tightest at an edge of
    Opacus's default grid of orders."""
    acc = cls()
    acc.history = history
    with _edge_warnings_ignored():
        return _at_grid_edge(acc.get_privacy_spent(delta=delta)[1], cls.DEFAULT_ALPHAS)


class PrivacyLedger:
    """What the run has spent: one accountant (central) or one per device (local)."""

    def __init__(self, accountant: str, delta: float) -> None:
        self.kind, self.delta = accountant, delta
        self._accountants: dict[str, Any] = {}

    def spend(self, noise_multiplier: float, sample_rate: float, who: str = "all") -> None:
        if who not in self._accountants:
            self._accountants[who] = _accountant_class(self.kind)()
        self._accountants[who].step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self) -> float | None:
        """The largest epsilon anyone has spent at ``delta`` (None before any release)."""
        if not self._accountants:
            return None
        if self.kind == "rdp":
            eps = [rdp_epsilon(a, self.delta) for a in self._accountants.values()]
        else:
            eps = [a.get_epsilon(delta=self.delta) for a in self._accountants.values()]
        return float(max(eps))

    def state_dict(self) -> dict[str, list]:
        return {who: list(a.history) for who, a in self._accountants.items()}

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        self._accountants = {}
        for who, history in state.items():
            acc = _accountant_class(self.kind)()
            acc.history = [tuple(h) for h in history]
            self._accountants[who] = acc


def update_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    sq = sum(float((update[k].float() - reference[k].float()).pow(2).sum()) for k in update)
    return math.sqrt(sq)


def clipped_delta(
    update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clip: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``update − reference`` scaled to L2 norm at most ``clip``; and its norm before."""
    norm = update_norm(update, reference)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (update[k].float() - reference[k].float()) * scale for k in update}, norm


def add_noise(
    tensors: dict[str, torch.Tensor], std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``tensors`` + N(0, std²) per element, drawn from ``generator`` (CPU, reproducible)."""
    if std == 0:
        return tensors
    out = {}
    for k, v in tensors.items():
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float32) * std
        out[k] = v + noise.to(v.device)
    return out
