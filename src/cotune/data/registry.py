"""The built-in datasets: what they are, their views and sizes; used by ``cotune datasets``.

Imports nothing heavy. Sizes and label names come from the one ``{"_meta": ...}`` line that
starts each shipped ``.jsonl.gz`` (written by ``scripts/build_datasets.py``), so listing reads a
few hundred bytes per dataset instead of decompressing it.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from cotune.errors import DataError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


@dataclass(frozen=True)
class ViewSpec:
    name: str
    task: str  # "classification" or "causal_lm"
    label_key: str | None  # record key holding the label; None for text-only views
    description: str
    # Instruction views: the prompt made from a record's text ({text}); the response is its
    # label (" " + label), the only part learnt (see data.prompt_field).
    prompt: str | None = None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    file: str
    views: tuple[ViewSpec, ...]
    default_view: dict[str, str]  # task -> view used when data.view is not set
    size: int = 0
    label_names: dict[str, list[str]] = field(default_factory=dict)  # view -> names
    source: str = ""

    @property
    def tasks(self) -> list[str]:
        return sorted({v.task for v in self.views} | {"causal_lm"})

    @property
    def path(self) -> Path:
        return BUILTIN_DIR / self.file

    def view(self, name: str) -> ViewSpec:
        for v in self.views:
            if v.name == name:
                return v
        names = ", ".join(v.name for v in self.views)
        raise DataError(f"dataset {self.name!r} has no view {name!r} (views: {names})")


_SPECS = (
    DatasetInfo(
        name="fortunes",
        description="Quotes from the Unix fortune program, labelled by category file",
        file="fortunes.jsonl.gz",
        views=(
            ViewSpec("topic", "classification", "label", "quote -> category"),
            ViewSpec(
                "instruct",
                "causal_lm",
                "label",
                "instruction tuning: quote prompt -> category answer (learnt)",
                prompt="Quote: {text}\nWhich fortune file is it from? Answer:",
            ),
        ),  # fmt: skip
        default_view={"classification": "topic", "causal_lm": "topic"},
    ),
    DatasetInfo(
        name="austen",
        description="Passages (~300-600 chars) from Jane Austen's six novels",
        file="austen.jsonl.gz",
        views=(
            ViewSpec("text", "causal_lm", None, "passages for language modelling"),
            ViewSpec("novel", "classification", "novel", "passage -> which novel"),
            ViewSpec(
                "instruct",
                "causal_lm",
                "novel",
                "instruction tuning: passage prompt -> novel answer (learnt)",
                prompt="Passage: {text}\nWhich Austen novel is it from? Answer:",
            ),
        ),  # fmt: skip
        default_view={"classification": "novel", "causal_lm": "text"},
    ),
)


def read_meta(path: Path) -> dict[str, Any]:
    """The ``_meta`` header line of a shipped dataset file."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError) as exc:
        raise DataError(f"built-in dataset file {path} is unreadable: {exc}") from None
    if not isinstance(first, dict) or "_meta" not in first:
        raise DataError(
            f"{path}: first line is not a _meta header; rebuild with scripts/build_datasets.py"
        )
    return first["_meta"]


def _with_meta(spec: DatasetInfo) -> DatasetInfo:
    return _with_meta_by_name(spec.name)


@cache
def _with_meta_by_name(name: str) -> DatasetInfo:
    spec = next(s for s in _SPECS if s.name == name)
    meta = read_meta(spec.path)
    names = sorted(meta.get("label_counts", {}))
    labels = {v.name: names for v in spec.views if v.label_key is not None}
    return DatasetInfo(
        name=spec.name,
        description=spec.description,
        file=spec.file,
        views=spec.views,
        default_view=spec.default_view,
        size=int(meta["size"]),
        label_names=labels,
        source=str(meta.get("source", "")),
    )


def list_datasets() -> list[DatasetInfo]:
    return [_with_meta(s) for s in _SPECS]


def is_builtin(name: str) -> bool:
    return any(s.name == name for s in _SPECS)


def get_dataset_info(name: str) -> DatasetInfo:
    for s in _SPECS:
        if s.name == name:
            return _with_meta(s)
    known = ", ".join(s.name for s in _SPECS)
    raise DataError(
        f"unknown dataset {name!r}: use a built-in name ({known}), a .jsonl/.csv path, or hf:<name>"
    )


def format_datasets_table() -> str:
    """Plain-text table of the built-in datasets and their views."""
    rows = [("dataset", "view", "task", "examples", "labels", "description")]
    for info in list_datasets():
        for v in info.views:
            names = info.label_names.get(v.name)
            labels = "-" if names is None else _shorten(f"{len(names)}: " + ", ".join(names), 48)
            rows.append((info.name, v.name, v.task, str(info.size), labels, v.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * max(len(ln) for ln in lines))
    notes = [f"  {i.name}: {i.description}; source: Debian {i.source}" for i in list_datasets()]
    tail = "Any dataset also works for causal_lm (labels dropped). Licences: cotune/data/builtin/LICENSES.md"
    return "\n".join([*lines, "", *notes, "", tail])


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
