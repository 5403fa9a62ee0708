"""Models cut by anatomy: ``load_model`` → ``LoadedModel``; ``Anatomy`` per family; ``Segment`` slices;
``load_segment`` materialises one segment's weights only (a split-learning device).

Importing this package imports torch but not transformers (that happens in ``load_model``).
"""

from cotune.models.base import Anatomy
from cotune.models.bert import BertAnatomy
from cotune.models.gpt2 import GPT2Anatomy
from cotune.models.llama import LlamaAnatomy
from cotune.models.loading import (
    ATTN_IMPLEMENTATION,
    MODEL_TYPES,
    RANDOM_DEFAULTS,
    LoadedModel,
    anatomy_for,
    family_of,
    load_model,
)
from cotune.models.partial import load_segment, materialized_nbytes
from cotune.models.segment import Activations, Segment, segment_loss, task_loss

__all__ = [
    "ATTN_IMPLEMENTATION",
    "MODEL_TYPES",
    "RANDOM_DEFAULTS",
    "Activations",
    "Anatomy",
    "BertAnatomy",
    "GPT2Anatomy",
    "LlamaAnatomy",
    "LoadedModel",
    "Segment",
    "anatomy_for",
    "family_of",
    "load_model",
    "load_segment",
    "materialized_nbytes",
    "segment_loss",
    "task_loss",
]
