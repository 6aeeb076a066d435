"""The DeepSpeed JSON as a file: found (a path, or a shipped one by name) and read as one object.

A mistake here (no such file, not JSON, not an object) is one line naming the path and, for a
shipped name, the files that ship.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import ConfigError

AUTO = "auto"  # a value d2v2scale fills in (batch keys, the schedule's length); DeepSpeed itself rejects it


def find_ds_config(path: str) -> Path:
    """``path`` itself, or one of the package's own JSONs named as ``ds_configs/NAME.json`` or
    ``NAME.json`` (so the tools work from any folder, with the package installed)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = resources.files("d2v2scale") / "ds_configs" / p.name
    if p.parent in (Path("."), Path("ds_configs")) and shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"--ds_config '{path}' does not exist; give a DeepSpeed JSON such as ds_configs/cpu_tiny.json "
                      f"(shipped: {', '.join(sorted(f.name for f in (resources.files('d2v2scale') / 'ds_configs').iterdir()))})")


def load_ds_config(path: str) -> dict:
    p = find_ds_config(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config '{path}' is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--ds_config '{path}' must be a JSON object")
    return data


def flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: the dotted keys of a nested dict (JSON or config)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
