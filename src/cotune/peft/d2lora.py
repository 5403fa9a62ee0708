"""D²LoRA (Seraj et al. 2025, arXiv 2503.18089): data-driven LoRA init by a warm-up on general data.

Phase 1 trains a standard LoRA (A kaiming, B = 0) for `warmup_steps` on a general dataset with the
task's own objective (SFT cross-entropy); phase 2 is the ordinary task run starting from the warmed
A, B. In cotune phase 1 runs once at the server on public data, inside `build_experiment`, before any
role exists, so every role (server and devices, any paradigm) starts from the warmed adapter.
The result is a plain LoRA; only its starting point differs. The same warm-up is a pre-stage of
any non-staged method (DoRA, PiSSA, KaSA, ...) through `peft.warmup`: it trains whatever that
method's adapter holds (magnitudes, `lora_diag`, ...) with the method's own regularizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cotune.errors import AdapterError, ConfigError
from cotune.peft.lora import LoraLayer, LoraOptions

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class D2loraOptions(LoraOptions):
    # A built-in dataset name (or a file / hf: spec); its view defaults to the task's view.
    warmup_dataset: str = "austen"
    warmup_view: str | None = None
    warmup_labels: tuple[str, ...] | list[str] | None = None  # classification: labels to keep
    warmup_steps: int = 20
    warmup_lr: float = 1e-3
    warmup_examples: int = 256
    # The head (modules_to_save) belongs to the task's labels: reset it after the warm-up by default.
    keep_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_steps < 0 or self.warmup_examples < 1:
            raise ValueError(
                f"warmup_steps must be >= 0 and warmup_examples >= 1, got {self.warmup_steps}, "
                f"{self.warmup_examples}"
            )
        if self.warmup_lr <= 0:
            raise ValueError(f"warmup_lr must be > 0, got {self.warmup_lr}")


class D2loraLayer(LoraLayer):
    """Plain LoRA; D²LoRA is the warm-up that sets its initial A, B."""

    # Never claims a PEFT file: the saved adapter is plain LoRA and reloads as "lora".
    peft_variant: ClassVar[str | None] = "cotune_d2lora"


def d2lora_warmup(
    forward: Forward,
    adapters: Any,
    dataset: Any,
    task: str,
    opts: D2loraOptions,
    *,
    batch_size: int = 8,
    seed: int = 0,
    counter: Any = None,
    fp16: bool = False,
    on_backward: Callable[[], None] | None = None,
    count_key: str = "warmup",
) -> list[float]:
    """Train `adapters` in place for `opts.warmup_steps` AdamW steps on `dataset`; returns losses.
    ``fp16``: the forward runs in fp16 autocast, so the loss is scaled (a GradScaler).
    ``on_backward`` runs after each backward, before the optimizer step (GGM reads the
    gradients there).

    Runs on a forked RNG (seeded by `seed`), so the caller's random stream is the same as without
    the warm-up; the head is restored afterwards unless `keep_head`. With a `FlopCounter`, each
    step's forward + backward is counted under ``count_key`` (for the costs of whoever warms up).
    """
    from cotune.data import BatchSampler
    from cotune.models import segment_loss

    if len(dataset) == 0:
        raise AdapterError("D²LoRA: the warm-up dataset is empty")
    head_names = [
        n
        for n in adapters.named_tensors()
        if any(n.startswith(h + ".") for h in adapters.head_paths)
    ]
    head_before = {n: adapters.named_tensors()[n].detach().clone() for n in head_names}
    params = adapters.parameters()
    opt = torch.optim.AdamW(params, lr=opts.warmup_lr, weight_decay=0.0)
    sampler = BatchSampler(len(dataset), min(batch_size, len(dataset)), seed)
    model = adapters.model
    was = model.training
    losses: list[float] = []
    device = params[0].device
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        try:
            for _ in range(opts.warmup_steps):
                batch = dataset.batch(sampler.next_indices())
                opt.zero_grad(set_to_none=True)

                def fwd_bwd(b: Any) -> float:
                    loss = segment_loss(forward, b.input_ids, b.attention_mask, b.labels, task)
                    reg = adapters.regularization_loss()
                    loss = loss + reg if reg is not None else loss
                    scaler.scale(loss).backward()
                    return float(loss.detach())

                if counter is None:
                    value = fwd_bwd(batch)
                else:
                    bsz, seq = batch.input_ids.shape
                    value, _ = counter.run(count_key, fwd_bwd, batch, dims=(int(bsz), int(seq)))
                if on_backward is not None:
                    on_backward()
                scaler.step(opt)
                scaler.update()
                losses.append(value)
        finally:
            model.train(was)
            for p in params:
                p.grad = None
    if not opts.keep_head and head_before:
        with torch.no_grad():
            own = adapters.named_tensors()
            for n, v in head_before.items():
                own[n].copy_(v)
    return losses


def warmup_options(cfg: Any, adapters: Any) -> D2loraOptions:
    """The warm-up's settings: `peft.warmup` (any non-staged method) or d2lora's own options."""
    warm = cfg.peft.warmup
    if warm is None:
        return adapters_options(adapters)
    if cfg.peft.method == "d2lora":
        raise ConfigError(
            "peft.warmup: method 'd2lora' already warms up (peft.options.warmup_*); "
            "set one of the two, or use peft.method=lora with peft.warmup"
        )
    layer = next(iter(adapters.layers.values()), None)
    if layer is not None and hasattr(layer, "set_stage"):
        raise ConfigError(
            f"peft.warmup: method {cfg.peft.method!r} trains in stages, so a warm-up would train "
            "only its current stage; use peft.stages instead (MoDULA's universal stage is a "
            "warm-up of the universal expert on general data)"
        )
    return D2loraOptions(
        warmup_dataset=warm.dataset,
        warmup_view=warm.view,
        warmup_labels=tuple(warm.labels) or None,
        warmup_steps=warm.steps,
        warmup_lr=warm.lr,
        warmup_examples=warm.examples,
        keep_head=warm.keep_head,
    )


def d2lora_stage(
    cfg: Any, loaded: Any, tokenizer: Any, adapters: Any, sim: Any = None
) -> list[float]:
    """Phase 1 for a run (called by `build_experiment` for `peft.method: d2lora` or `peft.warmup`).

    With the run's `Simulation`, the warm-up's FLOPs and time go on the server's timeline (round
    0, label "warmup"): it is work the server does before any device starts."""
    from cotune.config import DataSection
    from cotune.data import encode_dataset, load_task_data

    opts = warmup_options(cfg, adapters)
    task = cfg.model.task
    section = DataSection(
        dataset=opts.warmup_dataset,
        view=opts.warmup_view,
        labels=list(opts.warmup_labels or []),
        max_examples=opts.warmup_examples,
        bpe_vocab_size=cfg.data.bpe_vocab_size,
    )
    data = load_task_data(section, task, cfg.seed)
    examples = data.train
    mixture = cfg.peft.warmup.mixture if cfg.peft.warmup is not None else None
    if mixture is not None:  # the warm-up's domains in the asked shares
        from cotune.data.mixture import mix_examples

        examples = mix_examples(
            examples, mixture, data.group_names, cfg.seed, "peft.warmup.mixture"
        )
    if task == "classification":
        # The task head has `num_labels` outputs: keep the warm-up classes that fit it.
        examples = [e for e in examples if e.label is not None and e.label < loaded.num_labels]
    encoded = encode_dataset(examples, tokenizer, cfg.model.max_length, task)
    encoded = encoded.on(next(iter(adapters.parameters())).device)
    before = sim.flops.by_key.get("warmup", 0) if sim is not None else 0
    losses = d2lora_warmup(
        loaded.anatomy.full(),
        adapters,
        encoded,
        task,
        opts,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        counter=sim.flops if sim is not None else None,
        fp16=cfg.train.autocast == "fp16",
    )
    if sim is not None:
        from cotune.sim.simulation import SERVER

        sim.charge(SERVER, sim.flops.by_key.get("warmup", 0) - before, round=0, label="warmup")
    return losses


def adapters_options(adapters: Any) -> D2loraOptions:
    from cotune.peft.base import get_method

    opts = get_method("d2lora").parse_options(adapters.cfg.options)
    assert isinstance(opts, D2loraOptions)
    return opts
