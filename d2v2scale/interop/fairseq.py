"""Key mapping between fairseq's ``Data2VecMultiModel`` state_dict and d2v2scale's.

Our module tree mirrors fairseq's, so the mapping is a table of renames: the modality encoder
lives under ``encoder.`` instead of ``modality_encoders.<MOD>.``, its decoder under ``decoder.``,
and the shared ``blocks.`` keep their names. Where fairseq wraps layers in ``TransposeLast``
containers the Sequential indices differ; those few patterns are each modality's own
(:attr:`FairseqLayout.key_renames`: the audio conv positional encoder is
``Sequential(TransposeLast(), *blocks, TransposeLast())``, so our block ``i`` is fairseq's ``i + 1``).

fairseq nests the EMA teacher's parameters under the key ``_ema``. Where they live follows the
model config: with ``ema_encoder_only`` (the text recipe) the teacher *is* ``model.blocks``, so
its keys are ``0.norm1.weight``; otherwise it is a whole model copy (``blocks.0.norm1.weight``,
modality encoder without the decoder, and without the local encoder unless ``ema_local_encoder``).
We hand the teacher back separately, always in our full names (``blocks.0.norm1.weight``).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from .. import modality_registry

if TYPE_CHECKING:
    from ..config import Config


class FairseqLayout:
    """How fairseq's ``Data2VecMultiModel`` holds one modality (a modality's ``fairseq`` attribute).

    ``tag``: its ``Modality`` name; ``key_renames``: (fairseq, ours) key templates beyond the common
    ones; ``defaults``: fairseq's ``modalities.<name>`` dataclass defaults; ``mapped`` / ``fixed`` /
    ``inert``: that section's fields in the three tables of :mod:`.fairseq_config`;
    ``base_preset``: what converted weights start from. The methods cover what tables cannot."""

    tag: str = ""
    base_preset: str = ""
    key_renames: tuple[tuple[str, str], ...] = ()
    defaults: dict[str, Any] = {}
    mapped: dict[str, str] = {}
    fixed: dict[str, tuple[Any, str]] = {}
    inert: frozenset[str] = frozenset()
    alibi: bool = False  # fairseq's use_alibi_encoder is honoured

    def values_in(self, section: dict, top: dict, where: str) -> dict[str, Any]:
        """Our values from the fairseq section beyond ``mapped`` (ConfigError on what we cannot honour)."""
        return {}

    def values_out(self, cfg: Config, section: dict) -> None:
        """Write what ``mapped`` cannot into the fairseq section."""

    def derive(self, student: dict) -> dict[str, Any]:
        """Our values that the student's tensor shapes determine."""
        return {}

    def without_config(self, student: dict, base: Config, given: set[str], from_preset: bool) -> dict[str, Any]:
        """For a checkpoint without ``cfg.model``: values the shapes cannot give, from ``base`` (the
        config of ``--preset``, or of :attr:`base_preset` when ``from_preset`` is false) where that
        is safe; ``given``: the keys the user passed (ConfigError names what is still missing)."""
        return {}

    def outside_config(self, student: dict) -> dict[str, Any]:
        """Values fairseq keeps outside ``cfg.model`` (the text vocabulary is the task's)."""
        return {}


def _layouts() -> dict[str, FairseqLayout]:
    """Our modality name → how fairseq holds it, for every registered modality fairseq has."""
    found = {name: modality_registry.get(name).fairseq for name in modality_registry.names()}
    return {name: own for name, own in found.items() if own is not None}


def fairseq_tags() -> dict[str, str]:
    """Our modality name → fairseq's tag, for every registered modality fairseq has."""
    return {name: own.tag for name, own in _layouts().items()}


def layout(modality: str) -> FairseqLayout:
    own = _layouts().get(modality)
    if own is None:
        raise KeyMappingError(f"modality '{modality}' has no fairseq key mapping; supported: {', '.join(_layouts())}")
    return own


# (fairseq key, d2v2scale key) templates, most specific first; one table serves both directions.
# {i}: a layer index, {i+1}: the same index plus one, {p}: weight|bias, {rest}: anything;
# {M} is the modality's fairseq name.
_COMMON = [
    ("modality_encoders.{M}.decoder.{rest}", "decoder.{rest}"),
    ("blocks.{rest}", "blocks.{rest}"),
    ("modality_encoders.{M}.{rest}", "encoder.{rest}"),
]
# The teacher when it is ``model.blocks`` alone (``ema_encoder_only``).
_BLOCKS_ONLY = [("{i}.{rest}", "blocks.{i}.{rest}")]
_PLACEHOLDERS = {"i": ("i", r"\d+"), "i+1": ("next", r"\d+"), "p": ("p", "weight|bias"), "rest": ("rest", ".+")}


