"""What a run trains: the model, the data and its partition, the devices, the PEFT method and
the paradigm (one pydantic model per section; unknown keys are errors)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
