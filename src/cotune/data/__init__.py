"""Datasets, tokenizers, batches and partitions.

Built-in datasets (``fortunes``, ``austen``; see ``cotune datasets``), user JSONL/CSV files
and ``hf:<name>`` datasets become a ``TaskData``; a ``Tokenizer`` and ``encode_dataset`` turn
it into padded ``Batch`` tensors; ``partition`` spreads the training set over devices.

Importing this package is cheap: the registry is loaded eagerly, everything else (numpy,
tokenizers, torch) only when first used, so ``cotune datasets`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cotune.data.examples import Example, TaskData
from cotune.data.registry import DatasetInfo, format_datasets_table, get_dataset_info, list_datasets

_LAZY = {
    "load_task_data": "cotune.data.loading",
    "read_file": "cotune.data.files",
    "Tokenizer": "cotune.data.tokenizer",
    "build_tokenizer": "cotune.data.tokenizer",
    "load_tokenizer": "cotune.data.tokenizer",
    "BatchSampler": "cotune.data.sampler",
    "Batch": "cotune.data.batching",
    "EncodedDataset": "cotune.data.batching",
    "encode_dataset": "cotune.data.batching",
    "IGNORE_INDEX": "cotune.data.batching",
    "partition": "cotune.data.partitioning",
    "partition_summary": "cotune.data.partitioning",
    "format_partition_table": "cotune.data.partitioning",
}

if TYPE_CHECKING:
    from cotune.data.batching import IGNORE_INDEX, Batch, EncodedDataset, encode_dataset
    from cotune.data.files import read_file
    from cotune.data.loading import load_task_data
    from cotune.data.partitioning import format_partition_table, partition, partition_summary
    from cotune.data.sampler import BatchSampler
    from cotune.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cotune.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "BatchSampler",
    "DatasetInfo",
    "EncodedDataset",
    "Example",
    "TaskData",
    "Tokenizer",
    "build_tokenizer",
    "encode_dataset",
    "format_datasets_table",
    "format_partition_table",
    "get_dataset_info",
    "list_datasets",
    "load_task_data",
    "load_tokenizer",
    "partition",
    "partition_summary",
    "read_file",
]
