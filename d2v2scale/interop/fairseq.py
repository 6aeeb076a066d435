"""Key mapping between fairseq's ``Data2VecMultiModel`` state_dict and d2v2scale's.

Our module tree mirrors fairseq's, so the mapping is a table of renames: the modality encoder
lives under ``encoder.`` instead of ``modality_encoders.<MOD>.``, its decoder under ``decoder.``,
and the shared ``blocks.`` keep their names. Where fairseq wraps a layer in ``TransposeLast``
containers (the audio CNN's LayerNorm, the feature projection, the conv positional encoder) the
Sequential indices differ; those few patterns are listed per modality. fairseq nests the EMA
teacher's weights under the key ``_ema``; we return them separately.
"""
from __future__ import annotations

import re

import torch

# (fairseq regex, d2v2scale template) and the reverse, most specific first.
_COMMON = [
    (r"^modality_encoders\.{M}\.decoder\.(.*)$", r"decoder.\1"),
    (r"^blocks\.(.*)$", r"blocks.\1"),
]
_AUDIO = [
    (r"^modality_encoders\.AUDIO\.local_encoder\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$",
     r"encoder.local_encoder.conv_layers.\1.2.\2"),
    (r"^modality_encoders\.AUDIO\.project_features\.1\.(weight|bias)$", r"encoder.project_features.0.\1"),
    (r"^modality_encoders\.AUDIO\.project_features\.2\.(weight|bias)$", r"encoder.project_features.1.\1"),
    (r"^modality_encoders\.AUDIO\.relative_positional_encoder\.1\.(\d+)\.0\.(weight|bias)$",
     r"encoder.relative_positional_encoder.\1.0.\2"),
]
_REVERSE_AUDIO = [
    (r"^encoder\.local_encoder\.conv_layers\.(\d+)\.2\.(weight|bias)$",
     r"modality_encoders.AUDIO.local_encoder.conv_layers.\1.2.1.\2"),
    (r"^encoder\.project_features\.0\.(weight|bias)$", r"modality_encoders.AUDIO.project_features.1.\1"),
    (r"^encoder\.project_features\.1\.(weight|bias)$", r"modality_encoders.AUDIO.project_features.2.\1"),
    (r"^encoder\.relative_positional_encoder\.(\d+)\.0\.(weight|bias)$",
     r"modality_encoders.AUDIO.relative_positional_encoder.1.\1.0.\2"),
]
MODALITY_NAMES = {"image": "IMAGE", "audio": "AUDIO", "text": "TEXT"}


class KeyMappingError(KeyError):
    """A key that the mapping table does not cover, or a missing/extra key after mapping."""

    def __str__(self) -> str:
        return str(self.args[0])


def _tables(modality: str) -> tuple[list, list]:
    if modality not in MODALITY_NAMES:
        raise KeyMappingError(f"modality '{modality}' has no fairseq key mapping; supported: {', '.join(MODALITY_NAMES)}")
    name = MODALITY_NAMES[modality]
    forward = [(a.replace("{M}", name), b) for a, b in _COMMON]
    backward = [(r"^decoder\.(.*)$", rf"modality_encoders.{name}.decoder.\1"), (r"^blocks\.(.*)$", r"blocks.\1")]
    if modality == "audio":
        forward, backward = _AUDIO + forward, _REVERSE_AUDIO + backward
    forward.append((rf"^modality_encoders\.{name}\.(.*)$", r"encoder.\1"))
    backward.append((r"^encoder\.(.*)$", rf"modality_encoders.{name}.\1"))
    return forward, backward


def _rename(key: str, table: list, side: str) -> str:
    for pattern, template in table:
        if re.match(pattern, key):
            return re.sub(pattern, template, key)
    raise KeyMappingError(f"unknown {side} key '{key}'")


def detect_modality(state_dict: dict) -> str:
    """The modality of a fairseq Data2VecMultiModel state_dict, from its encoder keys."""
    found = {name for name, tag in MODALITY_NAMES.items()
             if any(k.startswith(f"modality_encoders.{tag}.") for k in state_dict)}
    if len(found) != 1:
        raise KeyMappingError(f"expected the keys of exactly one modality encoder, found {sorted(found) or 'none'}; "
                              f"supported: {', '.join(MODALITY_NAMES)}")
    return found.pop()


def from_fairseq(
    state_dict: dict[str, torch.Tensor], modality: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """fairseq state_dict → (student state_dict, teacher state_dict or None) in d2v2scale names."""
    table, _ = _tables(modality)
    student = {_rename(k, table, "fairseq"): v for k, v in state_dict.items() if k != "_ema"}
    ema = state_dict.get("_ema")
    teacher = {_rename(k, table, "fairseq"): v for k, v in ema.items()} if ema is not None else None
    return student, teacher


def to_fairseq(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None, modality: str
) -> dict[str, object]:
    """The reverse of :func:`from_fairseq`: fairseq names, teacher nested under ``_ema``."""
    _, table = _tables(modality)
    out: dict[str, object] = {_rename(k, table, "d2v2scale"): v for k, v in student.items()}
    if teacher is not None:
        out["_ema"] = {_rename(k, table, "d2v2scale"): v for k, v in teacher.items()}
    return out
