"""The typed run config: one pydantic model per section, loaded from YAML plus ``--set`` overrides.

The config file and the CLI flags map onto the same fields: ``--set train.lr=3e-4`` sets
``config.train.lr``. Unknown keys, wrong types and values outside an allowed set raise
``ConfigError`` naming the dotted field, the bad value and what is allowed.

This module imports neither torch nor transformers: the CLI reads configs at start-up.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cotune.errors import ConfigError

TaskName = Literal["classification", "causal_lm"]


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    # A Hugging Face hub id, a local directory, "minilm" (the bundled all-MiniLM-L6-v2),
    # or "random:<family>" (gpt2, llama, qwen2, mistral, bert, roberta) built from `random_config`.
    name_or_path: str = "minilm"
    # classification (a label per text) or causal_lm (next-token loss on the text).
    task: TaskName = "classification"
    # Extra fields for the HF config of a random:<family> model (n_layer, hidden_size, ...); an
    # overridden width also sets the MLP width by the family's rule unless given (GPT-2, BERT:
    # 4x; LLaMA-like: 8/3x up to a multiple of 256).
    random_config: dict[str, Any] = Field(default_factory=dict)
    # The frozen base's dtype (adapters, their gradients and optimizer state stay float32).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Quantize the frozen base's block linears with bitsandbytes (QLoRA-style: the adapters and
    # their math stay in float32/bf16): int8 (LLM.int8), nf4 or fp4 (4-bit). Runs on CUDA and on
    # CPU (bitsandbytes' portable kernels: slow); the simulator counts the quantized bytes.
    quantize: Literal["none", "int8", "nf4", "fp4"] = "none"
    # Texts are truncated to this many tokens.
    max_length: int = Field(128, ge=8, le=8192)


class DataSection(Section):
    # A built-in dataset name (see `cotune datasets`) or a path to a .jsonl / .csv file,
    # or "hf:<name>[:<config>]" for Hugging Face `datasets` when installed.
    dataset: str = "fortunes"
    # The column (JSONL key, CSV header) that holds the text.
    text_field: str = "text"
    # The column that holds the label (classification) or domain.
    label_field: str = "label"
    # Instruction data (causal LM): the column holding each example's prompt. The model reads
    # the prompt followed by text_field (the response, as written: put any separator in the
    # data) and the loss covers the response's tokens only; past model.max_length the prompt
    # loses its start, so the answer stays. Null: plain language modelling.
    prompt_field: str | None = None
    # Instruction data in the model's chat format: each prompted example becomes a conversation
    # (system_prompt, the prompt as the user's turn, the response as the assistant's), the loss
    # on the assistant's turn and its end-of-turn tokens. "tokenizer": the tokenizer's own
    # template (instruct checkpoints ship one); "chatml": ChatML, shipped with cotune (for a
    # base model whose tokenizer has none); a path: a Jinja template file in Hugging Face's
    # format (messages, add_generation_prompt). Null: prompt and response joined as written.
    chat_template: str | None = None
    # With chat_template: a system message before every prompt.
    system_prompt: str | None = None
    # Keep only these labels (classification); empty keeps all.
    labels: list[str] = Field(default_factory=list)
    # Built-in dataset view, e.g. austen: "text" (causal LM) or "novel" (which-novel classification).
    view: str | None = None
    # Use at most this many examples (a seeded, label-stratified subsample).
    max_examples: int | None = Field(None, ge=1)
    # Held-out share for evaluation (when no test_file is given).
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # A separate evaluation file (same format and columns).
    test_file: str | None = None
    # Vocabulary size of the local byte-level BPE trained for random-init models.
    bpe_vocab_size: int = Field(2000, ge=300)
    # Train on this mixture of domains (a causal LM's domains, or labels): {name: weight},
    # unlisted domains weight 0. Each device's shard is resampled to its size in these shares
    # (among the domains it holds); `cotune mixture` searches for it. Null: the data as it is.
    mixture: dict[str, float] | None = None


class PartitionSection(Section):
    # How training examples are split over devices: iid, dirichlet (label skew by alpha), shards (classes_per_device labels each), quantity (power-law sizes).
    scheme: Literal["iid", "dirichlet", "shards", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0.0)  # Dirichlet concentration (label skew)
    classes_per_device: int = Field(2, ge=1)  # "shards": labels each device holds
    power: float = Field(1.5, gt=0.0)  # "quantity": power-law exponent of shard sizes
    min_size: int = Field(1, ge=1)  # fewest training examples a device may hold


class AvailabilitySection(Section):
    """How devices behave (see cotune.sim.availability)."""

    # When devices can be reached: always, random (each round with drop_p), periodic (cycles), trace (a CSV of online intervals).
    kind: Literal["always", "random", "periodic", "trace"] = "always"
    drop_p: float = Field(0.0, ge=0.0, le=1.0)  # "random": chance to miss each round
    period_s: float = Field(86_400.0, gt=0.0)  # "periodic": cycle length (simulated seconds)
    on_fraction: float = Field(1.0, gt=0.0, le=1.0)  # "periodic": online share of each cycle
    # "periodic": offset of the cycle (simulated seconds).
    phase_s: float = 0.0
    stagger: bool = False  # "periodic": a seeded phase per device
    trace_file: str | None = None  # "trace": CSV device,start_s,end_s of online intervals
    # Share of devices that compute slower (by straggler_slowdown).
    straggler_fraction: float = Field(0.0, ge=0.0, le=1.0)
    straggler_slowdown: tuple[float, float] = (2.0, 4.0)  # compute-time factor range
    straggler_per_round: bool = False  # redraw stragglers each round
    dispatch_batch: int | None = Field(None, ge=1)  # reports reach the server k at a time
    dispatch_rate: float | None = Field(None, gt=0.0)  # ... or at most this many per second
    # Chance that a report is lost on its way to the server.
    dispatch_drop_p: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> AvailabilitySection:
        if self.kind == "trace" and not self.trace_file:
            raise ValueError("kind=trace needs trace_file")
        if self.dispatch_batch is not None and self.dispatch_rate is not None:
            raise ValueError("dispatch_batch and dispatch_rate are exclusive")
        lo, hi = self.straggler_slowdown
        if not 1.0 <= lo <= hi:
            raise ValueError(f"straggler_slowdown must satisfy 1 <= lo <= hi, got {lo}, {hi}")
        return self


class DevicesSection(Section):
    # Simulated (or deployed) devices.
    count: int = Field(8, ge=1, le=100_000)
    # Fleet: fractions per profile (summing to 1), or one profile name per device; neither
    # means every device is phone-mid. Profiles: `cotune devices`, or `profile_file` (YAML).
    mix: dict[str, float] | None = None
    # One profile name per device (instead of mix).
    profiles: list[str] | None = None
    # The server's profile.
    server: str = "a100"
    # A YAML of extra device profiles (FLOP/s, links, memory, energy).
    profile_file: str | None = None
    # Device behaviour over simulated time (below).
    availability: AvailabilitySection = Field(default_factory=AvailabilitySection)
    # Heterogeneous LoRA ranks (fedavg, lora/dora): per profile name or device id (others get
    # peft.r), or "memory" (peft.r scaled by memory over the largest, a power of two).
    ranks: dict[str, int] | Literal["memory"] | None = None


class WarmupSection(Section):
    """D²LoRA's warm-up as a pre-stage of any LoRA-shaped method: train the fresh adapter on
    general data before the task run, so every role starts from it (docs/methods.md)."""

    # A built-in dataset name, a file, or "hf:<name>"; the view defaults to the task's.
    dataset: str = "austen"
    # View of the warm-up dataset (as data.view).
    view: str | None = None
    labels: list[str] = Field(default_factory=list)  # classification: classes to keep
    # Public examples used for the warm-up.
    examples: int = Field(256, ge=1)
    # Warm-up optimizer steps on the server before the run.
    steps: int = Field(20, ge=0)
    # The warm-up's learning rate.
    lr: float = Field(1e-3, gt=0.0)
    keep_head: bool = False  # the head belongs to the task's labels: reset it by default
    # Warm up on this mixture of the warm-up data's domains ({name: weight}, as data.mixture;
    # `cotune mixture` can search it). Null: the warm-up data as it is.
    mixture: dict[str, float] | None = None


class PeftSection(Section):
    # The PEFT method (see docs/methods.md): lora, dora, bora, kasa, pissa, d2lora, gelora, modula, mosld, ggm, ....
    method: str = "lora"
    # Adapter rank.
    r: int = Field(8, ge=1)
    # Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
    alpha: float = Field(16.0, gt=0.0)
    # Dropout on the adapter's input.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Rank-stabilized scaling alpha / sqrt(r).
    use_rslora: bool = False
    # Module-name patterns: a plain name matches the last path component ("query"),
    # anything with a dot or regex characters is matched as a regex against the full path.
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])
    # Per-module overrides, keyed by pattern as PEFT does.
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    # Per-module alpha overrides (module name pattern -> alpha).
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    # Only adapt these block indices (None = all).
    layers: list[int] | None = None
    # Train the classification head too (PEFT's modules_to_save); ignored for causal LM.
    train_head: bool = True
    # Method-specific options, validated by the method's own module.
    options: dict[str, Any] = Field(default_factory=dict)
    # Staged methods (modula, mosld): steps per stage, run in the method's own stage order
    # (modula: universal, domain, router) within one run; train.steps is their sum.
    stages: dict[str, int] | None = None
    # D²LoRA warm-up before the task run, for any non-staged method (None: no warm-up).
    warmup: WarmupSection | None = None

    @field_validator("stages")
    @classmethod
    def _stages_train(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("name at least one stage with its steps, e.g. {universal: 20}")
        bad = {k: n for k, n in v.items() if not isinstance(n, int) or n < 0}
        if bad:
            raise ValueError(f"steps per stage must be integers >= 0, got {bad}")
        if sum(v.values()) < 1:
            raise ValueError(f"the stages must train at least one step in all, got {v}")
        return v


class ParadigmSection(Section):
    # One of cotune.paradigms.PARADIGMS (central, local, fedavg, ...).
    name: str = "central"
    # Paradigm-specific options, validated by the paradigm's own module.
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_paradigm(cls, v: str) -> str:
        from cotune.paradigms import PARADIGMS  # a dict of module paths: imports no torch

        if v not in PARADIGMS:
            raise ValueError(f"{v!r} is not a paradigm (allowed: {', '.join(PARADIGMS)})")
        return v


CODEC_FORMS = "fp32, fp16, bf16, int8, topk (= topk0.1), topk<fraction>, topk:<fraction>"


def _check_codec(v: str) -> str:
    if v in ("fp32", "fp16", "bf16", "int8", "topk"):
        return v
    m = re.fullmatch(r"topk:?([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", v)
    if m and 0.0 < float(m.group(1)) <= 1.0:
        return v
    raise ValueError(f"{v!r} is not a codec (allowed: {CODEC_FORMS})")


class RaySection(Section):
    """engine.kind: ray — device roles on Ray actors ("hosts"), many devices per host."""

    address: str | None = None  # None: start Ray on this machine; "auto" or HOST:PORT: join
    hosts: int = Field(1, ge=1)  # actors; devices are placed round robin
    # CPUs Ray reserves for each host actor (its torch threads follow).
    num_cpus_per_host: float = Field(1.0, ge=0.0)
    # GPUs (or a fraction) Ray gives each host actor.
    num_gpus_per_host: float = Field(0.0, ge=0.0)
    threads_per_host: int | None = Field(None, ge=1)  # torch/OpenMP threads in each host
    num_cpus: int | None = Field(None, ge=1)  # a Ray started here: its CPU count (None: all)
    max_restarts: int = Field(3, ge=0)  # a host that dies is restarted (its devices rejoin)
    # Keep the host actors between runs of one process (tests, notebooks, sweeps) when Ray was
    # started outside cotune: a next run with the same host settings skips their start-up.
    # cotune.deploy.raynodes.release_idle_hosts() frees them; a Ray cotune starts ends with
    # its run either way.
    keep_hosts: bool = True
    # round_robin: device i on host i mod hosts; by_profile: devices of one simulated profile
    # together (contiguous blocks in profile order), so a host serves one kind of device.
    placement: Literal["round_robin", "by_profile"] = "round_robin"
    # Refuse up front a run whose hosts would not fit (base + per-device state × devices).
    memory_per_host_gb: float | None = Field(None, gt=0.0)


class EngineSection(Section):
    # local: roles share this process and its one model (one frozen base, many role states);
    # isolated: every role on its own node copy, sharing no Python object (proves the Grid
    # contract; one model per node, so small fleets only); grpc: devices are processes that
    # dial this server; ray: devices live on Ray actors (each one base, many devices).
    kind: Literal["local", "isolated", "grpc", "ray"] = "local"
    # Wire codec for adapter/parameter messages, and for cut-layer activations and gradients
    # in split paradigms (lossy codecs such as int8 and topk are meant for those).
    codec: str = "fp32"
    # Codec of split paradigms' cut activations and gradients.
    activation_codec: str = "fp32"
    # grpc: the server listens here; devices dial in (`cotune device --server HOST:PORT`).
    listen: str = "127.0.0.1:50051"
    tls_dir: str | None = None  # ca.pem, server.pem/.key (+ <device>.pem/.key): `cotune certs`
    mutual_tls: bool = False  # devices must show a certificate whose name is their id
    insecure: bool = False  # plain text, no TLS (a trusted network only)
    tokens_file: str | None = None  # YAML/JSON: device id -> SHA-256 hex of its token
    join_timeout_s: float = Field(300.0, gt=0.0)  # how long the server waits for the devices
    # Start once this many devices joined and join_timeout_s passed (None: wait for all); the
    # others count as away (failed replies) until they connect, then start fresh.
    join_quorum: int | None = Field(None, ge=1)
    # A remote call not answered in this long fails (the device counts as gone for it).
    request_timeout_s: float = Field(600.0, gt=0.0)
    # engine.kind ray: the host actors (below).
    ray: RaySection = Field(default_factory=RaySection)

    @field_validator("codec", "activation_codec")
    @classmethod
    def _known_codec(cls, v: str) -> str:
        return _check_codec(v)


class DPSection(Section):
    """User-level differential privacy of federated fine-tuning (DP-FedAvg)."""

    # off; central: the server clips each device's update and adds Gaussian noise to their sum;
    # local: each device clips and noises its own update before it leaves the device.
    mode: Literal["off", "central", "local"] = "off"
    # L2 bound on one device's update (the adapter's change over a round), all tensors together.
    clip: float = Field(1.0, gt=0.0)
    # Noise standard deviation over the clip bound (sigma); or set target_epsilon instead.
    noise_multiplier: float | None = Field(None, ge=0.0)
    # The epsilon the whole run may spend: sets noise_multiplier from the planned rounds.
    target_epsilon: float | None = Field(None, gt=0.0)
    # delta of (epsilon, delta)-DP (default: 1 / population^1.1, below one over the devices).
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    # Opacus's privacy accountant: rdp (Renyi DP) or prv (privacy random variables).
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _one_noise(self) -> DPSection:
        if self.mode != "off" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"mode {self.mode}: give exactly one of noise_multiplier and target_epsilon"
            )
        return self


class TrainSection(Section):
    steps: int = Field(100, ge=1)  # optimizer steps per role that trains
    # Examples per optimizer step (per device).
    batch_size: int = Field(8, ge=1)
    # Micro-batches accumulated per optimizer step. Split paradigms: each gradient round trip
    # brings the next micro-batch up (U-shaped too); splitfrozen's
    # server steps once per grad_accum uploads; hat_drafter makes grad_accum round trips a step.
    grad_accum: int = Field(1, ge=1)
    # AdamW learning rate (peak, after warm-up).
    lr: float = Field(5e-4, gt=0.0)
    # AdamW weight decay.
    weight_decay: float = Field(0.0, ge=0.0)
    # Linear warm-up steps of the learning rate.
    warmup_steps: int = Field(0, ge=0)
    # The learning-rate schedule's length in steps (null: train.steps). Longer than train.steps,
    # a run is the first part of a longer one (mixture search's partial runs).
    schedule_steps: int | None = Field(None, ge=1)
    # Learning-rate decay after warm-up.
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    # Gradient clipping norm (null: no clipping).
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    # AdamW betas.
    betas: tuple[float, float] = (0.9, 0.999)
    # A non-finite loss, gradient or update: stop the run naming the step and role (keeping the
    # last good checkpoint), or skip that step (the role's weights stay as they were).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Where nodes compute: auto (cuda if present, else mps, else cpu) | cpu | cuda | cuda:N | mps.
    device: str = "auto"
    # Per node kind (server, devices, edges) or node id (device-3): overrides `device`. On the
    # local engine every role shares one model, so all must resolve to one device.
    node_devices: dict[str, str] = Field(default_factory=dict)
    # Mixed precision of the forward pass: bf16 or fp16 matmuls with fp32 adapter weights and
    # optimizer state; fp16 scales the loss (a per-role GradScaler, swapped like the RNG).
    autocast: Literal["none", "bf16", "fp16"] = "none"
    # Recompute each block's activations in backward instead of keeping them (less memory,
    # about one more forward of compute); the simulator's memory estimate counts it.
    gradient_checkpointing: bool = False
    # Whole-model training steps and evaluation run the blocks on the real tokens only
    # (padding removed around attention); when the head reads only the first token
    # (BERT-like classification), the last block for that token only; a causal-LM head and
    # its loss on the real tokens only (no vocabulary-wide row per padding slot). The same
    # results up to float rounding and dropout masks, fewer FLOPs when batches are padded. Split
    # paradigms (split, splitfed, splitfrozen) run each side's segment this way too; the
    # cut's activations still cross padded (zeros at the padding), so messages keep their
    # size; splitfed's device cohort packs its joint batch the same way. Devices then
    # finish their forward sooner in simulated time, so a sequential split server may serve
    # them in another order (another trajectory, as any change of device speed gives).
    # BERT/RoBERTa, GPT-2 and LLaMA/Qwen2/Mistral blocks pack; others (q/k-normed attention as
    # in Qwen3 or OLMo, cross-attention) run padded.
    padding_free: bool = False
    # Differential privacy of the devices' updates (fedavg).
    dp: DPSection = Field(default_factory=DPSection)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)

    @field_validator("node_devices")
    @classmethod
    def _node_devices(cls, v: dict[str, str]) -> dict[str, str]:
        for key, spec in v.items():
            if key not in NODE_KINDS and not re.fullmatch(r"[a-z]+-\d+", key):
                raise ValueError(
                    f"key {key!r} is not a node kind ({', '.join(NODE_KINDS)}) nor a node id "
                    "such as device-3"
                )
            try:
                _check_device(spec)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        return v


NODE_KINDS = ("server", "devices", "edges")


def _check_device(v: str) -> str:
    if v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v):
        return v
    raise ValueError(f"{v!r} is not a device (allowed: auto, cpu, cuda, cuda:N, mps)")


class EvalSection(Section):
    every: int = Field(20, ge=1)  # evaluate every N steps (and at the end)
    # Evaluation batch size.
    batch_size: int = Field(32, ge=1)
    # Evaluate on at most this many test examples.
    max_examples: int | None = Field(None, ge=1)
    # Report when (step, simulated and host time) a run first reaches it.
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)
    # Evaluate on this mixture of domains ({name: weight}; the test set resampled in these
    # shares): the target a mixture search optimizes for. Null: the test set as it is.
    mixture: dict[str, float] | None = None


class OutputSection(Section):
    # Runs are written to <dir>/<name>.
    dir: str = "runs"
    # Replace an existing run directory (as --overwrite).
    overwrite: bool = False
    # "eval": at every evaluation point (federated paradigms: the first round boundary at or
    # after it); N: every N steps; 0: only the final checkpoint.
    checkpoint_every: int | Literal["eval"] = "eval"
    keep_checkpoints: int = Field(2, ge=1)  # the newest K; a torn newest falls back to the next
    # Write the trained adapter in PEFT's layout (adapter/).
    save_adapter: bool = True
    # Also send the metrics, config and summary to these trackers (optional packages:
    # pip install 'cotune[trackers]' for tensorboard and mlflow; wandb runs offline by default).
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    # MLflow tracking URI (default: <run dir>/mlruns, a file store).
    mlflow_uri: str | None = None
    # MLflow experiment / W&B project the run is filed under.
    tracker_project: str = "cotune"

    @field_validator("checkpoint_every")
    @classmethod
    def _every(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be 'eval' or an integer >= 0, got {v}")
        return v


class MixtureSection(Section):
    """`cotune mixture`: search the `data.mixture` that minimizes the run's objective."""

    # Domains to mix (empty: every domain of the data).
    domains: list[str] = Field(default_factory=list)
    # Smaller models of the same family, smallest first, each overriding model fields (e.g.
    # {random_config: {n_layer: 1}} or {name_or_path: ./ckpt-small}); the run's model is the
    # target rung, always last.
    ladder: list[dict[str, Any]] = Field(default_factory=list)
    # Step fidelities below train.steps (the target); empty: train.steps / 4 and / 2. Every
    # evaluation point of a run is a data point; partial runs follow the target's LR schedule.
    steps: list[int] = Field(default_factory=list)
    # What to minimize on the evaluation data (eval.mixture names the target domain mix):
    # loss, perplexity, or accuracy (1 − accuracy is minimized).
    objective: Literal["loss", "perplexity", "accuracy"] = "loss"
    # FLOPs each search method may spend (counted by cotune's meters over all roles).
    budget_flops: float | None = Field(None, gt=0)
    # mfbo: multi-fidelity multi-scale BO (GP + cost-aware EI); random: random search at the
    # target; hyperband: successive halving brackets over steps at the target model.
    methods: list[Literal["mfbo", "random", "hyperband"]] = Field(
        default_factory=lambda: ["mfbo", "random", "hyperband"]
    )
    # mfbo: random configurations (over every rung, at the fewest steps) before the GP.
    initial: int = Field(4, ge=2)
    # mfbo acquisition: ei (expected improvement per cost^α) or kg (BoTorch's multi-fidelity
    # knowledge gradient per cost).
    acquisition: Literal["ei", "kg"] = "ei"
    cost_exponent: float = Field(1.0, ge=0.0)  # α of EI / cost^α
    cost_decay: float = Field(0.99, gt=0.0, le=1.0)  # α_t = α · decay^t (less cost-averse later)
    # mfbo: every N-th proposal evaluates the current best guess at the target fidelity.
    target_every: int = Field(3, ge=1)
    eta: int = Field(3, ge=2)  # hyperband: keep 1/eta of each rung

    @model_validator(mode="after")
    def _check(self) -> MixtureSection:
        if len(set(self.methods)) != len(self.methods) or not self.methods:
            raise ValueError(f"methods must be distinct and not empty, got {self.methods}")
        if any(s < 1 for s in self.steps):
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        return self


