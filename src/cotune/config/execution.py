"""How a run executes and what it writes: the engine (and Ray's hosts), training, differential
privacy, evaluation and output sections."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cotune.config.sections import Section

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
    # (padding removed around attention); when the head reads one token a row (classification:
    # BERT's first, a decoder's last), the last block for that token only; a causal-LM head
    # and its loss on the real tokens only (no vocabulary-wide row per padding slot). The same
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
