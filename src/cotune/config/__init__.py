"""The typed run config: one pydantic model per section, loaded from YAML plus ``--set`` overrides.

The config file and the CLI flags map onto the same fields: ``--set train.lr=3e-4`` sets
``config.train.lr``. Unknown keys, wrong types and values outside an allowed set raise
``ConfigError`` naming the dotted field, the bad value and what is allowed.

Split by concern: ``sections`` (what a run trains: model, data, partition, devices, PEFT,
paradigm), ``execution`` (how it runs and what it writes: engine, train, eval, output),
``run_config`` (``RunConfig`` with its cross-section checks and fingerprint) and ``loading``
(YAML files and overrides). This package imports neither torch nor transformers: the CLI reads
configs at start-up.
"""

from cotune.config.execution import (
    CODEC_FORMS,
    NODE_KINDS,
    DPSection,
    EngineSection,
    EvalSection,
    OutputSection,
    RaySection,
    TrainSection,
)
from cotune.config.loading import (
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
)
from cotune.config.run_config import MixtureSection, RunConfig
from cotune.config.sections import (
    AvailabilitySection,
    DataSection,
    DevicesSection,
    ModelSection,
    ParadigmSection,
    PartitionSection,
    PeftSection,
    Section,
    TaskName,
    WarmupSection,
)

__all__ = [
    "CODEC_FORMS",
    "NODE_KINDS",
    "AvailabilitySection",
    "DPSection",
    "DataSection",
    "DevicesSection",
    "EngineSection",
    "EvalSection",
    "MixtureSection",
    "ModelSection",
    "OutputSection",
    "ParadigmSection",
    "PartitionSection",
    "PeftSection",
    "RaySection",
    "RunConfig",
    "Section",
    "TaskName",
    "TrainSection",
    "WarmupSection",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
    "parse_override",
    "read_yaml",
]
