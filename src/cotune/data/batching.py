"""Token ids to padded ``Batch`` tensors. The only module of ``cotune.data`` that imports torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cotune.data.examples import Example
from cotune.data.tokenizer import Tokenizer
from cotune.errors import DataError

IGNORE_INDEX = -100  # what cross-entropy ignores: padding in causal-LM labels


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] int64, 1 on real tokens
    labels: torch.Tensor  # [B] class ids, or [B, T] token ids with -100 at padding

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )


class EncodedDataset:
    """Token ids (and class ids) of a list of examples; cheap to subset and batch. Batches are
    built on ``device`` (the node's: ``on(device)``), so a role never moves its own inputs."""

    def __init__(
        self,
        ids: list[list[int]],
        labels: list[int] | None,
        task: str,
        pad_id: int,
        device: torch.device | str | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(ids):
            raise DataError(f"{len(ids)} encoded texts but {len(labels)} labels")
        self.ids, self.labels, self.task, self.pad_id = ids, labels, task, pad_id
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.ids)

    def on(self, device: torch.device | str) -> EncodedDataset:
        """The same examples, batched on ``device`` (the ids stay plain Python lists)."""
        return EncodedDataset(self.ids, self.labels, self.task, self.pad_id, device)

    def subset(self, indices: Sequence[int]) -> EncodedDataset:
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return EncodedDataset(
            [self.ids[i] for i in indices], labels, self.task, self.pad_id, self.device
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Unpadded wire form: all ids back to back plus per-row lengths (and class ids)."""
        flat = [t for row in self.ids for t in row]
        out = {
            "input_ids": torch.tensor(flat, dtype=torch.int32),
            "lengths": torch.tensor([len(r) for r in self.ids], dtype=torch.int32),
            "pad_id": torch.tensor([self.pad_id], dtype=torch.int32),
        }
        if self.labels is not None:
            out["labels"] = torch.tensor(self.labels, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], task: str) -> EncodedDataset:
        """Inverse of ``to_tensors``."""
        missing = {"input_ids", "lengths", "pad_id"} - set(tensors)
        if missing or (task == "classification" and "labels" not in tensors):
            raise DataError(f"encoded dataset tensors lack {sorted(missing) or ['labels']}")
        flat = tensors["input_ids"].tolist()
        lengths = tensors["lengths"].tolist()
        if sum(lengths) != len(flat):
            raise DataError(
                f"encoded dataset: lengths sum to {sum(lengths)} but there are {len(flat)} ids"
            )
        ids, pos = [], 0
        for n in lengths:
            ids.append(flat[pos : pos + n])
            pos += n
        labels = tensors["labels"].tolist() if task == "classification" else None
        return cls(ids, labels, task, int(tensors["pad_id"][0]))

    @staticmethod
    def concat(parts: Sequence[EncodedDataset]) -> EncodedDataset:
        if not parts:
            raise DataError("cannot concatenate no datasets")
        first = parts[0]
        if any(p.task != first.task or p.pad_id != first.pad_id for p in parts):
            raise DataError("cannot concatenate encoded datasets of different tasks or pad ids")
        ids = [r for p in parts for r in p.ids]
        labels = None if first.labels is None else [y for p in parts for y in p.labels or []]
        return EncodedDataset(ids, labels, first.task, first.pad_id, first.device)

    def num_tokens(self, indices: Sequence[int]) -> int:
        return sum(len(self.ids[i]) for i in indices)

    def batch(self, indices: Sequence[int]) -> Batch:
        if len(indices) == 0:
            raise DataError("cannot build a batch from no indices")
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        if self.task == "causal_lm":
            # Mask by attention, not by pad id: the pad id may equal eos, which must be learnt.
            labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        else:
            assert self.labels is not None
            labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        batch = Batch(input_ids, mask, labels)
        return batch if self.device.type == "cpu" else batch.to(self.device)


def encode_dataset(
    examples: Sequence[Example], tokenizer: Tokenizer, max_length: int, task: str
) -> EncodedDataset:
    """Tokenize ``examples`` (truncated to ``max_length``); classification keeps the label ids."""
    if task not in ("classification", "causal_lm"):
        raise DataError(f"unknown task {task!r} (tasks: classification, causal_lm)")
    ids = tokenizer.encode([e.text for e in examples], max_length)
    # An empty row (text that tokenizes to nothing) would be an all-masked row: keep one token.
    ids = [
        r if r else [tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id]
        for r in ids
    ]
    labels = None
    if task == "classification":
        missing = [i for i, e in enumerate(examples) if e.label is None]
        if missing:
            raise DataError(f"classification needs labels; example {missing[0]} has none")
        labels = [int(e.label) for e in examples]  # type: ignore[arg-type]
    return EncodedDataset(ids, labels, task, tokenizer.pad_id)
