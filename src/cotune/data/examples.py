"""Plain records shared by every loader: no torch, no tokenizer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One text with its label id (``None`` for causal language modelling)."""

    text: str
    label: int | None = None


@dataclass
class TaskData:
    """A train/test split ready to tokenize; ``label_names[i]`` names label id ``i``."""

    name: str
    train: list[Example]
    test: list[Example]
    label_names: list[str] | None

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)