class KeyMappingError(KeyError):
    """A key that the mapping table does not cover, or a missing/extra key after mapping."""

    def __str__(self) -> str:
        return str(self.args[0])


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{([\w+]+)\}", template)  # literal, name, literal, name, ...
    regex = "".join(re.escape(part) if k % 2 == 0 else "(?P<{}>{})".format(*_PLACEHOLDERS[part])
                    for k, part in enumerate(parts))
    return re.compile(f"^{regex}$")


def _fill(template: str, groups: dict[str, str]) -> str:
    if "next" in groups:
        groups = {**groups, "i": str(int(groups["next"]) - 1)}
    elif "i" in groups:
        groups = {**groups, "next": str(int(groups["i"]) + 1)}
    return re.sub(r"\{([\w+]+)\}", lambda m: groups[_PLACEHOLDERS[m.group(1)][0]], template)


def _table(pairs: list[tuple[str, str]], to_ours: bool) -> list[tuple[re.Pattern, str]]:
    return [(_compile(a), b) if to_ours else (_compile(b), a) for a, b in pairs]


def _pairs(modality: str, blocks_only: bool = False) -> list[tuple[str, str]]:
    own = layout(modality)
    if blocks_only:
        return _BLOCKS_ONLY
    return [(a.replace("{M}", own.tag), b) for a, b in [*own.key_renames, *_COMMON]]


def _rename_all(state: dict, table: list, side: str, where: str) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, template in table:
            match = pattern.match(key)
            if match:
                out[_fill(template, match.groupdict())] = value
                break
        else:
            raise KeyMappingError(f"unknown {side} key '{key}'{where}")
    return out


def detect_modality(state_dict: dict) -> str:
    """The modality of a fairseq Data2VecMultiModel state_dict, from its encoder keys."""
    tags = fairseq_tags()
    found = {name for name, tag in tags.items() if any(k.startswith(f"modality_encoders.{tag}.") for k in state_dict)}
    if len(found) != 1:
        raise KeyMappingError(f"expected the keys of exactly one modality encoder (modality_encoders."
                              f"{'|'.join(tags.values())}.*), "
                              f"found {sorted(found) or 'none'}; is this a data2vec 2.0 (Data2VecMultiModel) checkpoint?")
    return found.pop()


def ema_is_blocks_only(ema: dict) -> bool:
    """Whether a fairseq ``_ema`` dict has the ``ema_encoder_only`` layout (keys ``0.norm1.weight``)."""
    return bool(ema) and all(k.split(".", 1)[0].isdigit() for k in ema)


def from_fairseq(
    state_dict: dict[str, Any], modality: str, ema_encoder_only: bool | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """fairseq state_dict → (student, teacher or None) in d2v2scale names.

    ``ema_encoder_only`` is the checkpoint's config value; None reads the layout from the keys."""
    student = _rename_all({k: v for k, v in state_dict.items() if k != "_ema"},
                          _table(_pairs(modality), to_ours=True), "fairseq", "")
    ema = state_dict.get("_ema")
    if ema is None:
        return student, None
    blocks_only = ema_is_blocks_only(ema)
    if ema_encoder_only is not None and ema and blocks_only != ema_encoder_only:
        layout = "model.blocks keys ('0.norm1.weight')" if blocks_only else "whole-model keys ('blocks.0.norm1.weight')"
        raise KeyMappingError(f"_ema holds {layout} but the checkpoint's config says ema_encoder_only={ema_encoder_only}")
    where = " in _ema" + (" (ema_encoder_only layout: the teacher is model.blocks)" if blocks_only else "")
    teacher = _rename_all(ema, _table(_pairs(modality, blocks_only), to_ours=True), "fairseq", where)
    return student, teacher


def to_fairseq(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None, modality: str,
    ema_encoder_only: bool = False,
) -> dict[str, object]:
    """The reverse of :func:`from_fairseq`: fairseq names, teacher nested under ``_ema`` in the
    layout fairseq's ``EMAModule.restore`` expects for this ``ema_encoder_only``."""
    out: dict[str, object] = _rename_all(student, _table(_pairs(modality), to_ours=False), "d2v2scale", "")
    if teacher is not None:
        table = _table(_pairs(modality, ema_encoder_only), to_ours=False)
        out["_ema"] = _rename_all(teacher, table, "d2v2scale", " in the teacher")
    return out
