"""What a node's precision settings need, checked when a run starts (before any loading).

``train.autocast: bf16`` needs no loss scaling (bf16 has float32's range) and works everywhere
autocast does. ``fp16`` does: every backward must go through the ``Trainer`` (which scales the
loss and unscales before clipping). Paradigms whose gradients cross a cut or a second optimizer
(a split's cut gradient, DLoRA's branch, FedBiOT's emulator alignment) do not scale theirs yet,
so fp16 there is a clear error rather than silently underflowing gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from cotune.accel.quantize import check_quantize
from cotune.errors import ConfigError

# Paradigms whose every backward is the Trainer's (loss scaling applies end to end).
FP16_PARADIGMS = ("central", "local", "fedavg", "hierfed", "splitfrozen")


def check_precision(cfg: Any, device: torch.device) -> None:
    """``model.quantize`` and ``train.autocast`` can run on a node placed on ``device``."""
    check_quantize(cfg.model.quantize, device)
    autocast = cfg.train.autocast
    if autocast == "fp16" and cfg.paradigm.name not in FP16_PARADIGMS:
        raise ConfigError(
            f"train.autocast: fp16 needs loss scaling on every backward; paradigm "
            f"{cfg.paradigm.name!r} does not scale the gradients it passes between roles yet "
            f"(fp16 works with {', '.join(FP16_PARADIGMS)}); use train.autocast: bf16 (float32's "
            "range, no scaling needed) or none"
        )
    if autocast == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.autocast: bf16, but {torch.cuda.get_device_name(device)} has no bf16 "
            "support; use fp16 or none"
        )
