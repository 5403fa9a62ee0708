"""Node and role ids every part of cotune agrees on (the cloud server, ``device-<i>``)."""

from __future__ import annotations

SERVER = "server"


def device_id(i: int) -> str:
    return f"device-{i}"


def device_index(role: str) -> int | None:
    """``i`` of ``device-<i>``; None for any other role."""
    if role.startswith("device-"):
        try:
            return int(role.split("-", 1)[1])
        except ValueError:
            return None
    return None
