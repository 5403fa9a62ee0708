"""``load_task_data``: from a ``DataSection`` to label ids and a seeded train/test split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cotune.config import DataSection
from cotune.data.examples import Example, TaskData
from cotune.data.files import Record, read_builtin, read_file, read_hf, read_located
from cotune.data.registry import get_dataset_info, is_builtin
from cotune.errors import DataError

TASKS = ("classification", "causal_lm")


def label_order(labels: Sequence[str]) -> list[str]:
    """Sorted label names; all-integer labels sort numerically ("2" before "10")."""
    uniq = set(labels)
    if all(s.lstrip("-").isdigit() for s in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def _read(cfg: DataSection, task: str) -> tuple[str, list[Record], list[Record] | None]:
    """(name, train records, test records or None) with labels read only for classification."""
    want_labels = task == "classification" or bool(cfg.labels)
    src = cfg.dataset
    prompts = cfg.prompt_field
    if is_builtin(src):
        if prompts is not None:
            raise DataError(
                f"data.prompt_field: the built-in dataset {src!r} has no prompts; give a "
                "JSONL / CSV / TSV file or an hf: dataset with a prompt column"
            )
        info = get_dataset_info(src)
        view = info.view(cfg.view or info.default_view[task])
        # Causal LM on a labelled view: the label becomes the example's domain.
        want_labels = want_labels or view.label_key is not None
        if task == "classification" and view.label_key is None:
            raise DataError(
                f"dataset {src!r} view {view.name!r} has no labels; use it with model.task=causal_lm"
            )
        if view.label_key is None and cfg.labels:
            raise DataError(
                f"data.labels is set but dataset {src!r} view {view.name!r} has no labels"
            )
        records = read_builtin(info, view.label_key if want_labels else None, view.prompt)
        # A user's test file is a user file: it is read with data.text_field / data.label_field.
        test_label = cfg.label_field if want_labels else None
        test = read_file(cfg.test_file, cfg.text_field, test_label) if cfg.test_file else None
        return f"{src}/{view.name}", records, test
    if cfg.view is not None:
        raise DataError(f"data.view={cfg.view!r} only applies to built-in datasets, not {src!r}")
    label_field = cfg.label_field if want_labels else None
    if src.startswith("hf:"):
        train, test = read_hf(src, cfg.text_field, label_field, prompts)
    else:
        train, test = read_file(src, cfg.text_field, label_field, prompts), None
    if cfg.test_file:
        test = read_file(cfg.test_file, cfg.text_field, label_field, prompts)
    return src, train, test


def _filter(records: list[Record], keep: set[str], where: str) -> list[Record]:
    out = [r for r in records if r[1] in keep]
    if not out:
        raise DataError(f"data.labels={sorted(keep)} keeps no examples of {where}")
    return out


def _strata(labels: Sequence[int | None]) -> dict[int | None, list[int]]:
    groups: dict[int | None, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    return groups


def stratified_order(labels: Sequence[int | None], rng: np.random.Generator) -> list[int]:
    """A seeded order of indices whose every prefix keeps about the overall label mix.

    Each label's members are shuffled and spread evenly over [0, 1); sorting by that position
    interleaves the labels proportionally, so "take the first k" is a stratified subsample.
    """
    keys = np.empty(len(labels))
    for members in _strata(labels).values():
        perm = rng.permutation(len(members))
        offset = rng.random()
        for rank, j in enumerate(perm):
            keys[members[j]] = (rank + offset) / len(members)
    return [int(i) for i in np.argsort(keys, kind="stable")]


def _split(
    examples: list[Example], fraction: float, rng: np.random.Generator
) -> tuple[list[Example], list[Example]]:
    if len(examples) < 2:
        raise DataError(f"only {len(examples)} example(s): too few to split into train and test")
    test_idx: set[int] = set()
    for members in _strata([e.group for e in examples]).values():
        shuffled = rng.permutation(members)
        test_idx.update(int(i) for i in shuffled[: int(round(fraction * len(members)))])
    if not test_idx:  # tiny data: take one example rather than an empty test set
        test_idx.add(int(rng.integers(len(examples))))
    if len(test_idx) == len(examples):
        test_idx.pop()
    train = [e for i, e in enumerate(examples) if i not in test_idx]
    test = [e for i, e in enumerate(examples) if i in test_idx]
    return train, test


def load_task_data(cfg: DataSection, task: str, seed: int) -> TaskData:
    """Load ``cfg.dataset`` for ``task`` and split it deterministically under ``seed``.

    Classification labels become ids in ``label_order``; for causal LM a labelled source's labels
    become *domain* ids (``Example.domain``, ``TaskData.domain_names``: the novel, the category),
    which splits, subsamples and partitions stratify by, and MoDULA's domain stage routes by.
    ``max_examples`` caps the training set with a stratified, seeded subsample; the test set is
    ``test_file`` when given (or the dataset's own test split for ``hf:``), else a stratified
    ``test_fraction`` of the data.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    name, train_recs, test_recs = _read(cfg, task)
    if cfg.labels:
        keep = set(cfg.labels)
        seen = {r[1] for r in train_recs}
        missing = sorted(keep - seen)
        if missing:
            raise DataError(
                f"data.labels {missing} do not occur in {name} (labels there: {', '.join(label_order([s for s in seen if s is not None]))})"
            )
        train_recs = _filter(train_recs, keep, name)
        if test_recs is not None:
            test_recs = _filter(test_recs, keep, f"the test file of {name}")
    label_names: list[str] | None = None
    domain_names: list[str] | None = None
    ids: dict[str, int] = {}
    labelled = all(r[1] is not None for r in train_recs)
    if task == "classification" or labelled:
        names = label_order([r[1] for r in train_recs])  # type: ignore[misc]
        ids = {s: i for i, s in enumerate(names)}
        unknown = sorted({r[1] for r in test_recs or []} - set(ids) - {None})  # type: ignore[type-var]
        if unknown:
            raise DataError(f"test labels {unknown} never occur in the training data of {name}")
        if task == "classification":
            label_names = names
        else:  # causal LM: labels name each example's domain (novel, category)
            domain_names = names

    def to_examples(recs: list[Record]) -> list[Example]:
        if label_names is not None:
            return [Example(t, ids[y]) for t, y, _ in recs]  # type: ignore[index]
        if domain_names is not None:
            return [Example(t, None, ids.get(y), p) for t, y, p in recs]  # type: ignore[arg-type]
        return [Example(t, prompt=p) for t, _, p in recs]

    rng = np.random.default_rng([seed, 0x5EED])
    train = to_examples(train_recs)
    if test_recs is None:
        train, test = _split(train, cfg.test_fraction, rng)
    else:
        test = to_examples(test_recs)
    if cfg.max_examples is not None and cfg.max_examples < len(train):
        keep_idx = sorted(stratified_order([e.group for e in train], rng)[: cfg.max_examples])
        train = [train[i] for i in keep_idx]
    # Files are often sorted by label: put the test set in a stratified order so any prefix
    # (``eval.max_examples``) keeps the label mix instead of holding one class.
    test = [test[i] for i in stratified_order([e.group for e in test], rng)]
    return TaskData(name, train, test, label_names, domain_names)


def load_device_file(
    path: str, cfg: DataSection, task: str, label_names: list[str] | None,
    domain_names: list[str] | None,
) -> TaskData:  # fmt: skip
    """A deployed device's own training data (``cotune device --data FILE``), read with
    ``data.text_field`` / ``data.label_field`` and labelled with the *run's* ids (the names the
    server sent), so the device's label 3 is the server's label 3. Every record trains: the
    server evaluates on its own test set."""
    names = label_names if task == "classification" else domain_names
    if task == "classification" and not names:
        raise DataError("the server sent no label names for a classification run")
    located = read_located(
        path, cfg.text_field, cfg.label_field if names else None, cfg.prompt_field
    )
    if cfg.labels:
        keep = set(cfg.labels)
        located = [(w, r) for w, r in located if r[1] in keep]
        if not located:
            raise DataError(f"{path}: no records with the run's data.labels {sorted(keep)}")
    ids = {name: i for i, name in enumerate(names or [])}
    train: list[Example] = []
    for where, (text, label, prompt) in located:
        if names is None:
            train.append(Example(text, prompt=prompt))
            continue
        if label not in ids:
            field = f"field {cfg.label_field!r}"
            raise DataError(
                f"{where}: label {label!r} ({field}) is not one of this run's labels "
                f"({', '.join(names[:20])})"
            )
        group = ids[label]  # type: ignore[index]
        train.append(
            Example(text, group) if task == "classification" else Example(text, None, group, prompt)
        )
    return TaskData(str(path), train, [], label_names, domain_names)
