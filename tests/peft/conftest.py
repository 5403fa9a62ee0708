"""Fixtures for the peft tests (cases and helpers live in peft_cases.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from .peft_cases import ModelCase


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models on shared cores: extra intra-op threads only spin and contend (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_peft() -> Any:
    """Stock Hugging Face PEFT, imported once (slow) and only by tests that compare against it."""
    return pytest.importorskip("peft")


@pytest.fixture
def base_pair() -> Callable[[ModelCase], tuple[nn.Module, nn.Module]]:
    """(model, identical fresh copy) for a case."""

    def make(case: ModelCase) -> tuple[nn.Module, nn.Module]:
        m = case.build()
        return m, copy.deepcopy(m)

    return make
