"""What a modality is, and the registry of them.

A modality (``model.modality``) brings everything the core must not branch on: its own config
keys and checks, its encoder and decoder, its default mask, its data kinds, how its micro-batch is
counted, its positions and local-encoder cost for the planner, its feature-tool reader and its
fairseq layout. The core looks it up here by name and calls it; the shipped ones live in
:mod:`d2v2scale.modalities` (one module each) and register when the package is imported, as
torchtitan's models register their train specs. A new one is a subclass of :class:`Modality`
passed to :func:`register` - from any module, a test file included.

This module imports only :mod:`d2v2scale.errors`, so every room may read it.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class DataKind:
    """One ``data.kind`` a modality reads. ``build(cfg, micro_batch, device, verbose, index)`` returns
    the batch source; ``suffixes``: the files a folder is indexed for once per job (empty: no index);
    ``check(cfg)``: the cheap pre-launch check of an unindexed ``data.path`` (raises ``DataError``)."""

    name: str
    build: Callable[..., Any]
    needs_path: bool = True
    suffixes: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class FeatureItem:
    """One input of the feature tool: ``length`` sorts items into batches, ``load()`` reads it."""

    name: str
    length: int
    load: Callable[[], Any]


class Modality:
    """A modality's hooks; the defaults describe a 1-D sequence model with a free local encoder.

    ``model_keys`` / ``data_keys``: dataclasses of the keys only this modality reads; they sit flat
    in their section (``model.img_size``), so presets, overrides and config.yaml look as they
    always did. ``fairseq``: the layout of fairseq's ``Data2VecMultiModel`` for it, or None."""

    name: str = ""
    model_keys: type | None = None
    data_keys: type | None = None
    data_kinds: tuple[DataKind, ...] = ()
    mask_kinds: tuple[str, ...] = ("block1d", "random")  # the first is masking.kind=auto's choice
    decoder_dims: int = 1  # the convolutional decoder's kernel: 1-D over positions, 2-D over a patch grid
    # The micro-batch is counted in items, unless the modality batches to a budget of input units:
    # then the data key that holds it per rank, and what the units are called in messages.
    budget_key: str | None = None
    budget_unit: str = "samples"
    fairseq: Any = None  # a d2v2scale.interop.fairseq_config.FairseqLayout

    def validate(self, cfg: Any) -> None:
        """Checks on this modality's keys and on the shared keys it restricts (ConfigError)."""
        m = cfg.model
        if m.num_extra_tokens != 0 or m.cls_loss != 0:
            key, value = ("model.num_extra_tokens", m.num_extra_tokens) if m.num_extra_tokens else \
                ("model.cls_loss", m.cls_loss)
            raise ConfigError(f"{key}={value}: allowed values for {self.name}: 0 (extra tokens and the CLS loss are "
                              "image-only)")

    def mask_kind(self, masking: Any) -> str:
        """``masking.kind=auto`` resolved: spans of ``mask_length`` > 1 are blocks."""
        return "block1d" if masking.mask_length > 1 else "random"

    def encoder(self, model_cfg: Any) -> Any:
        raise NotImplementedError(f"modality {self.name} builds no encoder")

    def decoder(self, spec: Any, encoder: Any) -> Any:
        raise NotImplementedError(f"modality {self.name} builds no decoder")

    def pad_value(self, model_cfg: Any) -> float:
        """What pads a batch of unequal items for the feature tool."""
        return 0.0

    def synthetic_batch(self, cfg: Any, batch_size: int, generator: Any) -> Any:
        raise NotImplementedError(f"modality {self.name} has no synthetic data")

    def input_length(self, cfg: Any) -> int:
        """The raw length of one item the planner sizes a step for (0: the item size is fixed)."""
        return 0

    def positions(self, cfg: Any, input_length: int) -> int:
        """T: the positions one item of ``input_length`` gives the blocks (extra tokens aside)."""
        return cfg.data.sample_length or 1

    def budget_options(self, cfg: Any) -> list[int]:
        """Micro-batch budgets the planner tries (only with a ``budget_key``)."""
        return []

    def local_encoder_flops(self, model_cfg: Any, input_length: int, positions: int) -> float:
        """Forward FLOPs of the local encoder for one item."""
        return 0.0

    def context_flops(self, model_cfg: Any, positions: int) -> float:
        """Forward FLOPs per view of what runs on the positions before the blocks (conv positions)."""
        return 0.0

    def local_activation_bytes(self, cfg: Any, layout: Any, bytes_per_element: int) -> dict[str, float]:
        """Activation bytes of the local encoder per micro-batch, by name, beyond the blocks'."""
        return {}

    def feature_items(self, path: Path, model_cfg: Any) -> list[FeatureItem]:
        """The feature tool's inputs under ``path`` (a ``.npy`` array is read by the tool itself)."""
        raise NotImplementedError(f"modality {self.name} reads no input files for features")


_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Add ``modality`` under its name; its keys must not collide with another modality's."""
    if not modality.name or modality.name in _REGISTRY:
        raise ValueError(f"a modality needs a new name; registered: {', '.join(_REGISTRY)}")
    for section in ("model", "data"):
        for key in own_keys(modality, section):
            owner = key_owner(section, key)
            if owner is not None:
                raise ValueError(f"{section}.{key} of modality {modality.name} is already {owner}'s")
    _REGISTRY[modality.name] = modality
    return modality


def get(name: str) -> Modality:
    """The registered modality ``name`` (config validation refuses unknown names first)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"model.modality={name!r} is not registered; registered: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def own_keys(modality: Modality, section: str) -> dict[str, tuple[Any, Any]]:
    """key → (type, default) of the keys ``modality`` adds to ``section`` (``model`` or ``data``)."""
    cls = modality.model_keys if section == "model" else modality.data_keys
    if cls is None:
        return {}
    hints = _type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # a fresh list
        out[f.name] = (hints[f.name], default)
    return out


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A keys class's resolved annotations (resolving them is most of a config load's time)."""
    return typing.get_type_hints(cls)


def key_owner(section: str, key: str) -> str | None:
    """The modality whose key ``section.key`` is, or None."""
    return next((m.name for m in _REGISTRY.values() if key in own_keys(m, section)), None)


def section_keys(section: str) -> dict[str, tuple[Any, Any]]:
    """key → (type, default) of every registered modality's keys in ``section``."""
    out: dict[str, tuple[Any, Any]] = {}
    for m in _REGISTRY.values():
        out.update(own_keys(m, section))
    return out


def data_kinds() -> tuple[str, ...]:
    """Every ``data.kind``: synthetic (any modality) and each modality's own."""
    kinds = ["synthetic"]
    for m in _REGISTRY.values():
        kinds += [k.name for k in m.data_kinds if k.name not in kinds]
    return tuple(kinds)


def data_kind(cfg: Any) -> DataKind | None:
    """The :class:`DataKind` ``cfg.data.kind`` names for this modality (None: synthetic)."""
    return next((k for k in get(cfg.model.modality).data_kinds if k.name == cfg.data.kind), None)


def batch_budget(cfg: Any) -> int | None:
    """The per-rank micro-batch budget in input units (audio: ``data.max_tokens``), or None when
    the micro-batch counts items."""
    key = get(cfg.model.modality).budget_key
    return getattr(cfg.data, key) if key else None
