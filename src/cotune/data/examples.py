"""Plain records shared by every loader: no torch, no tokenizer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One text with its label id (``None`` for causal language modelling) and, for causal LM
    data whose records are labelled (e.g. ``austen`` with ``data.view: novel``), its domain id.
    Instruction data (``data.prompt_field``): ``text`` is the prompt followed by the response,
    ``prompt`` the prompt alone (its tokens are read, not learnt)."""

    text: str
    label: int | None = None
    domain: int | None = None
    prompt: str | None = None

    @property
    def group(self) -> int | None:
        """What splits, subsamples and partitions stratify by: the label, else the domain."""
        return self.label if self.label is not None else self.domain


@dataclass
class TaskData:
    """A train/test split ready to tokenize; ``label_names[i]`` names label id ``i``."""

    name: str
    train: list[Example]
    test: list[Example]
    label_names: list[str] | None
    domain_names: list[str] | None = None  # causal LM: names of the domain ids

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    @property
    def group_names(self) -> list[str] | None:
        """Names of ``Example.group`` ids (labels for classification, else domains)."""
        return self.label_names if self.label_names is not None else self.domain_names
