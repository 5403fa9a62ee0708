"""Every paradigm's options, as typed models validated when the config is loaded (one module
per family: ``federated``, ``split``, ``hat``; the base and ``parse_options`` in ``base``).

``paradigm.options`` is free-form in YAML; each paradigm registers its model here (one line in
``OPTIONS``) so ``load_config`` can reject a bad option before anything runs or is written, with
the same ``paradigm.options.<field>: ... (got ...)`` message as every other config field.
Checks that need only the config (pooled server needs a shared server side, one cut per device,
...) live in each model's ``check_config``; checks that need the model (a cut inside the
model's blocks, whether a segment fits a device's memory) run in the paradigm's ``preflight``,
still before the run directory is touched.

This package imports only pydantic: the CLI validates configs without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from cotune.errors import ConfigError
from cotune.paradigms.options.base import (
    LocalOptions,
    NoOptions,
    ParadigmOptions,
    format_errors,
    parse_options,
)
from cotune.paradigms.options.federated import (
    AGGREGATOR_OPTIONS,
    AsyncOptions,
    ClusteredOptions,
    DLoRAOptions,
    FedAsyncOptions,
    FedAvgOptions,
    FedBiOTOptions,
    FedBuffOptions,
    HierFedOptions,
    SecAggOptions,
    dlora_refuses,
)
from cotune.paradigms.options.hat import HatDrafterOptions, HatServeOptions
from cotune.paradigms.options.split import (
    CutOptions,
    SplitFedOptions,
    SplitFrozenOptions,
    SplitOptions,
)

if TYPE_CHECKING:
    from cotune.config import RunConfig

__all__ = [
    "AGGREGATOR_OPTIONS",
    "OPTIONS",
    "AsyncOptions",
    "ClusteredOptions",
    "CutOptions",
    "DLoRAOptions",
    "FedAsyncOptions",
    "FedAvgOptions",
    "FedBiOTOptions",
    "FedBuffOptions",
    "HatDrafterOptions",
    "HatServeOptions",
    "HierFedOptions",
    "LocalOptions",
    "NoOptions",
    "ParadigmOptions",
    "SecAggOptions",
    "SplitFedOptions",
    "SplitFrozenOptions",
    "SplitOptions",
    "check_paradigm_options",
    "dlora_refuses",
    "parse_options",
]

# name -> options model. One line per paradigm (the same names as cotune.paradigms.PARADIGMS).
OPTIONS: dict[str, type[ParadigmOptions]] = {
    "central": NoOptions,
    "local": LocalOptions,
    "fedavg": FedAvgOptions,
    "split": SplitOptions,
    "splitfed": SplitFedOptions,
    "splitfrozen": SplitFrozenOptions,
    "hierfed": HierFedOptions,
    "fedbiot": FedBiOTOptions,
    "dlora": DLoRAOptions,
    "fedasync": FedAsyncOptions,
    "fedbuff": FedBuffOptions,
    "clustered": ClusteredOptions,
    "hat_drafter": HatDrafterOptions,
    "hat_serve": HatServeOptions,
}


def check_paradigm_options(cfg: RunConfig, source: str) -> ParadigmOptions:
    """Validate ``cfg.paradigm.options`` (and its cross-checks) as part of loading the config."""
    model = OPTIONS[cfg.paradigm.name]
    try:
        opts = model.model_validate(cfg.paradigm.options)
    except ValidationError as err:
        lines = format_errors(err, model, "paradigm.options")
        raise ConfigError("\n".join([f"invalid config ({source}):", *lines])) from None
    try:
        opts.check_config(cfg)
    except ValueError as err:
        text = str(err)
        field = text.split(":", 1)[0]
        # Messages start with the field they are about: an option, or another section's field.
        prefix = "" if "." in field else "paradigm.options."
        raise ConfigError(f"invalid config ({source}):\n  {prefix}{text}") from None
    return opts
