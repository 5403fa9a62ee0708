"""Facts about this process that a deployment reports: its secret key (devices hosted in one
process send it when they join), its name in the deployment summary and its peak memory."""

from __future__ import annotations

import os
import secrets
import socket


def process_key() -> str:
    """A random key of this process, made on first use in it (a forked process makes its own):
    the devices it hosts send it when they join, so the server may treat them as one host. It
    is never shown, so another device cannot claim to share this process and be sent its
    devices' requests."""
    pid = os.getpid()
    if pid not in _PROCESS_KEYS:
        _PROCESS_KEYS[pid] = secrets.token_hex(16)
    return _PROCESS_KEYS[pid]


_PROCESS_KEYS: dict[int, str] = {}


def process_name() -> str:
    """This process as the deployment summary names it, ``host:pid`` (asked when used: device
    processes are forked from a preloaded one)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def peak_rss_bytes() -> float:
    """This process's peak resident memory: Linux's VmHWM, the high-water mark of this
    program's own address space (``ru_maxrss`` would also count what a forked worker's parent
    held), else ``ru_maxrss`` (macOS reports bytes)."""
    import resource
    import sys

    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)
