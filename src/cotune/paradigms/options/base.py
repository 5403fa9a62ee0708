"""The base of every paradigm's options model, and ``parse_options``: a typed copy of
``paradigm.options`` with ``ConfigError`` naming each bad field. Pydantic only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cotune.errors import ConfigError

if TYPE_CHECKING:
    from cotune.config import RunConfig


T = TypeVar("T", bound="ParadigmOptions")


class ParadigmOptions(BaseModel):
    """Base of a paradigm's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    def check_config(self, cfg: RunConfig) -> None:
        """Cross-checks against the rest of the config; raise ``ValueError("field: why")``."""

    def infrastructure(self) -> dict[str, str]:
        """Nodes besides the server and the devices (node id → device profile name): part of
        the deployment's topology, so engines and the simulator know them before any role."""
        return {}

    def profile_fields(self) -> dict[str, str]:
        """Options that name a device profile (field → name): ``load_config`` checks them
        against the known profiles (built-in and ``devices.profile_file``)."""
        return {}


class NoOptions(ParadigmOptions):
    """Paradigms without options (central): any option given is a mistake."""


class LocalOptions(ParadigmOptions):
    # In-process engine (and a Ray host): the devices' steps between two evaluations as one
    # batch, each device on its own adapter tensors (fed_cohort.py); off: one device at a time.
    cohort: bool = False
    # At most this many rows in one cohort pass (devices x train.batch_size): a round's
    # devices run in consecutive cohorts of that size, bounding the activations held at
    # once (None: all of them together).
    cohort_rows: int | None = Field(None, ge=1)


def format_errors(err: ValidationError, model: type[BaseModel], where: str) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        field = f"{where}.{loc}" if loc else where
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(model.model_fields)) or "none"
            lines.append(f"  {field}: unknown option (allowed: {allowed})")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if not loc and sep and head.isidentifier():  # a model check naming its own field
            field, msg = f"{where}.{head}", rest
        if e["type"] == "literal_error":
            msg = f"{e.get('input')!r} is not allowed (allowed: {e.get('ctx', {}).get('expected')})"
        elif "input" in e and not isinstance(e["input"], dict) and e["type"] != "value_error":
            msg += f" (got {e['input']!r})"
        lines.append(f"  {field}: {msg}")
    return lines


def parse_options(model: type[T], options: dict[str, Any]) -> T:
    """``options`` as ``model`` types them; ``ConfigError`` naming each bad field. (``load_config``
    has validated them already: drivers and roles call this for their typed copy.)"""
    where = "paradigm.options"
    try:
        return model.model_validate(options)
    except ValidationError as err:
        raise ConfigError(
            "\n".join([f"invalid {where}:", *format_errors(err, model, where)])
        ) from None
