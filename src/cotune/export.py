"""`cotune export`: a run's adapter as a PEFT directory, or merged into full model weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cotune.errors import RunDirError


def adapter_dir_of(run_dir: Path, role: str | None) -> Path:
    base = run_dir / "adapter"
    if not base.is_dir():
        raise RunDirError(
            f"{run_dir} has no adapter/ (was output.save_adapter false, or did the run not finish?)"
        )
    if (base / "adapter_config.json").is_file():
        if role is not None:
            raise RunDirError(f"{run_dir} has a single adapter; drop --role {role}")
        return base
    roles = sorted(p.name for p in base.iterdir() if (p / "adapter_config.json").is_file())
    if role is None:
        raise RunDirError(
            f"{run_dir} has one adapter per role; pick one with --role (one of: {', '.join(roles)})"
        )
    if role not in roles:
        raise RunDirError(f"--role {role}: no such adapter in {base} (have: {', '.join(roles)})")
    return base / role


EXPORT_MARKER = ".cotune-export"


def _is_previous_export(out: Path) -> bool:
    return out.is_dir() and (out / EXPORT_MARKER).is_file()


def _check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse any OUT whose replacement could lose something that is not a previous export."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run.is_relative_to(target):
        raise RunDirError(
            f"{out} is the run directory {run_dir} or contains it; export somewhere else"
        )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not overwrite:
        raise RunDirError(f"{out} already exists; pass --overwrite to replace a previous export")
    if not _is_previous_export(out):
        kind = "a file" if not out.is_dir() else "a directory that is not a cotune export"
        raise RunDirError(
            f"--overwrite: {out} is {kind} (no {EXPORT_MARKER}); refusing to delete it. "
            "Pick a new output path or remove it yourself"
        )


def _install(tmp: Path, out: Path) -> None:
    """Swap the finished export in: the previous one goes only once the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export_run(
    run_dir: Path,
    out: Path,
    *,
    merge: bool = False,
    role: str | None = None,
    overwrite: bool = False,
) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a cotune run directory (no config.yaml)")
    src = adapter_dir_of(run_dir, role)
    _check_out(run_dir, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if merge:
            _export_merged(run_dir, src, tmp)
        else:
            shutil.copytree(src, tmp)
        marker = {"run": str(run_dir.resolve()), "role": role, "merged": merge}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        if out.exists() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_run_model(run_dir: Path, adapter_dir: Path):
    """The run's base (seeded, so random:* bases come back identical) with ``adapter_dir``
    merged in, eval mode: ``(config, LoadedModel, Tokenizer, label names or None)``."""
    from cotune.config import load_config
    from cotune.data import load_tokenizer
    from cotune.models import load_model
    from cotune.peft import load_adapter

    cfg = load_config(run_dir / "config.yaml")
    labels_file = run_dir / "labels.json"
    names = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    num_labels = len(names) if names else None
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    loaded = load_model(
        cfg.model, num_labels=num_labels, vocab_size=tokenizer.vocab_size, seed=cfg.seed
    )
    adapters = load_adapter(loaded.model, adapter_dir)
    adapters.merge_and_unload()
    loaded.model.eval()
    return cfg, loaded, tokenizer, names


def _export_merged(run_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Merge the run's adapter into its base and save HF weights and the tokenizer."""
    cfg, loaded, tokenizer, names = load_run_model(run_dir, adapter_dir)
    if names and cfg.model.task == "classification":  # pipelines say the labels, not LABEL_0
        loaded.model.config.id2label = dict(enumerate(names))
        loaded.model.config.label2id = {n: i for i, n in enumerate(names)}
    loaded.model.save_pretrained(out)
    tokenizer.save(out)
    return out
