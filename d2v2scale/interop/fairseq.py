"""Key mapping between fairseq's ``Data2VecMultiModel`` state_dict and d2v2scale's.

Our module tree mirrors fairseq's, so the mapping is a table of prefix renames: the modality
encoder lives under ``encoder.`` instead of ``modality_encoders.<MOD>.``, its decoder under
``decoder.``, and the shared ``blocks.`` keep their names. fairseq nests the EMA teacher's
weights under the key ``_ema``; we return them separately.
"""
from __future__ import annotations

import torch

# (fairseq prefix, d2v2scale prefix), most specific first.
PREFIXES = {
    "image": [
        ("modality_encoders.IMAGE.decoder.", "decoder."),
        ("modality_encoders.IMAGE.", "encoder."),
        ("blocks.", "blocks."),
    ],
}


class KeyMappingError(KeyError):
    """A key that the mapping table does not cover, or a missing/extra key after mapping."""

    def __str__(self) -> str:
        return str(self.args[0])


def _rename(key: str, table: list[tuple[str, str]], reverse: bool) -> str:
    for theirs, ours in table:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if key.startswith(src):
            return dst + key[len(src) :]
    side = "d2v2scale" if reverse else "fairseq"
    raise KeyMappingError(f"unknown {side} key '{key}'; known prefixes: {', '.join(s if not reverse else o for s, o in table)}")


def _table(modality: str) -> list[tuple[str, str]]:
    if modality not in PREFIXES:
        raise KeyMappingError(f"modality '{modality}' has no fairseq key mapping yet; supported: {', '.join(PREFIXES)}")
    return PREFIXES[modality]


def from_fairseq(
    state_dict: dict[str, torch.Tensor], modality: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """fairseq state_dict → (student state_dict, teacher state_dict or None) in d2v2scale names."""
    table = _table(modality)
    student = {_rename(k, table, False): v for k, v in state_dict.items() if k != "_ema"}
    ema = state_dict.get("_ema")
    teacher = {_rename(k, table, False): v for k, v in ema.items()} if ema is not None else None
    return student, teacher


def to_fairseq(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None, modality: str
) -> dict[str, object]:
    """The reverse of :func:`from_fairseq`: fairseq names, teacher nested under ``_ema``."""
    table = _table(modality)
    out: dict[str, object] = {_rename(k, table, True): v for k, v in student.items()}
    if teacher is not None:
        out["_ema"] = {_rename(k, table, True): v for k, v in teacher.items()}
    return out
