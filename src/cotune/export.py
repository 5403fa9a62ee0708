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


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        if not overwrite:
            raise RunDirError(f"{out} already exists; pass --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()


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
    _prepare_out(out, overwrite)
    if not merge:
        shutil.copytree(src, out)
        return out
    return _export_merged(run_dir, src, out)


def _export_merged(run_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Rebuild the base (seeded, so random:* bases come back identical), merge, save HF weights."""
    from cotune.config import load_config
    from cotune.data import load_tokenizer
    from cotune.models import load_model
    from cotune.peft import load_adapter

    cfg = load_config(run_dir / "config.yaml")
    labels_file = run_dir / "labels.json"
    num_labels = len(json.loads(labels_file.read_text())) if labels_file.is_file() else None
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    loaded = load_model(
        cfg.model, num_labels=num_labels, vocab_size=tokenizer.vocab_size, seed=cfg.seed
    )
    adapters = load_adapter(loaded.model, adapter_dir)
    adapters.merge_and_unload()
    loaded.model.save_pretrained(out)
    tokenizer.save(out)
    return out
