"""One small ``Tokenizer`` over either a Hugging Face tokenizer or a locally trained byte-level BPE.

The local BPE is for random-init models (no pretrained vocabulary): it is trained on the
training texts with the ``tokenizers`` library, ids 0 and 1 are ``<pad>`` and ``<eos>``, and
every encoded text ends with ``<eos>``. Training is deterministic for the same texts and size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _BPE
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from cotune.data.chat import ChatFormat
from cotune.errors import DataError

PAD, EOS = "<pad>", "<eos>"
_META = "cotune_tokenizer.json"


#: Texts tokenized per call (bounds the tokenizer's transient memory).
ENCODE_CHUNK = 4096


class Tokenizer:
    """``encode(texts, max_length) -> list[list[int]]``, ``pad_id``, ``vocab_size``, save/load."""

    def __init__(self, hf: Any | None = None, bpe: _BPE | None = None) -> None:
        if (hf is None) == (bpe is None):
            raise ValueError("give exactly one of hf= or bpe=")
        self.hf, self.bpe = hf, bpe
        # Prompted examples become conversations in this format (``data.chat_template``).
        self.chat: ChatFormat | None = None
        self._renderer: Any | None = hf
        if bpe is not None:
            self.pad_id = bpe.token_to_id(PAD)
            self.eos_id: int | None = bpe.token_to_id(EOS)
            self.vocab_size = bpe.get_vocab_size()
        else:
            self.eos_id = hf.eos_token_id
            # GPT-2/LLaMA tokenizers have no pad token; padding is masked, so eos serves.
            pad = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
            self.pad_id = int(pad) if pad is not None else 0
            self.vocab_size = len(hf)

    @property
    def kind(self) -> str:
        return "bpe" if self.bpe is not None else "hf"

    @property
    def renderer(self) -> Any:
        """What renders chat templates: the HF tokenizer, or the local BPE wrapped as one."""
        if self._renderer is None:
            from transformers import PreTrainedTokenizerFast

            self._renderer = PreTrainedTokenizerFast(
                tokenizer_object=self.bpe, pad_token=PAD, eos_token=EOS
            )
        return self._renderer

    def encode(
        self, texts: Sequence[str], max_length: int, special: bool = True
    ) -> list[list[int]]:
        """Token ids, at most ``max_length`` per text. ``special=False``: without the special
        tokens an HF tokenizer adds around a text (a rendered chat template writes its own);
        the local BPE ends every text with ``<eos>`` either way."""
        if max_length < 1:
            raise DataError(f"max_length must be >= 1, got {max_length}")
        texts = list(texts)
        # In chunks, ids only: a fast tokenizer's batch output (its Encoding objects, masks
        # and type ids as Python lists) is many times the ids, and a 250k-example dataset in
        # one call would hold all of it at once.
        out: list[list[int]] = []
        for at in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[at : at + ENCODE_CHUNK]
            if self.hf is not None:
                enc = self.hf(chunk, truncation=True, max_length=max_length,
                              add_special_tokens=special, return_attention_mask=False,
                              return_token_type_ids=False)  # fmt: skip
                out.extend(enc["input_ids"])
            else:
                assert self.bpe is not None
                encs = self.bpe.encode_batch(chunk, add_special_tokens=False)
                out.extend(e.ids[: max_length - 1] + [self.eos_id] for e in encs)  # type: ignore[list-item]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(list(ids), skip_special_tokens=True)
        assert self.bpe is not None
        return self.bpe.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.hf is not None:
            if self.chat is not None:  # saved where HF reads it: the run's tokenizer chats too
                self.hf.chat_template = self.chat.template
            self.hf.save_pretrained(str(d))
        else:
            assert self.bpe is not None
            self._save_bpe(d)
        meta: dict[str, Any] = {"kind": self.kind, "pad_id": self.pad_id}
        if self.chat is not None:
            meta["chat"] = {"template": self.chat.template, "system": self.chat.system}
        (d / _META).write_text(json.dumps(meta) + "\n")
        return d

    def _save_bpe(self, d: Path) -> None:
        """The local BPE as a directory ``transformers.AutoTokenizer`` loads too: a fast
        tokenizer whose special-token template appends ``<eos>`` as cotune's encoding does
        (cotune itself encodes without the template)."""
        assert self.bpe is not None
        out = _BPE.from_str(self.bpe.to_str())
        if self.eos_id is not None:
            out.post_processor = processors.TemplateProcessing(
                single=f"$A {EOS}", special_tokens=[(EOS, self.eos_id)]
            )
        out.save(str(d / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD,
                  "eos_token": EOS, "model_max_length": 1_000_000}  # fmt: skip
        if self.chat is not None:
            config["chat_template"] = self.chat.template
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        d = Path(directory)
        meta_path = d / _META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"kind": "hf"}
        if meta["kind"] == "bpe":
            out = cls(bpe=_BPE.from_file(str(d / "tokenizer.json")))
        else:
            try:
                from transformers import AutoTokenizer  # heavy: only for an HF tokenizer
            except ImportError as exc:  # pragma: no cover - transformers is a dependency
                raise DataError(f"loading {d} needs transformers: {exc}") from None
            try:
                out = cls(hf=AutoTokenizer.from_pretrained(str(d)))
            except (OSError, ValueError) as exc:
                raise DataError(f"{d}: not a saved tokenizer: {exc}") from None
        chat = meta.get("chat")
        if chat is not None:
            out.chat = ChatFormat(chat["template"], chat.get("system"))
        return out


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """A tokenizer saved by ``Tokenizer.save`` (or any HF tokenizer directory)."""
    return Tokenizer.load(directory)


def train_bpe(texts: Sequence[str], vocab_size: int) -> _BPE:
    """Train a byte-level BPE; ``<pad>`` = 0 and ``<eos>`` = 1."""
    if not any(t.strip() for t in texts):
        raise DataError("cannot train a BPE tokenizer: no non-empty training texts")
    tok = _BPE(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    return tok


def build_tokenizer(hf_tokenizer: Any | None, texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Wrap ``hf_tokenizer``, or with ``None`` train a local byte-level BPE on ``texts``."""
    if hf_tokenizer is not None:
        return Tokenizer(hf=hf_tokenizer)
    return Tokenizer(bpe=train_bpe(texts, vocab_size))
