"""Reading parts of a safetensors checkpoint: tensor names, shapes and dtypes come from the file
headers alone, and only the tensors asked for are read (``safe_open``), from one
``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from cotune.errors import ModelError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointIndex:
    """Where each tensor of a checkpoint lives, and under which model parameter name.

    ``prefix`` is the model's ``base_model_prefix``: checkpoints of a bare encoder (MiniLM is a
    ``BertModel``) store ``embeddings.…`` where a task model has ``bert.embeddings.…``.
    """

    def __init__(self, files: list[Path], prefix: str = "") -> None:
        from safetensors import safe_open

        self.files: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._by_model_name: dict[str, str] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    part = f.get_slice(key)
                    self.files[key] = str(file)
                    self.shapes[key] = tuple(part.get_shape())
                    self.dtypes[key] = part.get_dtype()
                    # Old BERT checkpoints call the LayerNorm parameters gamma/beta.
                    name = key.replace("LayerNorm.gamma", "LayerNorm.weight")
                    name = name.replace("LayerNorm.beta", "LayerNorm.bias")
                    self._by_model_name.setdefault(name, key)
                    if prefix:
                        self._by_model_name.setdefault(f"{prefix}.{name}", key)

    def key(self, model_name: str) -> str | None:
        """The checkpoint key holding the model parameter/buffer ``model_name``, if any."""
        return self._by_model_name.get(model_name)

    def float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating tensor (what HF's ``dtype="auto"`` falls back to)."""
        return next((_DTYPES[d] for d in self.dtypes.values() if d in _DTYPES), None)

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for each key, opening each file once and reading nothing else."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in file_keys:
                    yield key, f.get_tensor(key)


def open_checkpoint(path: str, prefix: str = "") -> CheckpointIndex:
    """Index the safetensors checkpoint in the local directory ``path`` (headers only)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelError(
            f"reading part of a checkpoint needs a local model directory, got {path!r}"
        )
    sharded = root / "model.safetensors.index.json"
    if sharded.is_file():
        try:
            weight_map = json.loads(sharded.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({root / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{sharded}: unreadable shard index: {exc}") from None
    elif (root / "model.safetensors").is_file():
        files = [root / "model.safetensors"]
    else:
        raise ModelError(
            f"{path}: no model.safetensors or model.safetensors.index.json; segments are read "
            "from safetensors checkpoints only (load_model reads the others)"
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"{path}: shard files listed in the index are missing: {missing}")
    return CheckpointIndex(files, prefix)
