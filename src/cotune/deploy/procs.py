"""Device processes for ``cotune launch``: forked from a warm interpreter.

A device process spends ~5 s of CPU importing torch and transformers before it does anything;
``launch`` starts N of them on one machine. They are forked instead from one interpreter that
has imported those once (multiprocessing's forkserver, preloaded), so N devices pay the imports
once per launching process, not N times per run. The forkserver has never run a torch op (no
thread pool to inherit), and it is started with ``OMP_WAIT_POLICY=PASSIVE`` because OpenMP
reads its wait policy when the library loads, which here is before the fork. A device whose
command needs a prefix (netlab's ``ip netns exec``, a delayed start) gets a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The model types cotune can cut (models/loading.py: MODEL_TYPES; a test keeps them equal).
MODEL_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "bert", "roberta")
# What a device imports before it can dial, and what building its node imports lazily
# (transformers' model base, ~3 s with scipy, sympy and accelerate; the common model families;
# cotune's node, PEFT and simulator modules): measured as the modules a forked device added.
# A name that fails to import is skipped by multiprocessing, so a missing family costs nothing.
PRELOAD = [
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    *(f"transformers.models.{m}.modeling_{m}" for m in MODEL_FAMILIES),
    "cotune.cli",
    "cotune.deploy.device",
    "cotune.deploy.connect",
    "cotune.run",
    "cotune.build",
    "cotune.paradigms",
    "cotune.nodes",
    "cotune.experiment",
    "cotune.peft",
    "cotune.sim.simulation",
    "cotune.data.loading",
]
_CONTEXT: Any = None


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _forkserver() -> Any:
    """The preloaded forkserver context (started on first use, then kept for this process)."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        with _environ(OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE")):
            multiprocessing.forkserver.ensure_running()
        _CONTEXT = ctx
    return _CONTEXT


@contextlib.contextmanager
def _no_main_module() -> Iterator[None]:
    """multiprocessing re-imports the parent's __main__ in a child (spawn semantics): a launcher
    script without an `if __name__ == "__main__"` guard would launch again from every device.
    A child here runs only cotune's own entry point, so it is given no main module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def fork(target: Callable[..., None], args: tuple[Any, ...] = (), name: str | None = None) -> Any:
    """A started process running ``target(*args)``, forked from the preloaded forkserver."""
    process = _forkserver().Process(target=target, args=args, name=name)
    with _no_main_module():
        process.start()
    return process


def _nothing() -> None:
    pass


def warm(wait: bool = False) -> None:
    """Start the forkserver now, so its imports run while the caller does other work (``launch``
    calls it before building the server's experiment); ``wait``: return only once it can fork
    (its imports done), e.g. before timing how fast devices join."""
    _forkserver()
    if wait:
        fork(_nothing, name="cotune-warm").join()


class ForkedDevice:
    """A forked device process with the part of ``subprocess.Popen``'s interface that
    ``launch`` and its tests use: ``pid``, ``poll``, ``wait``, ``kill``."""

    def __init__(self, process: Any, args: list[str]) -> None:
        self._process, self.args = process, args

    @property
    def pid(self) -> int:
        return self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()


def _cotune_main(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """The forked process: its own environment and log file, then ``cotune <argv>``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():  # read at library load in a fresh interpreter: set it
        import torch

        torch.set_num_threads(int(threads))
    from cotune.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def start_cotune(
    argv: list[str], env: dict[str, str], log_path: Path, prefix: list[str] | None = None
) -> Any:
    """Start ``cotune <argv>`` (a device, or a server: any command) with ``env``, output to
    ``log_path``: forked from the warm interpreter, or a fresh one behind ``prefix``."""
    if prefix:
        log_file = open(log_path, "a")  # noqa: SIM115 - the child keeps its own copy of the fd
        try:
            return subprocess.Popen([*prefix, sys.executable, "-m", "cotune.cli", *argv],
                                    env=env, stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
        finally:
            log_file.close()
    return ForkedDevice(fork(_cotune_main, (argv, env, str(log_path)), f"cotune-{argv[0]}"), argv)
