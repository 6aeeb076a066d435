"""The image modality: ViT patches of square images, 2-D inverse block masks, a 2-D conv decoder.

Keys: ``model.img_size``, ``model.patch_size``, ``model.in_chans``. Data: ``digits`` (scikit-learn's
bundled 8×8 digits) and ``images`` (a folder or file list of JPEG/PNG, DALI-decoded). The only
modality with extra (CLS) tokens and the CLS loss.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError, MaskingConfig, ModelConfig, ModelSpec
from ..data.files import IMAGE_SUFFIXES, input_files
from ..data.images import IMAGE_INDEX
from ..data.index import DataIndex
from ..interop.fairseq import FairseqLayout
from ..modality_registry import DataKind, Encoder, FeatureItem, Modality, register
from ..model.decoder import Decoder2d
from ..model.encoders import context_encoder, gather_kept
from ..model.masking import MaskInfo


@dataclass(slots=True)
class ImageKeys:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3

    def grid(self) -> tuple[int, int]:
        """Patches per column and per row: the encoder's positions and the 2-D decoder's shape."""
        return (self.img_size // self.patch_size,) * 2


def sincos_2d(embed_dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos positions, (grid², D): first half encodes the column, second the row."""

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FixedPositions(nn.Module):
    """A frozen parameter (fairseq keeps it as one, so it is saved and counted like the reference)."""

    def __init__(self, positions: torch.Tensor):
        super().__init__()
        self.positions = nn.Parameter(positions.unsqueeze(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.positions.to(x.dtype)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        keys = cfg.keys(ImageKeys)
        self.grid = keys.grid()
        self.local_encoder = PatchEmbed(keys.patch_size, keys.in_chans, cfg.embed_dim)
        self.fixed_positional_encoder = FixedPositions(sincos_2d(cfg.embed_dim, self.grid[0]))
        self.num_extra = cfg.num_extra_tokens
        self.extra_tokens = nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, cfg.embed_dim)) if self.num_extra else None
        self.context_encoder = context_encoder(cfg, with_norm=True)

    def reset_parameters(self) -> None:
        w = self.local_encoder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.extra_tokens is not None:
            nn.init.normal_(self.extra_tokens)

    def local_features(self, source: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return self.local_encoder(source), None

    def num_positions(self, source: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[int, None]:
        return self.grid[0] * self.grid[1], None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, mask: MaskInfo | None,
                clones: int = 1) -> tuple[torch.Tensor, None]:
        x = self.fixed_positional_encoder(x)
        if mask is not None:
            x = gather_kept(x, mask, clones)
        if self.extra_tokens is not None:
            x = torch.cat([self.extra_tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return self.context_encoder(x), None



def _digits(cfg: Config, micro_batch: int, device: torch.device, verbose: bool, index: DataIndex | None) -> Any:
    from ..data.digits import DigitsSource

    keys = cfg.model.keys(ImageKeys)
    return DigitsSource(keys.img_size, keys.in_chans, cfg.seed)


def _images(cfg: Config, micro_batch: int, device: torch.device, verbose: bool, index: DataIndex | None) -> Any:
    from ..data.images import ImageSource

    keys, source = cfg.model.keys(ImageKeys), cfg.data.path if index is None else index
    if source is None:
        raise ConfigError(f"data.kind={cfg.data.kind} needs data.path=<folder or file list>")
    return ImageSource(source, keys.img_size, keys.in_chans, cfg.seed, micro_batch, device,
                       threads=max(1, cfg.data.num_workers), verbose=verbose)


class _Fairseq(FairseqLayout):
    tag, base_preset = "IMAGE", "vit_b"
    defaults = {"type": "IMAGE", "input_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 768, "alibi_dims": 2,
                "alibi_distance": "manhattan", "fixed_positions": True, "transformer_decoder": False,
                "enc_dec_transformer": False}
    mapped = {"input_size": "model.img_size", "in_chans": "model.in_chans", "patch_size": "model.patch_size"}
    fixed = {"fixed_positions": (True, "image positions are the fixed 2-D sin-cos table"),
             "transformer_decoder": (False, "the decoder is convolutional"),
             "enc_dec_transformer": (False, "the decoder is convolutional")}
    inert = frozenset({"embed_dim", "alibi_dims", "alibi_distance"})

    def values_in(self, section: dict, top: dict, where: str) -> dict[str, Any]:
        if section["embed_dim"] != top["embed_dim"]:
            raise ConfigError(f"{where}.embed_dim={section['embed_dim']} differs from embed_dim={top['embed_dim']} "
                              "(a patch-embedding projection is not implemented)")
        return {}

    def values_out(self, cfg: Config, section: dict) -> None:
        section["embed_dim"] = cfg.model.embed_dim
        section["init_extra_token_zero"] = False  # our init draws the extra tokens from N(0, 1)

    def derive(self, student: dict) -> dict[str, Any]:
        patch = student["encoder.local_encoder.proj.weight"]
        grid = int(round(student["encoder.fixed_positional_encoder.positions"].shape[1] ** 0.5))
        extra = student["encoder.extra_tokens"].shape[1] if "encoder.extra_tokens" in student else 0
        return {"model.patch_size": patch.shape[-1], "model.in_chans": patch.shape[1],
                "model.img_size": grid * patch.shape[-1], "model.num_extra_tokens": extra}


class Image(Modality):
    name = "image"
    model_keys = ImageKeys
    data_kinds = (DataKind("digits", _digits, needs_path=False),
                  DataKind("images", _images, index=IMAGE_INDEX))
    mask_kinds = ("block2d", "block1d", "random")
    decoder_dims = 2
    fairseq = _Fairseq()

    def validate(self, cfg: Config) -> None:
        m, keys = cfg.model, cfg.model.keys(ImageKeys)
        if keys.img_size % keys.patch_size:
            raise ConfigError(f"model.patch_size={keys.patch_size} must divide model.img_size={keys.img_size}")
        if m.num_extra_tokens < 0:
            raise ConfigError("model.num_extra_tokens must be >= 0")
        if m.cls_loss != 0 and m.num_extra_tokens < 1:
            raise ConfigError(f"model.cls_loss={m.cls_loss} needs model.num_extra_tokens >= 1 (the CLS token)")

    def mask_kind(self, masking: MaskingConfig) -> str:
        return "block2d"

    def encoder(self, model: ModelConfig) -> ImageEncoder:
        return ImageEncoder(model)

    def decoder(self, spec: ModelSpec, encoder: Encoder) -> Decoder2d:
        return Decoder2d(spec.decoder, spec.model.embed_dim, spec.model.keys(ImageKeys).grid())

    def synthetic_batch(self, cfg: Config, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        keys = cfg.model.keys(ImageKeys)
        return torch.randn(batch_size, keys.in_chans, keys.img_size, keys.img_size, generator=generator)

    def positions(self, cfg: Config, input_length: int) -> int:
        rows, cols = cfg.model.keys(ImageKeys).grid()
        return rows * cols

    def local_encoder_flops(self, model: ModelConfig, input_length: int, positions: int) -> float:
        keys = model.keys(ImageKeys)
        return 2.0 * positions * keys.in_chans * keys.patch_size**2 * model.embed_dim

    def feature_items(self, path: Path, model: ModelConfig) -> list[FeatureItem]:
        from ..data.images import eval_transform

        size = model.keys(ImageKeys).img_size
        return [FeatureItem(str(p), 0, functools.partial(eval_transform, p, size))
                for p in input_files(path, IMAGE_SUFFIXES, self.name)]


register(Image())
