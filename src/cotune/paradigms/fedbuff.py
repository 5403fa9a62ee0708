"""FedBuff: buffered asynchronous aggregation (see fedasync.py, which runs both)."""

from __future__ import annotations

from cotune.paradigms.base import Experiment, ParadigmResult
from cotune.paradigms.fedasync import run_async


def run(exp: Experiment) -> ParadigmResult:
    return run_async(exp, "fedbuff")
