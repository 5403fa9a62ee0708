"""What one logged "step" is in each paradigm, so a comparison can say when its step axis
puts different amounts of work side by side.

``train.steps`` counts optimizer steps of a role that trains, but how many batches one step
consumes differs: central takes one batch of the pooled data, fedavg one batch on every device of
the round, split one device's batch while the others wait.
"""

from __future__ import annotations

from collections.abc import Iterable

#: paradigm → the training data one step consumes (docs/methods.md has the full protocols).
STEP_MEANS = {
    "central": "one batch of the pooled data on the server",
    "local": "one batch on every device (each its own adapter)",
    "fedavg": "one batch on every device of the round",
    "split": "one batch of one device (devices take turns)",
    "splitfed": "one batch on every device, all served by the server",
    "splitfrozen": "one batch on every device, all served by the server",
    "hierfed": "one batch on every device of the groups that train",
    "fedbiot": "one batch on every device of the round, through the emulator",
    "dlora": "one batch on every device, its killed modules computed by the cloud",
    "clustered": "one batch on every device of the round (each on its cluster's adapter)",
    "fedasync": "reports x local steps / devices at work (no rounds: fast devices do more)",
    "fedbuff": "reports x local steps / devices at work (no rounds: fast devices do more)",
}


def step_note(paradigms: Iterable[str | None]) -> str:
    """A caveat for a step axis shared by these paradigms, or "" when one step means the same
    work in all of them."""
    names = list(dict.fromkeys(p for p in paradigms if p))
    means = {p: STEP_MEANS.get(p, "see its section in docs/methods.md") for p in names}
    if len(set(means.values())) < 2:
        return ""
    each = "; ".join(f"{p}: {m}" for p, m in means.items())
    return f"Steps are not the same work across these runs ({each}); compare on simulated time."
