"""A deployed device's own inputs: its data file, labelled and tokenized as the server's run is
(``own_inputs``), and the run's chat template copied from the server (``with_chat_template``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cotune.errors import ProtocolError

log = logging.getLogger(__name__)


def with_chat_template(cfg: Any, welcome: dict[str, Any], workdir: Path) -> Any:
    """The run's config with its chat template file (``data.chat_template``, a path on the
    server's machine) replaced by a copy of the server's template in ``workdir``."""
    from cotune.data.chat import BUILTIN, FROM_TOKENIZER

    text = welcome.get("chat_template")
    if text is None or cfg.data.chat_template in (None, FROM_TOKENIZER, *BUILTIN):
        return cfg  # none, the model's own tokenizer's or cotune's: the device has the same
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "chat_template.jinja"
    path.write_text(text, encoding="utf-8")
    data = cfg.data.model_copy(update={"chat_template": str(path)})
    return cfg.model_copy(update={"data": data})


def own_inputs(node: str, welcome: dict[str, Any], cfg: Any, data_file: Path) -> Any:
    """This device's inputs from its own data file, labelled and tokenized as the server's."""
    from cotune.build import NodeInputs
    from cotune.data.loading import load_device_file
    from cotune.data.tokenizer import Tokenizer
    from cotune.runtime.ids import device_index

    index = device_index(node)
    if index is None or not 0 <= index < cfg.devices.count:
        raise ProtocolError(f"{node!r} is not one of this run's {cfg.devices.count} devices")
    data = load_device_file(str(data_file), cfg.data, cfg.model.task, welcome.get("labels"),
                            welcome.get("domains"))  # fmt: skip
    tokenizer = None
    if welcome.get("tokenizer"):
        from tokenizers import Tokenizer as BPE

        tokenizer = Tokenizer(bpe=BPE.from_str(welcome["tokenizer"]))
    log.info("%s: %d training examples from %s", node, len(data.train), data_file)
    return NodeInputs(data, tokenizer, index)


def check_base(welcome: dict[str, Any], digest: dict[str, str] | None) -> None:
    """ModelError unless this device's base (``digest``, ``models.digest``) is the server's
    (the welcome's ``base``): else it would train against another base without an error."""
    from cotune.errors import ModelError, ProtocolError
    from cotune.models.digest import digest_differences, library_versions

    theirs = welcome.get("base")
    if theirs is None or digest is None:  # a server from before the check: nothing to compare
        return
    if not isinstance(theirs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in theirs.items()
    ):
        raise ProtocolError("the server's welcome: 'base' is not a digest by tensor name")
    differ = digest_differences(theirs, digest)
    if not differ:
        return
    shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")

    def releases(v: Any) -> str:
        v = v if isinstance(v, dict) else {}
        return ", ".join(
            f"{k} {str(v.get(k, '?'))[:40]}" for k in ("cotune", "torch", "transformers")
        )

    raise ModelError(
        f"the base model here is not the server's: {len(differ)} of its {len(theirs)} tensors "
        f"and vocabulary differ ({shown}). Both sides must load the same checkpoint and "
        f"tokenizer for model.name_or_path "
        f"(a random: model, the same torch and transformers releases); server: "
        f"{releases(welcome.get('versions'))}; this device: {releases(library_versions())}"
    )
