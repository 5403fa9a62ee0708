"""The search space: mixture weights on the simplex × model rung × training steps."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from cotune.config import RunConfig, config_from_dict
from cotune.errors import ConfigError


@dataclass(frozen=True)
class Fidelity:
    rung: int  # index into the ladder (the last is the target model)
    steps: int


@dataclass
class MixtureSpace:
    base: RunConfig  # the user's run: its model is the target rung, train.steps the target steps
    domains: list[str]
    rungs: list[dict[str, Any]]  # model-field overrides per rung ({} for the target)
    steps: list[int]  # ascending step fidelities, the target last

    @classmethod
    def from_config(cls, cfg: RunConfig, domain_names: list[str] | None) -> MixtureSpace:
        m = cfg.mixture
        if m is None:
            raise ConfigError("mixture: the config has no mixture section (see docs/config.md)")
        if not domain_names:
            raise ConfigError(f"mixture: data {cfg.data.dataset!r} has no domains or labels to mix")
        domains = list(m.domains) or list(domain_names)
        unknown = sorted(set(domains) - set(domain_names))
        if unknown:
            raise ConfigError(
                f"mixture.domains: unknown domain(s) {unknown}; the data's: {domain_names}"
            )
        if len(domains) < 2:
            raise ConfigError(f"mixture.domains: a mixture needs 2+ domains, got {domains}")
        target = cfg.train.steps
        steps = sorted(set(m.steps) or {max(1, target // 4), max(1, target // 2)})
        if steps and steps[-1] >= target:
            raise ConfigError(
                f"mixture.steps: fidelities must be below train.steps ({target}), got {m.steps}"
            )
        return cls(cfg, domains, [*m.ladder, {}], [*steps, target])

    @property
    def k(self) -> int:
        return len(self.domains)

    @property
    def target(self) -> Fidelity:
        return Fidelity(len(self.rungs) - 1, self.steps[-1])

    def fidelities(self) -> list[Fidelity]:
        return [Fidelity(r, s) for r in range(len(self.rungs)) for s in self.steps]

    def fidelity_features(self, fid: Fidelity) -> list[float]:
        """The GP inputs after the weights: the rung and the steps, each scaled to [0, 1]."""
        r = fid.rung / (len(self.rungs) - 1) if len(self.rungs) > 1 else 1.0
        return [r, fid.steps / self.steps[-1]]

    def features(self, weights: list[float], fid: Fidelity) -> list[float]:
        """GP inputs: the weights, then the fidelity's features."""
        return [*weights, *self.fidelity_features(fid)]

    def target_values(self, ev: Any) -> list[float]:
        """The objective values an evaluation reached at the target fidelity (none, or one)."""
        if ev.rung != self.target.rung:
            return []
        return [v for s, v in ev.points if s == self.target.steps]

    def run_config(self, weights: list[float], fid: Fidelity, name: str, out_dir: str) -> RunConfig:
        """A real cotune run of this configuration: the mixture, the rung's model, ``fid.steps``
        steps on the target's LR schedule, evaluated at every step fidelity it passes."""
        d = copy.deepcopy(self.base.model_dump(mode="json"))
        d.pop("mixture", None)
        d["name"] = name
        rung = self.rungs[fid.rung]
        for key, value in rung.items():
            if isinstance(value, dict) and isinstance(d["model"].get(key), dict):
                d["model"][key] = {**d["model"][key], **value}
            else:
                d["model"][key] = value
        d["data"]["mixture"] = {n: float(w) for n, w in zip(self.domains, weights, strict=True)}
        d["train"]["steps"] = fid.steps
        d["train"]["schedule_steps"] = self.steps[-1]
        d["train"]["warmup_steps"] = min(d["train"].get("warmup_steps", 0), fid.steps - 1)
        d["eval"]["every"] = self.steps[0]
        d["output"] = {**d["output"], "dir": out_dir, "save_adapter": False, "checkpoint_every": 0}
        try:
            return config_from_dict(d)
        except Exception as err:  # noqa: BLE001 - name the rung the bad override came from
            raise ConfigError(f"mixture.ladder[{fid.rung}] = {rung}: {err}") from None


def dirichlet(rng: np.random.Generator, k: int) -> list[float]:
    """Uniform on the simplex (Dirichlet(1)), as the authors' initial design and random search."""
    return [float(x) for x in rng.dirichlet(np.ones(k))]
