"""Options of HAT's paradigms: the drafter's training (hat_drafter) and U-shaped serving with
speculative decoding (hat_serve). Pydantic only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from cotune.paradigms.options.base import ParadigmOptions

if TYPE_CHECKING:
    from cotune.config import RunConfig


class HatDrafterOptions(ParadigmOptions):
    # HAT's drafter (hat_drafter.py), cut as `cotune infer --cut N_IN,N_OUT` cuts it:
    n_in: int = Field(1, ge=1)  # blocks on the device before the cloud's middle
    n_out: int = Field(1, ge=1)  # blocks on the device after it (with the final norm and head)
    # Drafter steps per device per FedAvg round (an evaluation point ends a round too).
    local_steps: int = Field(5, ge=1)
    mse_weight: float = Field(1.0, ge=0.0)  # to the middle's output hidden states
    kl_weight: float = Field(1.0, ge=0.0)  # to the full model's next-token distribution
    width: int | None = Field(None, ge=1)  # the adapter's inner width (default: hidden size)

    def check_config(self, cfg: RunConfig) -> None:
        if cfg.model.task != "causal_lm":
            raise ValueError(
                f"model.task: hat_drafter drafts tokens, so it needs causal_lm (got {cfg.model.task!r})"
            )
        if self.mse_weight == 0 and self.kl_weight == 0:
            raise ValueError("mse_weight: mse_weight and kl_weight cannot both be 0")


class HatServeOptions(ParadigmOptions):
    # HAT serving over the Grid (hat_serve.py): every device generates for prompts of its own
    # text, U-shaped, through the cloud role; train.steps is the number of requests per device.
    n_in: int = Field(1, ge=1)  # blocks on the device before the cloud's middle
    n_out: int = Field(1, ge=1)  # blocks on the device after it (with the final norm and head)
    gamma: int = Field(4, ge=0)  # tokens drafted per cloud round (0: plain U-shaped decoding)
    # The drafter: a directory hat_drafter or `cotune infer` wrote (RUN_DIR/drafter/cut-1-1), or
    # a run directory holding one for this cut; none: the untrained drafter (skips the middle).
    drafter: str | None = None
    prompt_tokens: int = Field(16, ge=1)  # each prompt: the first tokens of one of its texts
    max_new_tokens: int = Field(16, ge=1)  # tokens generated per request (fewer at end of text)
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy; else sampled, exactly the model's law
    # Prompt positions per upload: a number, None (the whole prompt), or "auto": chosen per
    # device from its declared speeds and the cloud's (the simulated time to the first token).
    prefill_chunk: int | Literal["auto"] | None = None

    @field_validator("prefill_chunk")
    @classmethod
    def _positive_chunk(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or 'auto' (got {v})")
        return v

    def check_config(self, cfg: RunConfig) -> None:
        if cfg.model.task != "causal_lm":
            raise ValueError(
                f"model.task: hat_serve generates text, so it needs causal_lm (got {cfg.model.task!r})"
            )
