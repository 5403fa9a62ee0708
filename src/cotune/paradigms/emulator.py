"""FedBiOT's model decomposition: adapter (last blocks), emulator (layer-dropped lower blocks),
the alignment loss, the public alignment data, and the server's alignment (``Aligner``).

The emulator is its own module: a deep copy of the model in which the kept lower blocks are
copies (the server aligns them), while the embeddings, final norm, head and the adapter blocks
are *the same* module objects as in the full model. So the adapter a device trains through the
emulator is, parameter for parameter, the adapter plugged into the full model for "AdapFu"
evaluation, and the dropped blocks are never copied.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cotune.config import DataSection
from cotune.data import (
    Batch,
    BatchSampler,
    EncodedDataset,
    encode_dataset,
    load_task_data,
    load_tokenizer,
)
from cotune.errors import CheckpointError, ConfigError, DataError
from cotune.models import Anatomy, Segment
from cotune.paradigms.base import Experiment
from cotune.paradigms.options import FedBiOTOptions
from cotune.peft import AdapterLayer, regularization_over
from cotune.runtime.node import NodeModel, node_cache
from cotune.train import RoleState, Trainer


@dataclass
class BiOTModels:
    emulator: nn.Module
    emu_anatomy: Anatomy
    emu_forward: Segment  # emulator + adapter, embeddings to logits (what a device runs)
    full_forward: Segment  # the full model with the adapter (the server's teacher)
    teacher: Segment  # full model: embeddings + the blocks below the adapter
    student: Segment  # emulator: embeddings + its kept blocks
    student_tail: Segment  # emulator: adapter blocks + head
    kept: list[int]  # indices (in the full model) of the lower blocks the emulator keeps
    adapter_blocks: list[int]
    adapter_params: dict[str, nn.Parameter]  # what devices train and upload
    emulator_named: dict[str, nn.Parameter]  # the emulator's own copied weights (aligned)
    reg_layers: list[AdapterLayer]  # adapter-method regularizers of the adapter blocks
    full_mode: bool

    @property
    def emulator_layers(self) -> int:
        return self.emu_anatomy.num_layers

    @property
    def emulator_params(self) -> list[nn.Parameter]:
        return list(self.emulator_named.values())

    @contextmanager
    def aligning(self) -> Iterator[None]:
        """Freeze the adapter and unfreeze the emulator (the server's alignment), then back."""
        for p in self.adapter_params.values():
            p.requires_grad_(False)
        for p in self.emulator_params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in self.emulator_params:
                p.requires_grad_(False)
                p.grad = None
            for p in self.adapter_params.values():
                p.requires_grad_(True)

    def emulator_tensors(self, full: bool) -> dict[str, torch.Tensor]:
        """What a device downloads besides the adapter: the aligned blocks, or the whole
        emulator on first contact (embeddings, head, frozen parts of the adapter blocks)."""
        own = {f"emulator.{n}": p.detach() for n, p in self.emulator_named.items()}
        if not full:
            return own
        skip = {id(p) for p in self.adapter_params.values()}
        rest = {
            f"emulator.{n}": p.detach()
            for n, p in self.emulator.named_parameters()
            if id(p) not in skip and f"emulator.{n}" not in own
        }
        return own | rest

    @contextmanager
    def holding(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run with ``weights`` (a device's own copy of the aligned blocks) in the emulator; the
        module's own tensors come back on exit (colocated roles share one emulator module)."""
        params = self.emulator_named
        saved = {k: p.data for k, p in params.items()}
        for k, p in params.items():
            p.data = weights[k]
        try:
            yield
        finally:
            for k, p in params.items():
                p.data = saved[k]

    def adapter_regularization(self) -> torch.Tensor | None:
        return regularization_over(self.reg_layers)

    def release(self) -> None:
        """Leave the full model as it was found (full mode unfroze the adapter blocks)."""
        if self.full_mode:
            for p in self.adapter_params.values():
                p.requires_grad_(False)


def kept_indices(lower: int, keep: int) -> list[int]:
    """Uniform stride over the lower blocks, as the code's ``int(i·(n−1)/(n'−1))``."""
    if keep == 1:
        return [0]
    return [int(i * (lower - 1) / (keep - 1)) for i in range(keep)]


def emulator_shape(
    model: NodeModel, adapter_layers: int, keep_layers: int | None, drop_ratio: float, mode: str
) -> tuple[int, int, int]:
    """``(blocks, lower blocks, blocks the emulator keeps)``; ConfigError if the options do not
    fit the model. Also the paradigm's preflight: it touches no module."""
    anatomy = model.loaded.anatomy
    n = anatomy.num_layers
    if adapter_layers >= n:
        raise ConfigError(
            f"paradigm.options.adapter_layers: {adapter_layers} leaves no lower block to emulate "
            f"(the model has {n} blocks; use 1..{n - 1})"
        )
    lower = n - adapter_layers
    keep = keep_layers if keep_layers is not None else max(1, round(lower * (1 - drop_ratio)))
    if not 1 <= keep <= lower:
        raise ConfigError(
            f"paradigm.options.keep_layers: {keep} is out of range; the emulator keeps 1..{lower} "
            f"of the {lower} blocks below the {adapter_layers} adapter block(s)"
        )
    if mode == "lora" and not any(
        (anatomy.layer_of(k) or -1) >= lower for k in model.trainer.params
    ):
        raise ConfigError(
            f"paradigm.options.adapter_layers: no adapter of peft.target_modules/peft.layers "
            f"lies in the last {adapter_layers} block(s); use adapter_mode: full or target them"
        )
    return n, lower, keep


def build_models(
    node: NodeModel, adapter_layers: int, keep_layers: int | None, drop_ratio: float, mode: str
) -> BiOTModels:
    anatomy, model = node.loaded.anatomy, node.loaded.model
    n, lower, keep = emulator_shape(node, adapter_layers, keep_layers, drop_ratio, mode)
    kept = kept_indices(lower, keep)
    parts = anatomy.blocks_path.split(".")
    ancestors = {".".join(parts[:i]) for i in range(len(parts) + 1)}
    kept_paths = [anatomy.block_path(i) for i in kept]
    # Everything but the ancestors of the block list and the kept blocks is shared, not copied.
    memo: dict[int, object] = {
        id(mod): mod
        for name, mod in model.named_modules()
        if name not in ancestors
        and not any(name == p or name.startswith(p + ".") for p in kept_paths)
    }
    emulator = copy.deepcopy(model, memo)
    copies = [memo[id(anatomy.block(i))] for i in kept]
    blocks = nn.ModuleList([*copies, *(anatomy.block(i) for i in range(lower, n))])
    parent, _, leaf = anatomy.blocks_path.rpartition(".")
    setattr(emulator.get_submodule(parent) if parent else emulator, leaf, blocks)
    emulator.config.num_hidden_layers = len(blocks)
    layer_types = getattr(emulator.config, "layer_types", None)
    if layer_types is not None:  # per-layer attention kinds (Qwen2 sliding windows)
        emulator.config.layer_types = [layer_types[i] for i in kept] + list(layer_types[lower:])
    emu_anatomy = type(anatomy)(emulator, anatomy.task)
    emulator_named = {
        f"{emu_anatomy.block_path(j)}.{name}": p
        for j in range(keep)
        for name, p in blocks[j].named_parameters()
    }
    for p in emulator_named.values():
        p.requires_grad_(False)

    in_adapter = [anatomy.block_path(i) for i in range(lower, n)]
    outside = {k: p for k, p in node.trainer.params.items() if anatomy.layer_of(k) is None}
    if mode == "lora":
        params = {
            k: p for k, p in node.trainer.params.items() if (anatomy.layer_of(k) or -1) >= lower
        }
        if not params:
            raise ConfigError(
                f"paradigm.options.adapter_layers: no adapter of peft.target_modules/peft.layers "
                f"lies in the last {adapter_layers} block(s); use adapter_mode: full or target them"
            )
    else:  # the blocks' own weights, trained in full (the adapters injected there stay put)
        params = {
            f"{path}.{name}": p
            for path in in_adapter
            for name, p in model.get_submodule(path).named_parameters()
            if f"{path}.{name}" not in node.trainer.params
        }
        for p in params.values():
            p.requires_grad_(True)
    reg_layers = [
        layer
        for path, layer in node.adapters.layers.items()
        if (anatomy.layer_of(path) or -1) >= lower and mode == "lora"
    ]
    return BiOTModels(
        emulator=emulator,
        emu_anatomy=emu_anatomy,
        emu_forward=emu_anatomy.full(),
        full_forward=node.forward,
        teacher=anatomy.segment(0, lower, embed=True, head=False),
        student=emu_anatomy.segment(0, keep, embed=True, head=False),
        student_tail=emu_anatomy.segment(keep, len(blocks), embed=False, head=True),
        kept=kept,
        adapter_blocks=list(range(lower, n)),
        adapter_params=params | outside,
        emulator_named=emulator_named,
        reg_layers=reg_layers,
        full_mode=mode == "full",
    )


def node_models(
    node: NodeModel, adapter_layers: int, keep_layers: int | None, drop_ratio: float, mode: str
) -> tuple[BiOTModels, Trainer]:
    """The emulator and the adapter's trainer on a node, built once per base model: on the
    ``local`` engine the server and every device share one emulator module (each device swaps
    its own copy of the aligned blocks in, ``holding``); on ``isolated`` each node has its own."""
    key = ("fedbiot", adapter_layers, keep_layers, drop_ratio, mode)
    per_base = node_cache(node.loaded.model)
    if key not in per_base:
        m = build_models(node, adapter_layers, keep_layers, drop_ratio, mode)
        per_base[key] = (m, Trainer(m.adapter_params, node.trainer.cfg, node.trainer.total_steps))
    return per_base[key]


def align_loss(m: BiOTModels, batch: Batch, task: str, kl_weight: float) -> torch.Tensor:
    """``mean(((h_T − h_S) / rms(h_T))²)`` over real tokens, plus ``λ·KL(p_full ‖ p_emu)``.

    ``h_T``: the full model's hidden state entering the adapter; ``h_S``: the emulator's.
    """
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        h_t = m.teacher(ids, mask).hidden
    acts = m.student(ids, mask)
    h_s = acts.hidden
    rms = h_t.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    w = mask.unsqueeze(-1).to(h_s.dtype)
    loss = (((h_t - h_s) / rms).pow(2) * w).sum() / (w.sum() * h_s.size(-1)).clamp_min(1.0)
    if kl_weight > 0:
        with torch.no_grad():
            p_full = m.full_forward(ids, mask).float().log_softmax(-1)
        q_emu = m.student_tail(acts).float().log_softmax(-1)
        kl = F.kl_div(q_emu, p_full, log_target=True, reduction="none").sum(-1)
        kl = (kl * mask).sum() / mask.sum().clamp_min(1) if task == "causal_lm" else kl.mean()
        loss = loss + kl_weight * kl
    return loss


def load_public(exp: Experiment, name: str | None, view: str | None, count: int) -> EncodedDataset:
    """The public alignment texts, tokenized with the run's tokenizer (labels are not used)."""
    name = name or ("fortunes" if exp.cfg.data.dataset == "austen" else "austen")
    try:
        data = load_task_data(
            DataSection(dataset=name, view=view, max_examples=count), "causal_lm", exp.cfg.seed
        )
    except DataError as err:
        raise DataError(f"paradigm.options.public_dataset: cannot load {name!r}: {err}") from None
    tokenizer = exp.tokenizer or load_tokenizer(exp.run_dir / "tokenizer")
    examples = (data.train + data.test)[:count]
    return encode_dataset(examples, tokenizer, exp.cfg.model.max_length, "causal_lm")


class Aligner:
    """The server's emulator alignment on public data (the lower level of the bi-level problem)."""

    def __init__(
        self, exp: Experiment, m: BiOTModels, public: EncodedDataset, opts: FedBiOTOptions
    ) -> None:
        self.exp, self.m, self.public, self.opts = exp, m, public, opts
        self.meter = exp.meter
        self.optimizer = torch.optim.AdamW(m.emulator_params, lr=opts.align_lr, weight_decay=0.0)
        self.sampler = BatchSampler(len(public), exp.cfg.train.batch_size, exp.cfg.seed + 7919)
        self.probe = public.batch(list(range(min(len(public), 32))))  # fixed: before/after
        self.version = 0  # bumped whenever the emulator changes (devices must fetch it again)

    def loss(self, batch: Batch) -> torch.Tensor:
        return align_loss(self.m, batch, self.exp.task, self.opts.kl_weight)

    def run(self, steps: int, glob: RoleState, trainer: Trainer, rnd: int) -> dict[str, float]:
        if steps == 0:
            return {}
        out = {}
        with trainer.activate(glob), self.m.aligning():
            out["loss_before"] = self._probe()
            for _ in range(steps):
                batch = self.public.batch(self.sampler.next_indices())

                def fwd_bwd(b: Batch) -> float:
                    loss = self.loss(b)
                    loss.backward()
                    return float(loss.detach())

                _, flops = self.meter.flops.run("align", fwd_bwd, batch)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.meter.compute(flops, round=rnd, label="align")
            out["loss_after"] = self._probe()
        self.version += 1
        return out

    @torch.no_grad()
    def _probe(self) -> float:
        return float(self.loss(self.probe))

    def state_dict(self) -> dict:
        """What a resume needs: the aligned emulator, the alignment optimizer and sampler."""
        return {
            "emulator": {k: p.detach().clone() for k, p in self.m.emulator_named.items()},
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "version": self.version,
        }

    @torch.no_grad()
    def load_state_dict(self, st: dict) -> None:
        missing = sorted(set(self.m.emulator_named) - set(st["emulator"]))
        if missing:
            raise CheckpointError(f"fedbiot checkpoint lacks emulator tensors: {missing[:3]}")
        for k, p in self.m.emulator_named.items():
            p.copy_(st["emulator"][k])
        self.optimizer.load_state_dict(st["optimizer"])
        self.sampler.load_state_dict(st["sampler"])
        self.version = int(st["version"])
