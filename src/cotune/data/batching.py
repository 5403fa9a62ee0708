"""Token ids to padded ``Batch`` tensors. The only module of ``cotune.data`` that imports torch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cotune.data.examples import Example
from cotune.data.tokenizer import Tokenizer
from cotune.errors import DataError

IGNORE_INDEX = -100  # what cross-entropy ignores: padding in causal-LM labels
log = logging.getLogger(__name__)


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
        prompt_lens: list[int] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(ids):
            raise DataError(f"{len(ids)} encoded texts but {len(labels)} labels")
        if prompt_lens is not None and len(prompt_lens) != len(ids):
            raise DataError(f"{len(ids)} encoded texts but {len(prompt_lens)} prompt lengths")
        self.ids, self.labels, self.task, self.pad_id = ids, labels, task, pad_id
        # Instruction data: each row's first prompt_lens[i] tokens are its prompt (not learnt).
        self.prompt_lens = prompt_lens
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.ids)

    def on(self, device: torch.device | str) -> EncodedDataset:
        """The same examples, batched on ``device`` (the ids stay plain Python lists)."""
        return EncodedDataset(self.ids, self.labels, self.task, self.pad_id, device,
                              self.prompt_lens)  # fmt: skip

    def subset(self, indices: Sequence[int]) -> EncodedDataset:
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        prompts = None if self.prompt_lens is None else [self.prompt_lens[i] for i in indices]
        return EncodedDataset(
            [self.ids[i] for i in indices], labels, self.task, self.pad_id, self.device, prompts
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
        if self.prompt_lens is not None:
            out["prompt_lens"] = torch.tensor(self.prompt_lens, dtype=torch.int32)
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
        prompts = tensors["prompt_lens"].tolist() if "prompt_lens" in tensors else None
        if prompts is not None and (
            len(prompts) != len(ids) or any(not 0 <= p <= len(r) for p, r in zip(prompts, ids))
        ):
            raise DataError("encoded dataset: prompt lengths do not fit their rows")
        return cls(ids, labels, task, int(tensors["pad_id"][0]), prompt_lens=prompts)

    @staticmethod
    def concat(parts: Sequence[EncodedDataset]) -> EncodedDataset:
        if not parts:
            raise DataError("cannot concatenate no datasets")
        first = parts[0]
        if any(p.task != first.task or p.pad_id != first.pad_id for p in parts):
            raise DataError("cannot concatenate encoded datasets of different tasks or pad ids")
        ids = [r for p in parts for r in p.ids]
        labels = None if first.labels is None else [y for p in parts for y in p.labels or []]
        prompts = None
        if any(p.prompt_lens is not None for p in parts):
            prompts = [n for p in parts for n in (p.prompt_lens or [0] * len(p))]
        return EncodedDataset(ids, labels, first.task, first.pad_id, first.device, prompts)

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
            if self.prompt_lens is not None:  # a prompt is read, not learnt
                for b, i in enumerate(indices):
                    labels[b, : self.prompt_lens[i]] = IGNORE_INDEX
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
    prompt_lens = None
    if task == "causal_lm" and any(e.prompt is not None for e in examples):
        ids, prompt_lens = _encode_prompted(examples, tokenizer, max_length)
    else:
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
    return EncodedDataset(ids, labels, task, tokenizer.pad_id, prompt_lens=prompt_lens)


def _encode_prompted(
    examples: Sequence[Example], tokenizer: Tokenizer, max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Each example's token ids and how many of them are its prompt (0 without one), encoded
    so that the answer fits: the prompt is the prefix its own encoding shares with the
    whole example's (the special tokens a tokenizer adds at the start count as prompt; a token
    merged across the boundary counts as response, so never a response token goes unlearnt).
    A row longer than ``max_length`` loses the start of its prompt (its end, next to the
    answer, stays; so do the tokenizer's leading special tokens), and only an answer longer
    than ``max_length`` by itself is cut at its end (the trailing special tokens kept).

    With a chat format (``tokenizer.chat``) each example is rendered as a conversation first,
    the prompt alone with the assistant's turn opened: the prompt then ends where the
    assistant's words begin, and a long prompt loses the start of the user's words, never the
    template's header or the turn markers around them."""
    unbounded = 1 << 30
    prompted = [i for i, e in enumerate(examples) if e.prompt is not None]
    plain = [i for i, e in enumerate(examples) if e.prompt is None]
    ids: list[list[int]] = [[] for _ in examples]
    for i, row in zip(plain, tokenizer.encode([examples[i].text for i in plain], max_length)):
        ids[i] = row
    chat, asked = tokenizer.chat, [examples[i] for i in prompted]
    if chat is None:
        texts = [e.text for e in asked]
        prompts = [e.prompt or "" for e in asked]
    else:  # the response is what follows the prompt in the example's text
        render = tokenizer.renderer
        texts = [chat.render(render, e.prompt or "", e.text[len(e.prompt or "") :]) for e in asked]
        prompts = [chat.render(render, e.prompt or "") for e in asked]
    special = chat is None  # a rendered conversation carries its own special tokens
    whole = tokenizer.encode(texts, unbounded, special)
    alone = tokenizer.encode(prompts, unbounded, special)
    lead, mid, trail = _fixed_ends(tokenizer)
    out = [0] * len(examples)
    for i, row, p in zip(prompted, whole, alone):
        n = _shared_prefix(row, p)
        if len(row) > max_length:
            drop = min(len(row) - max_length, max(0, n - lead - mid))
            row, n = row[:lead] + row[lead + drop :], n - drop
            if len(row) > max_length:
                row = row[: max(0, max_length - trail)] + row[len(row) - trail :]
        ids[i], out[i] = row, min(n, len(row))
    silent = sum(out[i] >= len(ids[i]) for i in prompted)
    if silent:
        log.warning("%d of %d examples keep no response token within model.max_length=%d: "
                    "they teach nothing", silent, len(prompted), max_length)  # fmt: skip
    return ids, out


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fixed_ends(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """The tokens every prompted row has whatever its words, which truncation keeps: how many
    open a row (BERT's [CLS], LLaMA's <s>; a chat template's header up to the user's words),
    close its prompt (a chat template's end of the user's turn and opening of the assistant's;
    none in plain joins) and close the row (cotune's BPE's <eos>; the end of the assistant's
    turn). Found as what the encodings of one-letter texts share."""
    chat = tokenizer.chat
    if chat is None:
        x, y = tokenizer.encode(["x", "y"], 1 << 30)
        lead = _shared_prefix(x, y)
        return lead, 0, _shared_prefix(x[lead:][::-1], y[lead:][::-1])
    render = tokenizer.renderer
    texts = [chat.render(render, "x", "r"), chat.render(render, "y", "r"),
             chat.render(render, "x", "s"), chat.render(render, "x"), chat.render(render, "y")]  # fmt: skip
    xr, yr, xs, x, y = tokenizer.encode(texts, 1 << 30, special=False)
    lead = _shared_prefix(xr, yr)
    px, py = _shared_prefix(xr, x), _shared_prefix(yr, y)  # each row's prompt
    mid = min(_shared_prefix(xr[lead:px][::-1], yr[lead:py][::-1]), px - lead)
    trail = _shared_prefix(xr[px:][::-1], xs[px:][::-1])
    return lead, mid, trail
