"""The error hierarchy. Every message says what was wrong, where, and what to do."""

from __future__ import annotations


class CotuneError(Exception):
    """Base of every error cotune raises on purpose; the CLI prints these without a traceback."""


class ConfigError(CotuneError):
    """A run config is invalid: unknown key, wrong type, value outside the allowed set."""


class DataError(CotuneError):
    """A data file or dataset is unusable: bad line, missing field, empty partition."""


class ModelError(CotuneError):
    """A model cannot be loaded or cut: unknown family, bad segment bounds."""


class AdapterError(CotuneError):
    """An adapter cannot be injected, saved or loaded."""


class ProtocolError(CotuneError):
    """A message between roles is malformed, corrupted or unexpected."""


class CheckpointError(CotuneError):
    """A checkpoint is missing, corrupted, or was written by another config."""


class RunDirError(CotuneError):
    """A run directory would be overwritten, or is not a run directory."""


class PeerUnavailable(CotuneError):
    """A role did not answer: a device went offline or dropped out mid-round.

    Paradigms catch it per request and carry on with the peers that did answer.
    """


class DivergenceError(CotuneError):
    """Training produced a non-finite loss, gradient or update (``train.on_nonfinite: stop``)."""

    def __init__(self, message: str, *, role: str | None = None, step: int | None = None):
        super().__init__(message)
        self.role, self.step = role, step

    def for_role(self, role: str) -> DivergenceError:
        """The same error naming the role it happened in (the trainer does not know it)."""
        if self.role is not None:
            return self
        return DivergenceError(f"{self} in role {role!r}", role=role, step=self.step)


class Interrupted(CotuneError):
    """The user pressed Ctrl-C; the message says whether there is a checkpoint to resume."""
