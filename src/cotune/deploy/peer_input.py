"""What the server takes from a device besides its messages (a role's measurements, a local
event's result, a codec it asks for, its self-description): checked here, so a peer's bad value
is a ``ProtocolError`` naming it, or is logged and left out, never the run's end."""

from __future__ import annotations

from typing import Any

from cotune.errors import CotuneError, ProtocolError
from cotune.runtime.codecs import get_codec
from cotune.runtime.validate import finite_number


def text(value: Any, limit: int = 200) -> str | None:
    """A peer's self-description for the summary: a string, cut to ``limit``, else None."""
    return value[:limit] if isinstance(value, str) else None


def check_codec(name: Any) -> None:
    """A codec a peer asked for: None (the run's), or the name of one cotune has."""
    if name is None:
        return
    if not isinstance(name, str):
        raise ProtocolError(f"codec {name!r} is not a name")
    try:
        get_codec(name)
    except CotuneError as err:
        raise ProtocolError(f"codec {name!r}: {err}") from None


def tick_result(node: str, kind: str, value: Any) -> float | None:
    """What a device's local event returned: every event answers a finite number (a gradient
    norm) or nothing; anything else from a peer is a protocol error naming it."""
    if value is None:
        return None
    if not finite_number(value):
        raise ProtocolError(f"{node} answered its {kind!r} event with {value!r}, not a number")
    return float(value)
