"""Options of the federated paradigms: fedavg (aggregators, FedProx, SecAgg, cohorts), hierfed,
fedbiot, dlora, clustered, and the asynchronous fedasync / fedbuff. Pydantic only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cotune.paradigms.options.base import ParadigmOptions

if TYPE_CHECKING:
    from cotune.config import RunConfig

# Aggregator name -> the options it takes (cotune.aggregation builds them; values are checked by
# the aggregator itself in the paradigm's preflight).
_ROBUST = ("reducer", "trim_beta")
_FEDOPT = ("eta", "beta1", "beta2", "tau", *_ROBUST)
AGGREGATOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "fedavg": ("eta", *_ROBUST),
    "fedavgm": ("eta", "momentum", *_ROBUST),
    "fedadagrad": _FEDOPT,
    "fedadam": _FEDOPT,
    "fedyogi": _FEDOPT,
    "median": ("eta",),
    "trimmed_mean": ("beta", "eta"),
}


class SecAggOptions(BaseModel):
    """Secure aggregation (SecAgg / SecAgg+): the server learns only the sum of the updates."""

    model_config = ConfigDict(extra="forbid")
    # Devices each one masks with (SecAgg+'s sparse graph, even); null: every other device.
    neighbors: int | None = Field(None, ge=2)
    # Shares needed to rebuild a secret (default: 2/3 of a secret's holders, at least 2).
    threshold: int | None = Field(None, ge=2)
    # Each update value is clipped to [-range, range] and quantized to `bits` bits.
    range: float = Field(0.1, gt=0.0)
    bits: int = Field(16, ge=2, le=24)


class FedAvgOptions(ParadigmOptions):
    local_steps: int = Field(5, ge=1)  # optimizer steps per device per round
    local_epochs: float | None = Field(None, gt=0)  # instead of local_steps (needs rounds)
    rounds: int | None = Field(None, ge=1)  # default: ceil(train.steps / local_steps)
    # Devices sampled each round (else fraction of them).
    clients_per_round: int | None = Field(None, ge=1)
    fraction: float = Field(1.0, gt=0.0, le=1.0)  # used when clients_per_round is not set
    # fedavg | fedavgm | fedadam | fedyogi | fedadagrad | median | trimmed_mean
    aggregator: str = "fedavg"
    # Options of the aggregator (server lr, momentum, trim ratio, ...).
    aggregator_options: dict[str, Any] = Field(default_factory=dict)
    # Average updates by each device's example count, or uniformly.
    weighting: Literal["examples", "uniform"] = "examples"
    prox_mu: float = Field(0.0, ge=0.0)  # FedProx: mu/2 * ||w - w_global||^2 on the device
    # A device keeps its AdamW moments between the rounds it joins ("keep"), or starts each
    # round afresh ("reset", like re-creating the trainer every round).
    optimizer_state: Literal["keep", "reset"] = "keep"
    quorum: int | None = Field(None, ge=1)  # close the round at the quorum-th report
    deadline_s: float | None = Field(None, gt=0.0)  # simulated seconds after the round starts
    min_reports: int = Field(1, ge=1)  # fewer reports: the global adapter stays as it was
    idle_wait_s: float = Field(60.0, gt=0.0)  # server wait when nobody is online
    # In-process engine: each local step of a round's devices as one batch (fed_cohort.py);
    # the same messages and costs, float results ~1e-6 apart from one by one.
    cohort: bool = False
    # At most this many rows in one cohort pass (devices x train.batch_size): a round's
    # devices run in consecutive cohorts of that size, bounding the activations held at
    # once (None: all of them together).
    cohort_rows: int | None = Field(None, ge=1)
    # devices.ranks: zero_pad (HetLoRA: pad A and B, average each) or stack (FLoRA: the exact
    # weighted sum of B·A, re-factored to peft.r by truncated SVD).
    rank_aggregation: Literal["zero_pad", "stack"] = "zero_pad"
    # HetLoRA's self-pruning: a device drops trailing rank components weaker than this
    # fraction of its strongest after each round (0: off).
    rank_prune: float = Field(0.0, ge=0.0, lt=1.0)
    # Secure aggregation of the updates (null: off); see SecAggOptions.
    secure_aggregation: SecAggOptions | None = None

    @field_validator("aggregator")
    @classmethod
    def _known_aggregator(cls, v: str) -> str:
        if v not in AGGREGATOR_OPTIONS:
            raise ValueError(
                f"{v!r} is not an aggregator (allowed: {', '.join(AGGREGATOR_OPTIONS)})"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FedAvgOptions:
        if self.local_epochs is not None and self.rounds is None:
            raise ValueError("local_epochs needs rounds (the number of rounds to run)")
        allowed = AGGREGATOR_OPTIONS[self.aggregator]
        unknown = sorted(set(self.aggregator_options) - set(allowed))
        if unknown:
            raise ValueError(
                f"aggregator_options: {', '.join(unknown)} not taken by {self.aggregator} "
                f"(allowed: {', '.join(allowed)})"
            )
        return self


class HierFedOptions(ParadigmOptions):
    # Edge groups (one edge aggregator each).
    num_groups: int = Field(2, ge=1)
    # Groups balanced by label mix, or random.
    grouping: Literal["balanced", "random"] = "balanced"
    # Per-group τ and depth balanced by group speed, or fixed.
    controller: Literal["balanced", "fixed"] = "balanced"
    tau: int | None = Field(None, ge=1)  # fixed: every group's τ (1); balanced: the largest τ (4)
    depth: int | None = Field(None, ge=1)  # fixed: every group's D; balanced: the deepest D (all)
    min_depth: int = Field(1, ge=1)  # balanced: the shallowest D
    local_steps: int = Field(5, ge=1)  # optimizer steps per device per group round
    rounds: int | None = Field(None, ge=1)  # cloud rounds (default: train.steps / steps per round)
    # Updates averaged by example count, or uniformly.
    weighting: Literal["examples", "uniform"] = "examples"
    # Devices keep their AdamW moments between rounds, or reset them.
    optimizer_state: Literal["keep", "reset"] = "keep"
    edge_profile: str = "jetson"  # device profile of the group aggregators (hub links)
    # In-process engine (and a Ray host): a group round's members' local steps as one batch
    # (fed_cohort.py), each on its own tensors; float results ~1e-6 apart from one by one.
    cohort: bool = False
    # At most this many rows in one cohort pass (devices x train.batch_size): a round's
    # devices run in consecutive cohorts of that size, bounding the activations held at
    # once (None: all of them together).
    cohort_rows: int | None = Field(None, ge=1)

    def infrastructure(self) -> dict[str, str]:
        return {f"edge-{g}": self.edge_profile for g in range(self.num_groups)}

    def profile_fields(self) -> dict[str, str]:
        return {"edge_profile": self.edge_profile}

    def check_config(self, cfg: RunConfig) -> None:
        if self.num_groups > cfg.devices.count:
            raise ValueError(
                f"num_groups: {self.num_groups} groups for {cfg.devices.count} devices "
                "(every group needs at least one device)"
            )
        if self.controller == "balanced" and self.depth is not None and self.min_depth > self.depth:
            raise ValueError(f"min_depth: {self.min_depth} > depth {self.depth}")


class FedBiOTOptions(ParadigmOptions):
    adapter_layers: int = Field(2, ge=1)  # the last blocks, trained on devices ("adpt2")
    adapter_mode: Literal["lora", "full"] = "lora"  # LoRA of those blocks, or the blocks in full
    keep_layers: int | None = Field(None, ge=1)  # lower blocks the emulator keeps ...
    drop_ratio: float = Field(0.5, ge=0.0, lt=1.0)  # ... or round(n_lower * (1 - drop_ratio))
    public_dataset: str | None = None  # default: austen (fortunes when the task data is austen)
    # View of the public dataset (as data.view).
    public_view: str | None = None
    # Public examples the server aligns the emulator on.
    public_examples: int = Field(200, ge=2)
    initial_align_steps: int = Field(50, ge=0)  # the code: 50 rounds x 10 steps before FL
    align_steps: int = Field(10, ge=0)  # before every FL round
    # The emulator alignment's learning rate.
    align_lr: float = Field(1e-3, gt=0.0)
    kl_weight: float = Field(0.0, ge=0.0)  # λ of the KL term (0 in every FedBiOT config)
    # Optimizer steps per device per round.
    local_steps: int = Field(5, ge=1)
    rounds: int | None = Field(None, ge=1)  # default: ceil(train.steps / local_steps)
    # Devices sampled each round (else fraction of them).
    clients_per_round: int | None = Field(None, ge=1)
    # Share of devices sampled each round.
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    prox_mu: float = Field(1.0, ge=0.0)  # ε·||w_A − w_A^(t)||² (the code's lm_loss_weight)
    # Updates averaged by example count, or uniformly.
    weighting: Literal["examples", "uniform"] = "examples"
    # In-process engine (and a Ray host): a round's devices' local steps through the emulator
    # as one batch (fed_cohort.py); float results ~1e-6 apart from one by one.
    cohort: bool = False
    # At most this many rows in one cohort pass (devices x train.batch_size): a round's
    # devices run in consecutive cohorts of that size, bounding the activations held at
    # once (None: all of them together).
    cohort_rows: int | None = Field(None, ge=1)

    def check_config(self, cfg: RunConfig) -> None:
        # The server aligns the emulator by training the base's own lower blocks, and
        # adapter_mode full trains the top blocks' weights: a quantized base has none to train.
        q = cfg.model.quantize
        if q != "none" and (self.initial_align_steps or self.align_steps):
            raise ValueError(
                f"model.quantize: {q}: fedbiot aligns its emulator by training the base's lower "
                "blocks on the server, which a quantized base cannot; use model.quantize: none, "
                "or paradigm.options.initial_align_steps: 0 and align_steps: 0 (no alignment)"
            )
        if q != "none" and self.adapter_mode == "full":
            raise ValueError(
                f"model.quantize: {q}: adapter_mode full trains the top blocks' own weights, "
                "which a quantized base cannot; use adapter_mode: lora"
            )


class DLoRAOptions(ParadigmOptions):
    active_fraction: float = Field(0.125, gt=0.0, le=1.0)  # ρ: 1/8 matches the reported 87.5%
    kill_every: int = Field(10, ge=1)  # T_k (steps)
    revive_every: int = Field(20, ge=1)  # T_r (steps)
    # Modules revived at each revive step.
    revive_count: int = Field(1, ge=0)
    # Sensitivity of a module: an EMA of ||grad|| x ||dW|| over its steps (default), or how far
    # its dW moved since the last kill check ("delta").
    score: Literal["ema_grad_weight", "delta"] = "ema_grad_weight"
    # EMA factor of the sensitivity score.
    score_beta: float = Field(0.9, ge=0.0, lt=1.0)
    # Which killed modules come back: drawn at random, or the longest-killed first ("stale").
    revive: Literal["random", "stale"] = "random"
    # Where the (frozen) embedding runs: on the device, so raw tokens never leave it (default),
    # or in the cloud, which then receives the token ids.
    embed: Literal["device", "cloud"] = "device"

    def check_config(self, cfg: RunConfig) -> None:
        why = dlora_refuses(cfg.peft.method)
        if why is not None:
            raise ValueError(f"peft.method: {why}")


def dlora_refuses(method: str) -> str | None:
    """Why dlora cannot run ``method`` (None: it can). The cloud computes a layer's base and the
    device its branch, so the layer must be base + an A/B branch (LoRA and the methods that
    only start it elsewhere or add a regularizer: PiSSA, OLoRA, KaSA, D²LoRA, GeLoRA, GGM), and
    a killed branch must merge into the cloud's backbone."""
    from cotune.peft import available_methods

    if method not in available_methods() or _branch_apart(method):
        return None  # (an unknown method: the peft section says so)
    ok = [m for m in available_methods() if _branch_apart(m)]
    return (
        f"dlora runs each LoRA branch on the device apart from the cloud's base layer, which "
        f"{method!r} cannot (its output is not base + an A/B branch); supported: {', '.join(ok)}"
    )


