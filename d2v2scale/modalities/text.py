"""The text modality: token ids (fairseq's RoBERTa dictionary layout), learned positions.

Keys: ``model.vocab_size``, ``model.max_positions``, ``model.pad_idx``, ``model.embed_dropout``.
Data: ``text`` (a pre-tokenised ``PREFIX.bin`` + ``PREFIX.json``, read in blocks of
``data.sample_length`` or ``model.max_positions`` tokens; :mod:`d2v2scale.data.text`). The teacher is the shared blocks alone (``ema_encoder_only``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError, ModelConfig, ModelSpec
from ..data.files import DataError
from ..data.index import DataIndex
from ..interop.fairseq import FairseqLayout
from ..modality_registry import DataKind, Encoder, FeatureItem, Modality, register
from ..model.decoder import Decoder1d
from ..model.encoders import context_encoder, gather_kept, key_padding_bias
from ..model.masking import MaskInfo


@dataclass(slots=True)
class TextKeys:
    vocab_size: int = 50265
    max_positions: int = 512
    pad_idx: int = 1
    embed_dropout: float = 0.1  # after the token + position embedding (fairseq modalities.text.dropout)


class TextLocalEncoder(nn.Module):
    """Token + learned positions (fairseq layout: ``pad_idx + 1`` offset rows) → LayerNorm → dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        keys = cfg.keys(TextKeys)
        self.pad_idx = keys.pad_idx
        self.embed_tokens = nn.Embedding(keys.vocab_size, cfg.embed_dim, padding_idx=keys.pad_idx)
        self.embed_positions = nn.Embedding(keys.max_positions + keys.pad_idx + 1, cfg.embed_dim, padding_idx=keys.pad_idx)
        self.layernorm_embedding = nn.LayerNorm(cfg.embed_dim, eps=1e-5)
        self.dropout = nn.Dropout(keys.embed_dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        not_pad = tokens.ne(self.pad_idx)
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_idx
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        return self.dropout(self.layernorm_embedding(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pad_idx = cfg.keys(TextKeys).pad_idx
        self.local_encoder = TextLocalEncoder(cfg)
        self.context_encoder = context_encoder(cfg, with_norm=cfg.prenet_depth > 0)

    def reset_parameters(self) -> None:
        pass

    def local_features(self, tokens: torch.Tensor,
                       lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Without ``lengths`` the blocks are taken as unpadded (fixed 512-token blocks), which keeps
        the attention free of a padding bias; with them, positions past each length are padding."""
        valid = None
        if lengths is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
        return self.local_encoder(tokens), valid

    def num_positions(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None]:
        return tokens.shape[1], lengths

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, mask: MaskInfo | None,
                clones: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mask is None:
            bias = key_padding_bias(valid)
            return self.context_encoder(x, bias), bias
        return self.context_encoder(gather_kept(x, mask, clones)), None



def _block_size(cfg: Config) -> int:
    longest = cfg.model.keys(TextKeys).max_positions
    return min(cfg.data.sample_length or longest, longest)


def _tokens(cfg: Config, micro_batch: int = 0, device: torch.device | None = None, verbose: bool = True,
            index: DataIndex | None = None) -> Any:
    from ..data.text import TokenBlocks

    keys = cfg.model.keys(TextKeys)
    if cfg.data.path is None:
        raise ConfigError(f"data.kind={cfg.data.kind} needs data.path=<token-file prefix>")
    return TokenBlocks(cfg.data.path, cfg.data.sample_length or keys.max_positions, keys.vocab_size, cfg.seed)


class _Fairseq(FairseqLayout):
    tag, base_preset = "TEXT", "text_base"
    defaults = {"type": "TEXT", "max_source_positions": 512, "learned_pos": True, "dropout": 0.1,
                "no_scale_embedding": True, "layernorm_embedding": True, "no_token_positional_embeddings": False}
    mapped = {"max_source_positions": "model.max_positions", "dropout": "model.embed_dropout"}
    fixed = {"learned_pos": (True, "text positions are learned"),
             "no_scale_embedding": (True, "token embeddings are not scaled"),
             "layernorm_embedding": (True, "embeddings are layer-normed"),
             "no_token_positional_embeddings": (False, "text positions are learned")}

    def derive(self, student: dict) -> dict[str, Any]:
        return self.outside_config(student)

    def without_config(self, student: dict, base: Config, given: set[str], from_preset: bool) -> dict[str, Any]:
        rows = student["encoder.local_encoder.embed_positions.weight"].shape[0]
        return {"model.max_positions": rows - base.model.keys(TextKeys).pad_idx - 1}

    def outside_config(self, student: dict) -> dict[str, Any]:
        return {"model.vocab_size": student["encoder.local_encoder.embed_tokens.weight"].shape[0]}


class Text(Modality):
    name = "text"
    model_keys = TextKeys
    data_kinds = (DataKind("text", _tokens, check=_tokens),)  # opening the token files checks them
    fairseq = _Fairseq()

    def validate(self, cfg: Config) -> None:
        super().validate(cfg)
        keys = cfg.model.keys(TextKeys)
        if not keys.vocab_size > keys.pad_idx >= 0:
            raise ConfigError(f"model.vocab_size={keys.vocab_size} must exceed model.pad_idx={keys.pad_idx}; allowed "
                              f"values: integers > {keys.pad_idx}")
        if keys.max_positions < 1:
            raise ConfigError(f"model.max_positions={keys.max_positions} is not allowed; allowed values: integers >= 1")
        if not 0.0 <= keys.embed_dropout < 1.0:
            raise ConfigError(f"model.embed_dropout={keys.embed_dropout} is not allowed; allowed values: 0 <= "
                              "embed_dropout < 1")
        if not cfg.teacher.ema_encoder_only:
            raise ConfigError("teacher.ema_encoder_only=false is not supported for text; allowed values: true")

    def encoder(self, model: ModelConfig) -> TextEncoder:
        return TextEncoder(model)

    def decoder(self, spec: ModelSpec, encoder: Encoder) -> Decoder1d:
        return Decoder1d(spec.decoder, spec.model.embed_dim)

    def synthetic_batch(self, cfg: Config, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        """Token ids that avoid the padding id."""
        keys = cfg.model.keys(TextKeys)
        tokens = torch.randint(0, keys.vocab_size - 1, (batch_size, _block_size(cfg)), generator=generator)
        return tokens + (tokens >= keys.pad_idx).long()

    def positions(self, cfg: Config, input_length: int) -> int:
        return cfg.data.sample_length or cfg.model.keys(TextKeys).max_positions

    def pad_value(self, model: ModelConfig) -> float:
        return model.keys(TextKeys).pad_idx

    def feature_items(self, path: Path, model: ModelConfig) -> list[FeatureItem]:
        if not (path.is_file() and path.suffix == ".txt"):
            raise DataError(f"{path}: a text model reads a .txt file of token ids (one item per line) or a .npy array")
        items = []
        for k, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    ids = torch.tensor([int(t) for t in line.split()], dtype=torch.int64)
                except ValueError:
                    raise DataError(f"{path}:{k + 1}: expected space-separated integer token ids") from None
                items.append(FeatureItem(f"{path.name}:{k + 1}", len(ids), functools.partial(torch.clone, ids)))
        return items


register(Text())
