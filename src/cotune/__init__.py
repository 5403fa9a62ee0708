"""cotune: fine-tune LLMs across a cloud server and many heterogeneous devices.

Importing ``cotune`` is cheap: torch, transformers and peft are imported only by the
submodules that need them (models, peft, train, paradigms), never here.
"""

__version__ = "0.1.0"

from cotune.errors import (  # noqa: E402
    AdapterError,
    CheckpointError,
    ConfigError,
    CotuneError,
    DataError,
    ModelError,
    PeerUnavailable,
    ProtocolError,
    RunDirError,
)

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "CotuneError",
    "DataError",
    "ModelError",
    "PeerUnavailable",
    "ProtocolError",
    "RunDirError",
    "__version__",
]
