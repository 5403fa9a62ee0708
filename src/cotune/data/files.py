"""Readers that turn a source into raw ``(text, label string | None)`` records.

Sources: the shipped built-ins, user JSONL / CSV / TSV files (optionally gzipped), and Hugging
Face ``datasets`` via ``hf:<name>[:<config>]``. Every error names the file, the line and the
field, so a user can fix the data without reading our code.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from cotune.data.registry import DatasetInfo
from cotune.errors import DataError


class Record(NamedTuple):
    """A source's example: its text (with a prompt: the prompt then the response), its label as
    a string (None without labels) and its prompt (None: plain text)."""

    text: str
    label: str | None
    prompt: str | None = None


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind not in (".jsonl", ".csv", ".tsv"):
        raise DataError(
            f"{path}: unsupported data file type {kind or '(none)'!r}; use .jsonl, .csv or .tsv"
        )
    return kind


def _label_str(value: Any) -> str:
    # JSON numbers and booleans become strings so that ids are assigned the same way for all.
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _make_record(
    row: dict[str, Any], where: str, text_field: str, label_field: str | None,
    prompt_field: str | None = None,
) -> Record | None:  # fmt: skip
    fields = ", ".join(map(str, row)) or "(none)"
    if text_field not in row:
        raise DataError(
            f"{where}: no text field {text_field!r} (fields there: {fields}); set data.text_field"
        )
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {text_field!r} must be a string, got {type(text).__name__}"
        )
    prompt = None
    if prompt_field is not None:
        if prompt_field not in row:
            raise DataError(
                f"{where}: no prompt field {prompt_field!r} (fields there: {fields}); "
                "set data.prompt_field"
            )
        prompt = row[prompt_field]
        if not isinstance(prompt, str):
            raise DataError(
                f"{where}: field {prompt_field!r} must be a string, got {type(prompt).__name__}"
            )
    label = None
    if label_field is not None:
        if label_field not in row or row[label_field] is None or row[label_field] == "":
            raise DataError(
                f"{where}: no label field {label_field!r} (fields there: {fields}); set data.label_field"
            )
        label = _label_str(row[label_field])
    if not text.strip():
        return None  # a blank text (or response) carries nothing to learn
    return Record(text, label) if prompt is None else Record(prompt + text, label, prompt)


def _jsonl_rows(path: Path, fh: TextIO) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            # json's own words may end in "at" (it adds the position after them).
            why = exc.msg.removesuffix(" at")
            raise DataError(f"{where}: not valid JSON at column {exc.colno} ({why})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
        yield where, row


def _csv_rows(
    path: Path, fh: TextIO, delimiter: str, text_field: str, label_field: str | None,
    prompt_field: str | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
    reader = csv.DictReader(fh, delimiter=delimiter)
    header = reader.fieldnames
    if not header:
        raise DataError(f"{path}: empty file (no header line)")
    cols = ", ".join(header)
    # Check the header once, so a wrong column name is reported as such, not as line 2.
    if text_field not in header:
        raise DataError(
            f"{path}: no text column {text_field!r} in the header (columns: {cols}); set data.text_field"
        )
    if label_field is not None and label_field not in header:
        raise DataError(
            f"{path}: no label column {label_field!r} in the header (columns: {cols}); set data.label_field"
        )
    if prompt_field is not None and prompt_field not in header:
        raise DataError(
            f"{path}: no prompt column {prompt_field!r} in the header (columns: {cols}); "
            "set data.prompt_field"
        )
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise DataError(f"{where}: more values than the {len(header)} header columns")
        yield where, row


def _builtin_hint(name: str) -> str:
    """For a name that looks like a mistyped built-in dataset: the closest one."""
    import difflib

    from cotune.data.registry import list_datasets

    if any(c in name for c in "/\\."):
        return ""
    names = [d.name for d in list_datasets()]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    guess = f"did you mean the built-in dataset {close[0]!r}? " if close else ""
    return f" ({guess}`cotune datasets` lists the built-in ones: {', '.join(names)})"


def read_file(
    path: str | Path, text_field: str, label_field: str | None, prompt_field: str | None = None
) -> list[Record]:
    """Read a JSONL / CSV / TSV file; ``label_field=None`` reads texts only; with
    ``prompt_field`` each record is that prompt followed by its text (the response)."""
    return [record for _, record in read_located(path, text_field, label_field, prompt_field)]


def read_located(
    path: str | Path, text_field: str, label_field: str | None, prompt_field: str | None = None
) -> list[tuple[str, Record]]:
    """``read_file`` with each record's ``file:line`` (for errors found after reading)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a directory, not a data file (give a .jsonl, .csv or .tsv file)")
    if not p.is_file():
        raise DataError(f"data file not found: {p}{_builtin_hint(str(path))}")
    kind = _kind(p)
    try:
        with _open_text(p) as fh:
            if kind == ".jsonl":
                rows: Iterable[tuple[str, dict[str, Any]]] = _jsonl_rows(p, fh)
            else:
                delim = "," if kind == ".csv" else "\t"
                rows = _csv_rows(p, fh, delim, text_field, label_field, prompt_field)
            records = [
                (where, r)
                for where, row in rows
                if (r := _make_record(row, where, text_field, label_field, prompt_field))
            ]
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{p}: cannot read: {exc}") from None
    if not records:
        raise DataError(f"{p}: empty file (no records with text in field {text_field!r})")
    return records


