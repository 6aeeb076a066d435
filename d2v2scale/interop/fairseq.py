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

# (fairseq key, d2v2scale key) templates, most specific first; one table serves both directions.
# {i}: a layer index, {p}: weight|bias, {rest}: anything; {M} is the modality's fairseq name.
_AUDIO = [
    ("modality_encoders.AUDIO.local_encoder.conv_layers.{i}.2.1.{p}", "encoder.local_encoder.conv_layers.{i}.2.{p}"),
    ("modality_encoders.AUDIO.project_features.1.{p}", "encoder.project_features.0.{p}"),
    ("modality_encoders.AUDIO.project_features.2.{p}", "encoder.project_features.1.{p}"),
    ("modality_encoders.AUDIO.relative_positional_encoder.1.{i}.0.{p}", "encoder.relative_positional_encoder.{i}.0.{p}"),
]
_COMMON = [
    ("modality_encoders.{M}.decoder.{rest}", "decoder.{rest}"),
    ("blocks.{rest}", "blocks.{rest}"),
    ("modality_encoders.{M}.{rest}", "encoder.{rest}"),
]
_PLACEHOLDERS = {"i": r"\d+", "p": "weight|bias", "rest": ".*"}
MODALITY_NAMES = {"image": "IMAGE", "audio": "AUDIO", "text": "TEXT"}


class KeyMappingError(KeyError):
    """A key that the mapping table does not cover, or a missing/extra key after mapping."""

    def __str__(self) -> str:
        return str(self.args[0])


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    regex = "".join(re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})"
                    for k, part in enumerate(parts))
    return re.compile(f"^{regex}$")


def _tables(modality: str) -> tuple[list, list]:
    """(fairseq → d2v2scale, d2v2scale → fairseq) lists of (compiled pattern, output template)."""
    if modality not in MODALITY_NAMES:
        raise KeyMappingError(f"modality '{modality}' has no fairseq key mapping; supported: {', '.join(MODALITY_NAMES)}")
    name = MODALITY_NAMES[modality]
    pairs = (_AUDIO if modality == "audio" else []) + [(a.replace("{M}", name), b) for a, b in _COMMON]
    return [(_compile(a), b) for a, b in pairs], [(_compile(b), a) for a, b in pairs]


def _rename(key: str, table: list, side: str) -> str:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
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
