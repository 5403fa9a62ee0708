"""``train.dp`` in a fedavg run: the noise it adds, where, and what it has spent (privacy.py).

Central: the server clips every report's change to the round's global adapter, sums them, adds
N(0, (σ·clip)²) to the sum and divides by the round's participants (a fixed denominator, so one
device moves the average by at most clip / participants). Local: each device does the clipping
and noising itself (``FedDevice._privatised``; the round message carries σ, clip and a seed) and
the server averages what arrives. Either way every report weighs the same: weighting by example
counts would let the data sizes through.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from cotune.errors import ConfigError
from cotune.privacy import (
    PrivacyLedger,
    add_noise,
    clipped_delta,
    default_delta,
    noise_for_epsilon,
)
from cotune.runtime.messages import Message

#: Aggregators whose result is not a mean of the reports: central DP's noise is calibrated to
#: a sum, so they would be private but aggregate something else.
NOT_A_MEAN = ("median", "trimmed_mean")


class RoundPrivacy:
    def __init__(self, cfg: Any, opts: Any, devices: list[str], rounds: int) -> None:
        dp = cfg.train.dp
        n = len(devices)
        per_round = opts.clients_per_round or max(1, round(opts.fraction * n))
        self.mode, self.clip, self.seed = dp.mode, dp.clip, cfg.seed
        self.q = min(1.0, per_round / n)
        self.delta = dp.delta if dp.delta is not None else default_delta(n)
        if self.mode == "central" and opts.aggregator in NOT_A_MEAN:
            raise ConfigError(
                f"train.dp.mode central: aggregator {opts.aggregator} is not a mean of the "
                "reports; use fedavg, fedavgm, fedadagrad, fedadam or fedyogi"
            )
        if dp.noise_multiplier is not None:
            self.sigma = float(dp.noise_multiplier)
        else:  # local: a device's releases are its participations, each unsampled
            releases = rounds if self.mode == "central" else max(1, round(rounds * self.q))
            rate = self.q if self.mode == "central" else 1.0
            self.sigma = noise_for_epsilon(dp.target_epsilon, self.delta, rate, releases,
                                           dp.accountant)  # fmt: skip
        self.ledger = PrivacyLedger(dp.accountant, self.delta)

    def round_meta(self) -> dict[str, Any]:
        """What a local-DP device needs in its round message (nothing for central DP)."""
        if self.mode != "local":
            return {}
        return {"dp": {"sigma": self.sigma, "clip": self.clip, "seed": self.seed}}

    def aggregate(
        self,
        aggregator: Any,
        glob: dict[str, torch.Tensor],
        good: list[Message],
        participants: int,
        rnd: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The round's new global adapter and the round record's ``dp_*`` fields."""
        if self.mode == "local":
            new = aggregator.aggregate(glob, [m.tensors for m in good], [1.0] * len(good))
            for m in good:
                self.ledger.spend(self.sigma, 1.0, who=m.sender)
            return new, {"dp_epsilon": self.ledger.epsilon()}
        total: dict[str, torch.Tensor] = {k: torch.zeros_like(v, dtype=torch.float32)
                                          for k, v in glob.items()}  # fmt: skip
        norms = []
        for m in good:
            delta, norm = clipped_delta(m.tensors, glob, self.clip)
            norms.append(norm)
            for k, v in delta.items():
                total[k] += v.to(total[k].device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd)
        noisy = add_noise(total, self.sigma * self.clip, gen)
        update = {k: glob[k] + (noisy[k] / participants).to(glob[k].dtype) for k in glob}
        new = aggregator.aggregate(glob, [update], [1.0])
        self.ledger.spend(self.sigma, self.q)
        return new, {
            "dp_epsilon": self.ledger.epsilon(),
            "dp_clipped": sum(n > self.clip for n in norms),
            "dp_update_norm": statistics.median(norms) if norms else None,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "epsilon": self.ledger.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.sigma,
            "clip": self.clip,
            "sample_rate": self.q if self.mode == "central" else 1.0,
            "accountant": self.ledger.kind,
        }
