"""The whole run's config (``RunConfig``: every section, the cross-section checks, the
fingerprint a resume compares) and ``cotune mixture``'s search section."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cotune.config.execution import EngineSection, EvalSection, OutputSection, TrainSection
from cotune.config.sections import (
    DataSection,
    DevicesSection,
    ModelSection,
    ParadigmSection,
    PartitionSection,
    PeftSection,
    Section,
)


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
