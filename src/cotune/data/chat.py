"""Instruction data in a model's chat format (``data.chat_template``).

An instruct model was tuned on conversations written in its own format (Qwen's
``<|im_start|>user ... <|im_end|>``, LLaMA-3's headers): fine-tuning it on ``prompt`` +
``response`` joined as plain text teaches it a format it will never see when served. With a chat
template each prompted example becomes a conversation (an optional system message, the prompt as
the user's turn, the response as the assistant's), rendered by the template as the tokenizer's
own ``apply_chat_template`` renders it; the loss still covers what follows the prompt, i.e. the
assistant's turn and the template's end-of-turn tokens (the model learns to stop).

The template is the tokenizer's own (``"tokenizer"``: instruct checkpoints ship one), one that
ships with cotune by name (``"chatml"``: ``templates/chatml.jinja``, for a base model whose
tokenizer has none), or a Jinja file in Hugging Face's format (``messages``,
``add_generation_prompt``). Rendering goes through transformers' ``apply_chat_template``, also
for cotune's locally trained BPE (wrapped as a fast tokenizer), so a template means the same
text everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.errors import DataError

#: ``data.chat_template``'s value that asks for the tokenizer's own template.
FROM_TOKENIZER = "tokenizer"
#: Templates that ship with cotune, by the name ``data.chat_template`` gives them.
BUILTIN = {"chatml": Path(__file__).parent / "templates" / "chatml.jinja"}


@dataclass(frozen=True)
class ChatFormat:
    """A chat template (Jinja source) and the system message put before every prompt."""

    template: str
    system: str | None = None

    def messages(self, prompt: str, response: str | None = None) -> list[dict[str, str]]:
        # Templates write their own separators around each turn: a prompt's trailing
        # "Answer:" newline or a response's leading space is the plain format's, not theirs.
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        out.append({"role": "user", "content": prompt.strip()})
        if response is not None:
            out.append({"role": "assistant", "content": response.strip()})
        return out

    def render(self, renderer: Any, prompt: str, response: str | None = None) -> str:
        """The conversation as text: with ``response=None`` the prompt's turn and the opening
        of the assistant's (what a served model is given)."""
        try:
            return renderer.apply_chat_template(
                self.messages(prompt, response),
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=response is None,
            )
        except Exception as exc:  # a template's own error (jinja raise_exception, bad syntax)
            raise DataError(f"data.chat_template: the template failed to render: {exc}") from None


def resolve_chat(
    template: str | None, system: str | None, tokenizer: Any, model: str
) -> ChatFormat | None:
    """``data.chat_template`` / ``data.system_prompt`` as a ``ChatFormat`` (None: plain joins).
    ``tokenizer`` is cotune's ``Tokenizer``; ``model`` names where its template would come from."""
    if template is None:
        return None
    if template == FROM_TOKENIZER:
        own = getattr(tokenizer.hf, "chat_template", None) if tokenizer.hf is not None else None
        if not own:
            where = "cotune's locally trained BPE" if tokenizer.hf is None else "its tokenizer"
            raise DataError(
                f"data.chat_template: 'tokenizer' asks for the template of {model!r}, but "
                f"{where} has none; name one of cotune's ({', '.join(BUILTIN)}) or a template file"
            )
        if not isinstance(own, str):  # several named templates: the default one
            own = own.get("default") if isinstance(own, dict) else None
            if not own:
                raise DataError(
                    f"data.chat_template: {model!r}'s tokenizer has named templates but no "
                    "'default' one; give a template file"
                )
        return ChatFormat(own, system)
    path = BUILTIN[template] if template in BUILTIN else Path(template).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"data.chat_template: cannot read template file {str(path)!r}: {exc}"
        ) from None
    if not text.strip():
        raise DataError(f"data.chat_template: template file {str(path)!r} is empty")
    return ChatFormat(text, system)
