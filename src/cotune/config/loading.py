"""Configs from YAML files and ``--set`` overrides, and errors that name the dotted field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cotune.config.run_config import RunConfig
from cotune.errors import ConfigError


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")  # pydantic's word for a check's ValueError
        if not loc:  # a check across sections: its message names the field(s) itself
            head, sep, rest = msg.partition(": ")
            if sep and all(part.isidentifier() for part in head.split(".")):
                loc, msg = head, rest
            else:
                lines.append(f"  {msg}")
                continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _section_for(e["loc"][:-1])
            if parent is not None:
                msg += f" (allowed: {', '.join(sorted(parent.model_fields))})"
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected")
            msg = f"{e.get('input')!r} is not allowed (allowed: {allowed})"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = RunConfig
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so ``3``, ``true``, ``[q, v]`` work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: the key {key!r} is not a dotted field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml_file(path: str | Path, what: str) -> Any:
    """A YAML (or JSON) file's contents; ``ConfigError`` naming ``what`` (the config file, a
    device profile file, ``engine.tokens_file``) and the file, with the line of a syntax
    error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {p}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what}: {p} is not UTF-8 text ({err.reason})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(
            f"{where}: {what} is not valid YAML: {getattr(exc, 'problem', None) or exc}"
        ) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    data = load_yaml_file(p, "config file")
    if data is None:
        raise ConfigError(
            f"{p}: the config file is empty; give at least one section (e.g. `paradigm: "
            "{name: central}`), or copy one from configs/"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    from cotune.paradigms.options import check_paradigm_options  # pydantic only, no torch

    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    opts = check_paradigm_options(cfg, source)
    if opts.profile_fields():
        from cotune.sim.profiles import all_profiles  # torch-free, like this module

        known = all_profiles(cfg.devices.profile_file)
        for field, name in opts.profile_fields().items():
            if name not in known:
                raise ConfigError(
                    f"invalid config ({source}):\n  paradigm.options.{field}: unknown device "
                    f"profile {name!r} (known: {', '.join(known)})"
                )
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data = read_yaml(path) if path is not None else {}
    if path is not None and "name" not in data:
        data["name"] = Path(path).stem
    data = apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " with --set " + " ".join(overrides)
    return config_from_dict(data, source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
