"""docs/config.md, generated from the config models themselves: every field of every section
(and of every paradigm's ``paradigm.options``) with its type, default, allowed values and the
comment the code gives it. ``python -m cotune.config_reference > docs/config.md`` rewrites it; a
test keeps the file in step with the models. Torch-free (pydantic and the standard library).
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Configuration reference

Generated from the config models (`src/cotune/config/`, `src/cotune/paradigms/options/`)
by `python -m cotune.config_reference > docs/config.md`; `tests/test_config_reference.py` fails
when this page and the models disagree. A run's YAML has one block per section; `--set
section.field=value` sets any field from the command line. Unknown fields are errors that name
the field.
"""


def comments_of(cls: type) -> dict[str, str]:
    """Each annotated field's comment in ``cls``'s source: the comment lines right above it
    and the comment at the end of its statement, joined."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    trailing: dict[int, str] = {}  # line (1-based) → its end-of-line comment
    own_line: dict[int, str] = {}  # line → a comment that is the whole line
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            row = tok.start[0]
            if lines[row - 1][: tok.start[1]].strip():
                trailing[row] = text
            else:
                own_line[row] = text
    out: dict[str, str] = {}
    body = ast.parse(src).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in own_line:
            above.insert(0, own_line[row])
            row -= 1
        end = trailing.get(node.end_lineno or node.lineno)
        text = " ".join([*above, *([end] if end and end != "fmt: skip" else [])])
        out[node.target.id] = text.replace("|", "\\|")
    return out


def _type(ann: Any) -> tuple[str, list[Any] | None]:
    """A readable type, and the allowed values when the type lists them (a Literal)."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        kinds = sorted({type(a).__name__ for a in args})
        return " or ".join(kinds), list(args)
    if origin in (typing.Union, types.UnionType):
        parts, allowed = [], []
        for a in args:
            if a is type(None):
                continue
            name, values = _type(a)
            parts.append(name)
            allowed += values or []
        text = " or ".join(parts) + (" or null" if type(None) in args else "")
        return text, allowed or None
    if origin in (list, tuple, dict):
        inner = ", ".join(_type(a)[0] for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]", None
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section", None
    if ann is Any:
        return "any", None
    return getattr(ann, "__name__", str(ann)), None


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _bounds(field: Any) -> str:
    marks = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"),
             (annotated_types.Le, "le", "≤"), (annotated_types.Lt, "lt", "<"))  # fmt: skip
    out = []
    for m in field.metadata:
        for kind, attr, sign in marks:
            if isinstance(m, kind):
                out.append(f"{sign} {getattr(m, attr)}")
    return ", ".join(out)


def section_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, list[str]]]:
    """``(section name, table rows)`` for ``model`` and, after it, its nested sections."""
    notes = {}
    for klass in reversed(model.__mro__):
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            notes.update(comments_of(klass))
    rows, nested = [], []
    for name, field in model.model_fields.items():
        ann = field.annotation
        kind, allowed = _type(ann)
        sub = next((a for a in (ann, *get_args(ann)) if isinstance(a, type)
                    and issubclass(a, BaseModel)), None)  # fmt: skip
        if sub is not None:
            nested.append((sub, f"{prefix}.{name}"))
            kind = "section" if kind == "section" else f"section or null ({kind})"
        values = ", ".join(f"`{v}`" for v in allowed) if allowed else _bounds(field)
        rows.append(f"| `{name}` | {kind} | {_default(field)} | {values} | {notes.get(name, '')} |")
    out = [(prefix, rows)]
    for sub, name in nested:
        out += section_rows(sub, name)
    return out


def render() -> str:
    from cotune.config import RunConfig
    from cotune.paradigms.options import OPTIONS

    parts = [HEADER]
    head = ["| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, field in RunConfig.model_fields.items():
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            note = comments_of(RunConfig).get(name, "")
            parts.append(f"\n## `{name}`\n\n{_type(ann)[0]}, default {_default(field)}. {note}\n")
            continue
        for section, rows in section_rows(ann, name):
            parts.append(f"\n## `{section}`\n\n" + "\n".join([*head, *rows]) + "\n")
    for paradigm, model in OPTIONS.items():
        rows = [r for _, r in section_rows(model, "paradigm.options")][0]
        body = "\n".join([*head, *rows]) if rows else "No options."
        parts.append(f"\n## `paradigm.options` for `{paradigm}`\n\n{body}\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
