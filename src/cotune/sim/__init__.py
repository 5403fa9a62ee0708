"""The device simulator: device profiles and fleets, a discrete-event virtual clock,
device availability/straggler behaviour, and FLOP/memory/energy cost accounting.

Importing ``cotune.sim`` (and ``cotune.sim.profiles``, ``clock``, ``availability``) does not
import torch or transformers; only ``cotune.sim.costs`` imports torch.
"""
