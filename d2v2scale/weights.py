"""A model's weights wherever they are kept: a d2v2scale weights file (``convert``'s output) or a
training checkpoint directory of any layout. ``convert``, ``features`` and the probes read them
here, so no tool imports another tool.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, config_from_dict

FORMAT = "d2v2scale-weights-v1"


def _existing_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path} does not exist")
    if not p.is_file():
        raise ConfigError(f"{path} is not a file")
    with open(p, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(p) and head[:1] != b"\x80":
        raise ConfigError(f"{path} is not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    return p


def load_torch_file(path: str, trust: bool = False) -> Any:
    """``torch.load`` with one-line errors; pickled objects only with ``trust``."""
    p = _existing_file(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():
            raise ConfigError(f"{path} cannot be read as a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
        if not trust:
            raise ConfigError(f"{path} holds pickled Python objects (released fairseq files embed omegaconf configs); "
                              "rerun with --trust_checkpoint if you trust the file") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"{path} cannot be read as a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{path} needs the Python package '{e.name}' to be read (pip install {e.name})") from None
    except Exception as e:  # noqa: BLE001 - unpickling arbitrary objects fails in arbitrary ways
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def read_weights(path: str) -> tuple[Config, dict, dict | None]:
    """A d2v2scale weights file, or a training checkpoint directory (layout-free: any layout; native: tp=1, ZeRO 0–2)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path} does not exist")
    if p.is_file():
        blob = load_torch_file(path)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            kind = "a fairseq checkpoint (convert it first: python -m d2v2scale.convert from-fairseq)" \
                if isinstance(blob, dict) and ("model" in blob or any(str(k).startswith("blocks.") for k in blob)) \
                else "not a d2v2scale weights file"
            raise ConfigError(f"{path} is {kind}")
        return config_from_dict(blob["config"]), blob["student"], blob["teacher"]
    from .train import checkpoint
    from .train.shards import has_shards
    from .train.verify import CheckpointError, safe_load

    if not (p / checkpoint.RUN_FILE).is_file():
        raise ConfigError(f"{path} is a directory but not a training checkpoint (no {checkpoint.RUN_FILE}); "
                          "give RUN/checkpoints/<tag> or a weights file")
    try:
        found = checkpoint.damage(p)
        if found is not None:
            raise ConfigError(f"{path}: the checkpoint is damaged ({found})")
        info = checkpoint.read_run_info(p)
        cfg = config_from_dict(info["config"])
        if has_shards(p):
            return (cfg, *_from_shards(p, cfg))
        if info["layout"]["tp"] != 1 or info["layout"]["zero_stage"] == 3:
            raise ConfigError(f"{path}: a native checkpoint with layout {info['layout']}; export reads native ones at "
                              "tp=1 and ZeRO stage 0-2 (train.checkpoint_format=layout_free checkpoints export from "
                              "any layout)")
        student = safe_load(p / "mp_rank_00_model_states.pt")["module"]
        shards = [safe_load(p / checkpoint.rank_file(0, d))["teacher"] for d in range(info["layout"]["dp"])]
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return cfg, student, _assemble_teacher(shards, student)


def _from_shards(tag_dir: Path, cfg: Config) -> tuple[dict, dict]:
    """Full fp32 student and teacher weights from a layout-free checkpoint, whatever layout wrote it.
    Frozen weights (fixed positions) are not in checkpoints: they come from the model's own init."""
    from .model import Data2Vec2
    from .train.shards import ShardFormatError, ShardReader

    model = Data2Vec2(cfg.model_spec())
    reader = ShardReader(tag_dir)

    saved = reader.keys()

    def fill(state: dict, kind: str) -> dict:
        out = {}
        for name, value in state.items():
            key = f"{kind}/{name}"
            out[name] = reader.full(key).view_as(value).clone() if key in saved else value
        return out

    try:
        return fill(model.state_dict(), "model"), fill(model.teacher_copy().state_dict(), "teacher")
    except ShardFormatError as e:
        raise ConfigError(f"{tag_dir}: {e}") from None


def _assemble_teacher(shards: list[dict], student: dict) -> dict:
    """Concatenate every rank's fp32 master slices back into named tensors (shapes from the student)."""
    layout = shards[0]["layout"]
    out = {}
    for g, (names, offsets, _numel) in enumerate(layout):
        flat = torch.cat([s["masters"][g] for s in shards])
        for name, off in zip(names, offsets):
            if name in student:
                n = student[name].numel()
                out[name] = flat[off : off + n].view_as(student[name]).clone()
    for name, value in shards[0]["copied"].items():
        out[name] = value
    return out