def _branch_apart(method: str) -> bool:
    from cotune.peft import AdapterLayer, LoraLayer, get_method

    cls = get_method(method).layer_cls
    additive = cls.adapted_forward is AdapterLayer.adapted_forward
    return issubclass(cls, LoraLayer) and additive and cls.mergeable


class ClusteredOptions(FedAvgOptions):
    """Clustered federated fine-tuning: one adapter per cluster of devices."""

    clusters: int = Field(2, ge=2)  # adapters (clusters of devices)
    # ifca: a device is sent every cluster's adapter and joins the one with the lowest loss on
    # its data (IFCA); updates: the server groups devices by the cosine similarity of their
    # last updates (k-means). The first round's clusters are drawn at random (seeded).
    assign: Literal["ifca", "updates"] = "ifca"
    every: int = Field(2, ge=1)  # rounds between re-assignments

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if self.secure_aggregation is not None or self.aggregator in ("median", "trimmed_mean"):
            raise ValueError("clustered: plain mean aggregators only (no secure aggregation)")


class AsyncOptions(ParadigmOptions):
    """What fedasync and fedbuff share: devices work without rounds."""

    local_steps: int = Field(5, ge=1)  # optimizer steps per device per task
    # Devices training at once (a device that reports starts its next task at once); null: all.
    concurrency: int | None = Field(None, ge=1)
    # Reports the server takes in (default: every device about ceil(train.steps/local_steps) times).
    updates: int | None = Field(None, ge=1)
    # How a report's weight falls with its staleness t (versions since its task began):
    # polynomial (t+1)^-a (FedAsync), constant, or hinge (1 up to b, then 1/(a(t-b)+1)).
    staleness: Literal["polynomial", "constant", "hinge"] = "polynomial"
    staleness_a: float = Field(0.5, ge=0.0)  # a of the staleness weight (FedBuff: 0.5)
    staleness_b: int = Field(4, ge=0)  # b of the hinge weight
    max_staleness: int | None = Field(None, ge=0)  # reports staler than this are dropped
    # Reports weighted by their example counts (fedbuff's buffer mean), or all alike.
    weighting: Literal["examples", "uniform"] = "uniform"
    # A device keeps its AdamW moments between tasks, or starts each afresh.
    optimizer_state: Literal["keep", "reset"] = "reset"
    prox_mu: float = Field(0.0, ge=0.0)  # FedProx term on the device (as fedavg)


class FedAsyncOptions(AsyncOptions):
    # FedAsync (Xie et al. 2019): every report is mixed in at once, w <- (1-a_t) w + a_t w_i.
    alpha: float = Field(0.6, gt=0.0, le=1.0)  # a_t = alpha * s(staleness)


class FedBuffOptions(AsyncOptions):
    # FedBuff (Nguyen et al. 2022): reports' changes wait in a buffer; every buffer_size of
    # them, w <- w + server_lr * mean(s(t_i) * delta_i).
    buffer_size: int = Field(4, ge=1)  # reports per new global version
    server_lr: float = Field(1.0, gt=0.0)  # eta: the step taken along the buffer's mean change
