"""Training HAT's on-device drafter by distillation, and saving it beside a run.

The drafter's adapter learns to stand in for the cloud's middle blocks on text the device holds:
its output should match the middle's output hidden states (MSE) and, through the device's own
output blocks, the full model's next-token distribution (KL). Only the adapter trains; the
model stays frozen. What HAT's paper says of this stage is "distillation"; the loss mix is a
reconstruction (docs/methods.md, HAT).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cotune.errors import CotuneError
from cotune.infer.speculative import MiddleAdapter
from cotune.infer.split import UCut
from cotune.models.base import Anatomy
from cotune.models.segment import Activations

DRAFTER_DIR = "drafter"


@dataclass(frozen=True)
class DrafterTraining:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    seq_len: int = 64
    kl_weight: float = 1.0
    mse_weight: float = 1.0
    seed: int = 0


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's parameters out of autograd (only the drafter trains), restored after."""
    live = [p for p in model.parameters() if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in live:
            p.requires_grad_(True)


def distil_loss(
    guess: torch.Tensor,
    middle_out: torch.Tensor,
    mask: torch.Tensor,
    outputs: Any,
    *,
    mse_weight: float,
    kl_weight: float,
) -> torch.Tensor:
    """MSE to the middle's output plus KL to the full model's next-token distribution through
    the device's output blocks (``outputs``), both over the real (unpadded) positions."""
    w = mask.to(guess.dtype)
    n = w.sum().clamp_min(1.0)
    loss = mse_weight * (((guess - middle_out) ** 2).mean(-1) * w).sum() / n
    if kl_weight:
        with torch.no_grad():
            target = F.log_softmax(outputs(Activations(middle_out, mask)).float(), -1)
        logits = outputs(Activations(guess, mask)).float()
        kl = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="none")
        loss = loss + kl_weight * (kl.sum(-1) * w).sum() / n
    return loss


def _batches(sequences: Sequence[list[int]], cfg: DrafterTraining) -> torch.Tensor:
    """One batch of ``cfg.seq_len`` windows drawn from the sequences (each at least 2 long)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    usable = [s for s in sequences if len(s) >= 2]
    if not usable:
        raise CotuneError("drafter training: no text of two or more tokens to distil on")
    while True:
        rows = []
        for i in torch.randint(len(usable), (cfg.batch_size,), generator=gen).tolist():
            s = usable[i]
            start = int(torch.randint(max(1, len(s) - cfg.seq_len + 1), (1,), generator=gen))
            rows.append(s[start : start + cfg.seq_len])
        width = min(len(r) for r in rows)  # equal lengths: no padding to mask
        yield torch.tensor([r[:width] for r in rows])


def train_drafter(
    anatomy: Anatomy,
    cut: UCut,
    sequences: Sequence[list[int]],
    cfg: DrafterTraining = DrafterTraining(),  # noqa: B008 - frozen, never mutated
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[MiddleAdapter, list[float]]:
    """A drafter adapter distilled from the model's middle blocks; returns it and its losses."""
    cut.check(anatomy.num_layers)
    L = anatomy.num_layers
    inputs = anatomy.segment(0, cut.n_in)
    middle = anatomy.segment(cut.n_in, L - cut.n_out)
    outputs = anatomy.segment(L - cut.n_out, L)
    torch.manual_seed(cfg.seed)
    adapter = MiddleAdapter(anatomy.hidden_size)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr)
    was_training = anatomy.model.training
    anatomy.model.eval()
    losses: list[float] = []
    try:
        with frozen(anatomy.model):
            for step, ids in zip(range(1, cfg.steps + 1), _batches(sequences, cfg)):
                mask = torch.ones_like(ids)
                with torch.no_grad():
                    h_in = inputs(ids, mask)
                    h_mid = middle(h_in)
                loss = distil_loss(adapter(h_in.hidden), h_mid.hidden, mask, outputs,
                                   mse_weight=cfg.mse_weight, kl_weight=cfg.kl_weight)  # fmt: skip
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if on_step is not None:
                    on_step(step, losses[-1])
    finally:
        anatomy.model.train(was_training)
    return adapter.eval(), losses


def save_drafter(adapter: MiddleAdapter, cut: UCut, out: Path, info: dict) -> Path:
    """``drafter.safetensors`` + ``drafter.json`` (cut, sizes, how it was trained) in ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    save_file(tensors, str(out / "drafter.safetensors"))
    meta = {"cut": asdict(cut), "hidden_size": adapter.up.in_features,
            "width": adapter.up.out_features, **info}  # fmt: skip
    (out / "drafter.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def load_drafter(directory: Path, cut: UCut, hidden_size: int) -> MiddleAdapter | None:
    """The drafter saved in ``directory`` if it fits this cut and model, else None."""
    from safetensors.torch import load_file

    meta_path, weights = directory / "drafter.json", directory / "drafter.safetensors"
    if not (meta_path.is_file() and weights.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CotuneError(f"{meta_path} is not valid JSON ({e})") from None
    if meta.get("cut") != asdict(cut) or meta.get("hidden_size") != hidden_size:
        return None
    adapter = MiddleAdapter(hidden_size, int(meta.get("width", hidden_size)))
    adapter.load_state_dict(load_file(str(weights)))
    return adapter.eval()