class RunConfig(Section):
    # The run's name: its directory under output.dir, its label in comparisons.
    name: str = "run"
    # Seeds everything: data split, partition, initialization, sampling, simulator.
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    partition: PartitionSection = Field(default_factory=PartitionSection)
    devices: DevicesSection = Field(default_factory=DevicesSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    paradigm: ParadigmSection = Field(default_factory=ParadigmSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)
    # `cotune mixture`'s search settings (a training run ignores them).
    mixture: MixtureSection | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_path_component(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a non-empty name without '/' and not starting with '.'")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.eval.target_accuracy is not None and self.model.task != "classification":
            raise ValueError("eval.target_accuracy needs model.task=classification")
        if self.data.prompt_field is not None and self.model.task != "causal_lm":
            raise ValueError(
                "data.prompt_field: prompts and responses are for model.task=causal_lm, not "
                f"{self.model.task}"
            )
        if self.data.chat_template is not None and self.model.task != "causal_lm":
            raise ValueError(
                "data.chat_template: conversations are for model.task=causal_lm, not "
                f"{self.model.task}"
            )
        if self.data.system_prompt is not None and self.data.chat_template is None:
            raise ValueError(
                "data.system_prompt: a system message needs a chat template; set "
                "data.chat_template (e.g. 'tokenizer')"
            )
        if self.devices.ranks is not None and self.paradigm.name != "fedavg":
            raise ValueError(
                f"devices.ranks: heterogeneous ranks are built for fedavg only so far, not "
                f"{self.paradigm.name}"
            )
        if self.train.dp.mode != "off" and self.paradigm.name != "fedavg":
            raise ValueError(
                f"train.dp.mode {self.train.dp.mode}: differential privacy is built for fedavg "
                f"only so far, not {self.paradigm.name}"
            )
        if self.peft.stages is not None:
            total = sum(self.peft.stages.values())
            if "steps" not in self.train.model_fields_set:  # unset: the stages decide
                self.train = self.train.model_copy(update={"steps": total})
            elif self.train.steps != total:
                raise ValueError(
                    f"train.steps = {self.train.steps} but peft.stages sum to {total}; "
                    "set train.steps to the sum or leave it out"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """Hash of everything that changes what training computes (not output/eval settings)."""
        d = self.to_dict()
        for k in ("output", "eval", "name"):
            d.pop(k, None)
        # Where a run computes and whether it recomputes activations do not change what it
        # learns: a run may resume on another machine. Precision and quantization do; they
        # join the hash only when set, so runs from before they existed still resume.
        for k in ("device", "node_devices", "gradient_checkpointing"):
            d["train"].pop(k, None)
        for k in (
            "listen",
            "tls_dir",
            "mutual_tls",
            "insecure",
            "tokens_file",
            "join_timeout_s",
            "join_quorum",
            "request_timeout_s",
            "ray",
        ):
            d["engine"].pop(k, None)  # how a deployment connects, not what it computes
        if d["train"].get("autocast") == "none":
            d["train"].pop("autocast")
        if not d["train"].get("padding_free"):
            d["train"].pop("padding_free", None)
        if d["model"].get("quantize") == "none":
            d["model"].pop("quantize")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading and overrides


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _section_for(e["loc"][:-1])
            if parent is not None:
                msg += f" (allowed: {', '.join(sorted(parent.model_fields))})"
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected")
            msg = f"{e.get('input')!r} is not allowed (allowed: {allowed})"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = RunConfig
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so ``3``, ``true``, ``[q, v]`` work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: the key {key!r} is not a dotted field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise ConfigError(
            f"{p}: the config file is empty; give at least one section (e.g. `paradigm: "
            "{name: central}`), or copy one from configs/"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    from cotune.paradigms.options import check_paradigm_options  # pydantic only, no torch

    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    opts = check_paradigm_options(cfg, source)
    if opts.profile_fields():
        from cotune.sim.profiles import all_profiles  # torch-free, like this module

        known = all_profiles(cfg.devices.profile_file)
        for field, name in opts.profile_fields().items():
            if name not in known:
                raise ConfigError(
                    f"invalid config ({source}):\n  paradigm.options.{field}: unknown device "
                    f"profile {name!r} (known: {', '.join(known)})"
                )
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data = read_yaml(path) if path is not None else {}
    if path is not None and "name" not in data:
        data["name"] = Path(path).stem
    data = apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " with --set " + " ".join(overrides)
    return config_from_dict(data, source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
