"""Options of the split-learning paradigms: split, splitfed (SplitLoRA) and splitfrozen.
Pydantic only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from cotune.paradigms.options.base import ParadigmOptions

if TYPE_CHECKING:
    from cotune.config import RunConfig


class CutOptions(ParadigmOptions):
    cut: int = Field(1, ge=1)  # device: embeddings + blocks [0, cut); server: [cut, L) (+ head)
    u_shaped: bool = False  # head (and blocks [cut_top, L)) stay on the device; labels too
    cut_top: int | None = None  # U-shape only; default L (the device keeps just the head)
    clip: Literal["global", "per_side"] = "global"  # how train.max_grad_norm is applied
    # A malformed or non-finite cut message: stop the run, or skip that device's step.
    on_bad_message: Literal["stop", "skip"] = "stop"

    def check_config(self, cfg: RunConfig) -> None:
        if self.cut_top is not None and not self.u_shaped:
            raise ValueError("cut_top: only used with u_shaped: true")
        if self.cut_top is not None and self.cut_top <= self.cut:
            raise ValueError(
                f"cut_top: {self.cut_top} must be above cut ({self.cut}) so the server keeps a block"
            )


class SplitOptions(CutOptions):
    turn_steps: int = Field(1, ge=1)  # steps a device trains before handing the adapter on
    # How the adapter passes between devices: through the server, or device to device.
    relay: Literal["server", "p2p"] = "server"
    relay_optimizer: bool = True  # AdamW moments travel with the adapter


class SplitFedOptions(CutOptions):
    # I: FedAvg of the device adapters every I units of `aggregate_unit` (reference code: 100).
    aggregate_every: int = Field(100, ge=1)
    # steps: I steps of all devices (each step is one batch per device); client_batches: I
    # device batches served, SplitLoRA's reference unit (its train_step counts client batches,
    # so with K devices it aggregates every I/K steps), applied at the end of the step in which
    # the count reaches a multiple of I (the reference aggregates mid-step, after that batch).
    aggregate_unit: Literal["steps", "client_batches"] = "steps"
    # Device adapters averaged by example count, or uniformly.
    weighting: Literal["examples", "uniform"] = "examples"
    # One server-side adapter for all devices, or one per device.
    server_side: Literal["shared", "per_device"] = "shared"
    # sequential: SplitLoRA's reference (one server update per device batch, arrival order);
    # pooled: one server forward/backward/update on all of a step's activations together.
    server_batch: Literal["sequential", "pooled"] = "sequential"
    # In-process engine: run the devices' bottom segments as one batch (split_cohort.py).
    cohort: bool = True

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if self.server_batch == "pooled" and self.server_side != "shared":
            raise ValueError(
                "server_batch: 'pooled' needs server_side: shared (one server model to pool the "
                "devices' activations into)"
            )


class SplitFrozenOptions(ParadigmOptions):
    cuts: list[int] | None = None  # one cut per device; default: chosen from the profiles
    max_cut: int | None = Field(None, ge=0)  # the fastest device's cut (default: L // 2)
    min_cut: int = Field(0, ge=0)  # never fewer device blocks than this (0: embeddings only)
    # Devices' forwards overlap the server's work (pipelined steps).
    pipeline: bool = True
    # A malformed or non-finite cut message: stop the run, or skip that device's step.
    on_bad_message: Literal["stop", "skip"] = "stop"

    def check_config(self, cfg: RunConfig) -> None:
        if self.cuts is not None:
            if len(self.cuts) != cfg.devices.count:
                raise ValueError(
                    f"cuts: {len(self.cuts)} cuts for {cfg.devices.count} devices (one per device)"
                )
            if any(k < 0 for k in self.cuts):
                raise ValueError(f"cuts: must be >= 0, got {self.cuts}")
        if self.max_cut is not None and self.min_cut > self.max_cut:
            raise ValueError(f"min_cut: {self.min_cut} > max_cut {self.max_cut}")
