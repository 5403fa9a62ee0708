"""Strict JSON for everything cotune writes or sends: JSON has no NaN or infinity, so a
non-finite number (a diverged loss, a missing mean) becomes ``null``, never a bare ``NaN`` that
strict parsers reject. Standard library only."""

from __future__ import annotations

import json
import math
from typing import Any


def is_count(value: Any) -> bool:
    """A count or size read from a peer's JSON: a non-negative ``int`` (not a bool, a float or
    a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by ``None`` (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON that any parser reads: non-finite numbers become ``null``."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
