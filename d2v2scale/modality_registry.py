"""What a modality is, and the registry of them.

A modality (``model.modality``) brings everything the core must not branch on: its own config
keys and checks, its encoder and decoder, its default mask, its data kinds, how its micro-batch is
counted, its positions and local-encoder cost for the planner, its feature-tool reader and its
fairseq layout. The core looks it up here by name and calls it; the shipped ones live in
:mod:`d2v2scale.modalities` (one module each) and register when the package is imported, as
torchtitan's models register their train specs. A new one is a subclass of :class:`Modality`
passed to :func:`register` - from any module, a test file included.

The hooks are typed with the objects each consumer hands over: the model builds from the model
section (:class:`ModelConfig`) or the :class:`ModelSpec` and gets back an :class:`Encoder` and a
:class:`Decoder`; the data pipeline and the planner pass the whole :class:`Config`. This module
imports only :mod:`d2v2scale.errors` at run time (the types are for the type checker), so every
room may read it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import Config, DataConfig, MaskingConfig, ModelConfig, ModelSpec
    from .data.index import DataIndex
    from .data.indexing import IndexRules
    from .interop.fairseq import FairseqLayout
    from .model.masking import MaskInfo
    from .planning.memory import Layout


@dataclass(frozen=True)
class DataKind:
    """One ``data.kind`` a modality reads. ``build(cfg, micro_batch, device, verbose, index)`` returns
    the batch source; ``index``: how ``data.path`` is indexed once per job — which files, how their
    lengths are read (None: it is not indexed), so the indexer never asks for the name;
    ``check(cfg)``: the cheap pre-launch check of an unindexed ``data.path`` (raises ``DataError``)."""

    name: str
    build: Callable[[Config, int, torch.device, bool, DataIndex | None], Any]
    needs_path: bool = True
    check: Callable[[Config], object] | None = None
    index: IndexRules | None = None


@dataclass(frozen=True)
class FeatureItem:
    """One input of the feature tool: ``length`` sorts items into batches, ``load()`` reads it."""

    name: str
    length: int
    load: Callable[[], Any]


class Encoder(Protocol):
    """What the model calls on a modality's encoder, an ``nn.Module`` (the contract, with shapes, is
    :mod:`d2v2scale.model.encoders`)."""

    def local_features(self, source: torch.Tensor,
                       lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) local features once per sample, and the (B, T) valid positions or None."""

    def num_positions(self, source: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None]:
        """T, and each sample's positions or None (all T), from shapes alone: masks are made before the forward."""

    def __call__(self, x: torch.Tensor, valid: torch.Tensor | None, mask: MaskInfo | None,
                 clones: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``: the blocks' input and its attention bias, of the full sequence or the kept tokens."""

    def reset_parameters(self) -> None:
        """The modality's own initialisation, after the model's BERT init."""


class Decoder(Protocol):
    """What the model calls on a modality's decoder, an ``nn.Module``: (B·M, T, D) → (B·M, T, D)."""

    @property
    def proj(self) -> nn.Module:
        """The output projection (re-initialised by the model after its BERT init)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions of every position from the kept outputs and the noise at masked ones."""


class Modality:
    """A modality's hooks; the defaults describe a 1-D sequence model with a free local encoder.

    ``model_keys`` / ``data_keys``: dataclasses of the keys only this modality reads; each is one
    typed object in its section (``cfg.model.keys(ImageKeys)``), named flat by users
    (``model.img_size``) as always. ``fairseq``: the layout of fairseq's ``Data2VecMultiModel``
    for it, or None."""

    name: str = ""
    model_keys: type | None = None
    data_keys: type | None = None
    data_kinds: tuple[DataKind, ...] = ()
    mask_kinds: tuple[str, ...] = ("block1d", "random")  # the first is masking.kind=auto's choice
    decoder_dims: int = 1  # the convolutional decoder's kernel: 1-D over positions, 2-D over a patch grid
    # The micro-batch is counted in items, unless the modality batches to a budget of input units:
    # then the data key that holds it per rank (named as users set it; batch_budget reads it), and
    # what the units are called in messages.
    budget_key: str | None = None
    budget_unit: str = "samples"
    fairseq: FairseqLayout | None = None

    # ---------------------------------------------------------------- the config
    def validate(self, cfg: Config) -> None:
        """Checks on this modality's keys and on the shared keys it restricts (ConfigError)."""
        m = cfg.model
        if m.num_extra_tokens != 0 or m.cls_loss != 0:
            key, value = ("model.num_extra_tokens", m.num_extra_tokens) if m.num_extra_tokens else \
                ("model.cls_loss", m.cls_loss)
            raise ConfigError(f"{key}={value}: allowed values for {self.name}: 0 (extra tokens and the CLS loss are "
                              "image-only)")

    def keys_class(self, section: str) -> type | None:
        """The dataclass of this modality's keys in ``section`` (``model`` or ``data``), or None."""
        return {"model": self.model_keys, "data": self.data_keys}.get(section)

    # ---------------------------------------------------------------- the model
    def mask_kind(self, masking: MaskingConfig) -> str:
        """``masking.kind=auto`` resolved: spans of ``mask_length`` > 1 are blocks."""
        return "block1d" if masking.mask_length > 1 else "random"

    def encoder(self, model: ModelConfig) -> Encoder:
        raise NotImplementedError(f"modality {self.name} builds no encoder")

    def decoder(self, spec: ModelSpec, encoder: Encoder) -> Decoder:
        """The decoder for ``spec``; ``encoder`` is the one built for it (a decoder may follow its shapes)."""
        raise NotImplementedError(f"modality {self.name} builds no decoder")

    # ---------------------------------------------------------------- the data
    def batch_budget(self, data: DataConfig) -> int | None:
        """The per-rank micro-batch in input units, held at ``budget_key`` (None: it counts items)."""
        return None

    def synthetic_batch(self, cfg: Config, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError(f"modality {self.name} has no synthetic data")

    def pad_value(self, model: ModelConfig) -> float:
        """What pads a batch of unequal items for the feature tool."""
        return 0.0

    def feature_items(self, path: Path, model: ModelConfig) -> list[FeatureItem]:
        """The feature tool's inputs under ``path`` (a ``.npy`` array is read by the tool itself)."""
        raise NotImplementedError(f"modality {self.name} reads no input files for features")

    # ---------------------------------------------------------------- the cost model
    def input_length(self, cfg: Config) -> int:
        """The raw length of one item the planner sizes a step for (0: the item size is fixed)."""
        return 0

    def positions(self, cfg: Config, input_length: int) -> int:
        """T: the positions one item of ``input_length`` gives the blocks (extra tokens aside)."""
        return cfg.data.sample_length or 1

    def budget_options(self, cfg: Config) -> list[int]:
        """Micro-batch budgets the planner tries (only with a ``budget_key``)."""
        return []

    def local_encoder_flops(self, model: ModelConfig, input_length: int, positions: int) -> float:
        """Forward FLOPs of the local encoder for one item."""
        return 0.0

    def context_flops(self, model: ModelConfig, positions: int) -> float:
        """Forward FLOPs per view of what runs on the positions before the blocks (conv positions)."""
        return 0.0

    def local_activation_bytes(self, cfg: Config, layout: Layout, bytes_per_element: int) -> dict[str, float]:
        """Activation bytes of the local encoder per micro-batch, by name, beyond the blocks'."""
        return {}


_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Add ``modality`` under its name; its keys must not collide with another modality's."""
    if not modality.name or modality.name in _REGISTRY:
        raise ValueError(f"a modality needs a new name; registered: {', '.join(_REGISTRY)}")
    for section in ("model", "data"):
        cls = modality.keys_class(section)
        if cls is None:
            continue
        if not dataclasses.is_dataclass(cls) or cls in keys_classes(section):
            raise ValueError(f"the {section} keys of modality {modality.name} need a dataclass of their own")
        taken = section_keys(section)
        for f in dataclasses.fields(cls):
            if f.name in taken:
                raise ValueError(f"{section}.{f.name} of modality {modality.name} is already "
                                 f"{keys_classes(section)[taken[f.name]]}'s")
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


def keys_classes(section: str) -> dict[type, str]:
    """Each registered modality's keys dataclass of ``section`` (``model`` or ``data``) → its
    modality's name, in registration order."""
    return {cls: m.name for m in _REGISTRY.values() if (cls := m.keys_class(section)) is not None}


def section_keys(section: str) -> dict[str, type]:
    """Every registered modality's key of ``section`` → the keys dataclass that holds it."""
    return {f.name: cls for cls in keys_classes(section) for f in dataclasses.fields(cls)}


def data_kinds() -> tuple[str, ...]:
    """Every ``data.kind``: synthetic (any modality) and each modality's own."""
    kinds = ["synthetic"]
    for m in _REGISTRY.values():
        kinds += [k.name for k in m.data_kinds if k.name not in kinds]
    return tuple(kinds)


def data_kind(cfg: Config) -> DataKind | None:
    """The :class:`DataKind` ``cfg.data.kind`` names for this modality (None: synthetic)."""
    return next((k for k in get(cfg.model.modality).data_kinds if k.name == cfg.data.kind), None)


def batch_budget(cfg: Config) -> int | None:
    """The per-rank micro-batch budget in input units (audio: ``data.max_tokens``), or None when
    the micro-batch counts items."""
    return get(cfg.model.modality).batch_budget(cfg.data)
