"""Paradigms: how devices and the cloud share the work. One readable driver per file."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from cotune.errors import ConfigError

if TYPE_CHECKING:
    from cotune.paradigms.base import Experiment, ParadigmResult

# name -> module; each module has `run(exp) -> ParadigmResult`. One line per paradigm.
PARADIGMS: dict[str, str] = {
    "central": "cotune.paradigms.central",
    "local": "cotune.paradigms.local",
    "fedavg": "cotune.paradigms.fedavg",
    "split": "cotune.paradigms.split",
    "splitfed": "cotune.paradigms.splitfed",
    "splitfrozen": "cotune.paradigms.splitfrozen",
    "hierfed": "cotune.paradigms.hierfed",
    "fedbiot": "cotune.paradigms.fedbiot",
    "dlora": "cotune.paradigms.dlora",
    "fedasync": "cotune.paradigms.fedasync",
    "fedbuff": "cotune.paradigms.fedbuff",
    "clustered": "cotune.paradigms.clustered",
    "hat_drafter": "cotune.paradigms.hat_drafter",
    "hat_serve": "cotune.paradigms.hat_serve",
}


def get_paradigm(name: str) -> Callable[[Experiment], ParadigmResult]:
    if name not in PARADIGMS:
        raise ConfigError(
            f"paradigm.name: unknown paradigm {name!r} (allowed: {', '.join(PARADIGMS)})"
        )
    return importlib.import_module(PARADIGMS[name]).run


def get_preflight(name: str) -> Callable[[Experiment], None] | None:
    """The paradigm's checks that need the model (cuts, depths, memory), if it has any: run
    before the run directory is touched, so a bad option never leaves files behind."""
    get_paradigm(name)
    return getattr(importlib.import_module(PARADIGMS[name]), "preflight", None)