def read_builtin(
    info: DatasetInfo, label_key: str | None, prompt: str | None = None
) -> list[Record]:
    """All records of a shipped dataset, labelled from ``label_key`` (None: texts only). With
    an instruction view's ``prompt`` template, each record is that prompt made from its text,
    answered by its label."""
    with gzip.open(info.path, "rt", encoding="utf-8") as fh:
        rows = [r for line in fh if "_meta" not in (r := json.loads(line))]
    if prompt is None:
        return [Record(r["text"], None if label_key is None else r[label_key]) for r in rows]
    assert label_key is not None  # an instruction view answers with its label
    out = []
    for r in rows:
        asked = prompt.format(text=r["text"])
        out.append(Record(f"{asked} {r[label_key]}", r[label_key], asked))
    return out


def _labelled(split: Any, label_field: str | None) -> bool:
    # GLUE-style test splits carry label -1 everywhere: unusable for evaluation.
    if label_field is None or len(split) == 0:
        return True
    value = split[0].get(label_field)
    return value is not None and not (isinstance(value, int) and value < 0)


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[1]:
        raise DataError(f"bad Hugging Face dataset {spec!r}: expected hf:<name>[:<config>]")
    return parts[1], (parts[2] or None) if len(parts) == 3 else None


def read_hf(
    spec: str, text_field: str, label_field: str | None, prompt_field: str | None = None
) -> tuple[list[Record], list[Record] | None]:
    """Train records and, when the dataset has one, test (or validation) records."""
    name, config = parse_hf_spec(spec)
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise DataError(
            f"data.dataset={spec!r} needs the Hugging Face `datasets` package: pip install datasets"
        ) from None
    try:
        dsd = datasets.load_dataset(name, config)
    except Exception as exc:  # the hub, the cache or the loading script: report, don't crash
        raise DataError(
            f"cannot load Hugging Face dataset {name!r} (config {config!r}): {exc}"
        ) from None
    if "train" not in dsd:
        raise DataError(
            f"Hugging Face dataset {name!r} has no 'train' split (splits: {', '.join(dsd)})"
        )
    test_split = next(
        (s for s in ("test", "validation") if s in dsd and _labelled(dsd[s], label_field)), None
    )

    def convert(split: str) -> list[Record]:
        ds = dsd[split]
        # ClassLabel columns hold ids; their names are the labels users know.
        feature = getattr(ds, "features", {}).get(label_field) if label_field else None
        names = getattr(feature, "names", None)
        out = []
        for i, row in enumerate(ds):
            if (
                label_field is not None
                and names is not None
                and isinstance(row.get(label_field), int)
                and row[label_field] >= 0
            ):
                row = {**row, label_field: names[row[label_field]]}
            where = f"hf:{name} split {split!r} row {i}"
            rec = _make_record(row, where, text_field, label_field, prompt_field)
            if rec is not None:
                out.append(rec)
        return out

    return convert("train"), convert(test_split) if test_split else None
