"""Training pieces shared by the paradigms: role state swapping, one step, evaluation."""

from cotune.train.loop import StepResult, evaluate, full_model_loss, train_step
from cotune.train.state import RoleState, Trainer, lr_factor

__all__ = [
    "RoleState",
    "StepResult",
    "Trainer",
    "evaluate",
    "full_model_loss",
    "lr_factor",
    "train_step",
]
