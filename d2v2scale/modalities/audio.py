"""The audio modality: 16 kHz waveforms through wav2vec 2.0's CNN, conv positions, optional ALiBi.

Keys: ``model.conv_feature_layers`` ([channels, kernel, stride] per CNN layer), ``model.conv_pos_*``,
``model.use_alibi``, ``model.alibi_scale``; ``data.max_tokens`` (the per-rank micro-batch in
samples, fairseq's token budget), ``data.min_sample_size`` / ``data.max_sample_size`` (crop bounds).
Data: ``audio`` (a folder of FLAC/WAV, a fairseq ``.tsv`` manifest or a file list). The teacher
reads the student's CNN output, so it has no local encoder of its own.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError, DataConfig, ModelConfig, ModelSpec, require
from ..data.audio import AUDIO_INDEX
from ..data.files import AUDIO_SUFFIXES, DataError, input_files
from ..data.index import DataIndex
from ..interop.fairseq import FairseqLayout
from ..interop.fairseq_config import format_conv_spec, parse_conv_spec
from ..modality_registry import DataKind, Encoder, FeatureItem, Modality, register
from ..model.conv_layers import ChannelLayerNorm, TrimEven
from ..model.decoder import Decoder1d
from ..model.encoders import context_encoder, gather_kept, key_padding_bias, rows_to_samples
from ..model.masking import MaskInfo

if TYPE_CHECKING:
    from ..planning.memory import Layout

CROPS_PER_MICRO_BATCH = (1, 1.5, 2, 3, 4, 6)  # the planner's data.max_tokens options, × data.max_sample_size


@dataclass(slots=True)
class AudioKeys:
    conv_feature_layers: list = field(
        default_factory=lambda: [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    )
    conv_pos_width: int = 95
    conv_pos_depth: int = 5
    conv_pos_groups: int = 16
    use_alibi: bool = False
    alibi_scale: float = 1.0


@dataclass(slots=True)
class AudioDataKeys:
    max_tokens: int | None = None  # samples per micro-batch per rank
    min_sample_size: int = 32_000
    max_sample_size: int = 320_000


def frame_lengths(conv_layers: list, length):
    """The length after each layer of the wav2vec CNN (``[channels, kernel, stride]`` per layer) for
    ``length`` input samples: an int or an integer tensor (floor division either way). The model,
    the planner's memory and FLOPs and the positions count all read it here."""
    out = []
    for _, kernel, stride in conv_layers:
        length = (length - kernel) // stride + 1
        out.append(length)
    return out


def receptive_field(conv_layers: list) -> int:
    """Input samples one output frame of the wav2vec CNN sees (400 for the standard 7-layer stack)."""
    span, stride = 1, 1
    for _, kernel, layer_stride in conv_layers:
        span += (kernel - 1) * stride
        stride *= layer_stride
    return span


class _Fp32ChannelLayerNorm(nn.LayerNorm):
    """Affine LayerNorm over channels of (B, C, T), computed in fp32 (wav2vec2 ``Fp32LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.transpose(1, 2).float(), self.normalized_shape, w, b, self.eps)
        return y.transpose(1, 2).type_as(x)


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0's CNN in ``layer_norm`` mode: conv (no bias) → dropout(0) → fp32 channel LN → GELU."""

    def __init__(self, layers: list):
        super().__init__()
        self.spec = [tuple(int(v) for v in layer) for layer in layers]
        blocks, in_dim = [], 1
        for dim, kernel, stride in self.spec:
            conv = nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=False)
            blocks.append(nn.Sequential(conv, nn.Dropout(0.0), _Fp32ChannelLayerNorm(dim), nn.GELU()))
            in_dim = dim
        self.conv_layers = nn.ModuleList(blocks)
        self.out_dim = in_dim

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return frame_lengths(self.spec, lengths)[-1]

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x.transpose(1, 2)


def _conv_positions(cfg: ModelConfig) -> nn.Sequential:
    """Relative positional encoder: ``conv_pos_depth`` × (grouped conv → LN (no affine) → GELU)."""
    keys = cfg.keys(AudioKeys)
    k = max(3, keys.conv_pos_width // keys.conv_pos_depth)
    layers = []
    for _ in range(keys.conv_pos_depth):
        conv = nn.Conv1d(cfg.embed_dim, cfg.embed_dim, k, padding=k // 2, groups=keys.conv_pos_groups)
        layers.append(nn.Sequential(conv, TrimEven(k, 1), ChannelLayerNorm(), nn.GELU()))
    return nn.Sequential(*layers)


def alibi_slopes(heads: int) -> list[float]:
    """The standard ALiBi geometric slopes; non-powers of two interleave the 2× set (fairseq ``get_alibi``)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


class AudioEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        keys = cfg.keys(AudioKeys)
        self.local_encoder = ConvFeatureExtractor(keys.conv_feature_layers)
        d_in = self.local_encoder.out_dim
        self.project_features = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, cfg.embed_dim))
        self.relative_positional_encoder = _conv_positions(cfg)
        self.use_alibi = keys.use_alibi
        self.num_heads = cfg.num_heads
        self.slopes: torch.Tensor
        self.register_buffer("slopes", torch.tensor(alibi_slopes(cfg.num_heads)), persistent=False)
        self.alibi_scale = nn.Parameter(torch.full((1, 1, cfg.num_heads, 1, 1), keys.alibi_scale)) if keys.use_alibi \
            else None
        self.context_encoder = context_encoder(cfg, with_norm=True)

    def reset_parameters(self) -> None:
        self.local_encoder.reset_parameters()

    def local_features(self, wav: torch.Tensor,
                       lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Waveforms (B, S) → frames (B, T, D); ``lengths`` in samples marks padding at the end."""
        x = self.project_features(self.local_encoder(wav))
        if lengths is None:
            return x, None
        frames = self.local_encoder.output_lengths(lengths.to(x.device))
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < frames[:, None]
        return x, valid

    def num_positions(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None]:
        """Frames per batch and per sample, from the conv arithmetic alone (no forward needed)."""
        total = int(self.local_encoder.output_lengths(torch.tensor(wav.shape[1])))
        return total, None if lengths is None else self.local_encoder.output_lengths(lengths)

    def _positions(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Conv positions; padded frames are re-zeroed after every layer so that a padded sample
        sees exactly the zero padding it would see on its own."""
        keep = None if valid is None else valid.unsqueeze(1).to(x.dtype)
        x = x.transpose(1, 2)
        for layer in self.relative_positional_encoder:
            x = layer(x)
            if keep is not None:
                x = x * keep
        return x.transpose(1, 2)

    def alibi_bias(self, positions: torch.Tensor) -> torch.Tensor:
        """(rows, H, n, n) fp32 bias ``-scale_h·slope_h·|i-j|`` at the given (rows, n) positions, so kept
        tokens keep their true distances without building the full T×T bias first."""
        if self.alibi_scale is None:
            raise ValueError("an ALiBi bias needs model.use_alibi=true")
        dist = (positions[:, None, :] - positions[:, :, None]).abs().float()
        scale = self.alibi_scale.clamp_min(0).float().view(1, -1, 1, 1)
        return -(self.slopes.view(1, -1, 1, 1) * scale) * dist[:, None]

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, mask: MaskInfo | None,
                clones: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        if valid is not None:
            x = x * valid.unsqueeze(-1).to(x.dtype)
        if mask is None:
            x = x + self._positions(x, valid)
            bias = key_padding_bias(valid)
            if self.use_alibi:
                pos = torch.arange(x.shape[1], device=x.device)[None]
                alibi = self.alibi_bias(pos)
                bias = alibi if bias is None else alibi + bias
            return self.context_encoder(x, bias), bias
        sample = rows_to_samples(mask.keep_idx.shape[0], clones, x.device)
        # Conv positions see the full-length view with masked frames zeroed, as in the reference.
        row_valid = None if valid is None else valid[sample]
        x_pos = self._positions(x[sample] * (~mask.mask).unsqueeze(-1).to(x.dtype), row_valid)
        rows = torch.arange(x_pos.shape[0], device=x.device)[:, None]
        x = gather_kept(x, mask, clones) + x_pos[rows, mask.keep_idx]
        bias = self.alibi_bias(mask.keep_idx) if self.use_alibi else None
        return self.context_encoder(x, bias), bias



def _load_tensor(path: Path) -> torch.Tensor:
    from ..data.audio import load_audio

    return torch.from_numpy(load_audio(path))


def _audio(cfg: Config, micro_batch: int, device: torch.device, verbose: bool, index: DataIndex | None) -> Any:
    from ..data.audio import AudioSource

    d, keys = cfg.data, cfg.data.keys(AudioDataKeys)
    source = d.path if index is None else index
    if source is None or keys.max_tokens is None:  # validate() requires data.max_tokens with data.kind=audio
        raise ConfigError(f"data.kind={d.kind} needs data.path=<folder, .tsv manifest or file list> and data.max_tokens")
    return AudioSource(source, keys.max_tokens, keys.min_sample_size, keys.max_sample_size, cfg.seed,
                       threads=max(1, d.num_workers), verbose=verbose)


class _Fairseq(FairseqLayout):
    tag, base_preset = "AUDIO", "audio_base"
    key_renames = (
        ("modality_encoders.{M}.local_encoder.conv_layers.{i}.2.1.{p}", "encoder.local_encoder.conv_layers.{i}.2.{p}"),
        ("modality_encoders.{M}.project_features.1.{p}", "encoder.project_features.0.{p}"),
        ("modality_encoders.{M}.project_features.2.{p}", "encoder.project_features.1.{p}"),
        ("modality_encoders.{M}.relative_positional_encoder.{i+1}.0.{p}", "encoder.relative_positional_encoder.{i}.0.{p}"),
    )
    defaults = {"type": "AUDIO", "extractor_mode": "layer_norm",
                "feature_encoder_spec": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
                "conv_pos_width": 95, "conv_pos_groups": 16, "conv_pos_depth": 5, "conv_pos_pre_ln": False}
    mapped = {"conv_pos_width": "model.conv_pos_width", "conv_pos_groups": "model.conv_pos_groups",
              "conv_pos_depth": "model.conv_pos_depth", "feature_encoder_spec": "model.conv_feature_layers"}
    fixed = {"extractor_mode": ("layer_norm", "the CNN uses layer norm"),
             "conv_pos_pre_ln": (False, "the conv positions have no input LayerNorm")}
    alibi = True

    def values_in(self, section: dict, top: dict, where: str) -> dict[str, Any]:
        return {"model.conv_feature_layers": parse_conv_spec(section["feature_encoder_spec"])}

    def values_out(self, cfg: Config, section: dict) -> None:
        keys = cfg.model.keys(AudioKeys)
        section["feature_encoder_spec"] = format_conv_spec(keys.conv_feature_layers)
        if keys.use_alibi:
            section["learned_alibi_scale"] = section["learned_alibi_scale_per_head"] = True

    def derive(self, student: dict) -> dict[str, Any]:
        dim = student["blocks.0.norm1.weight"].shape[0]
        pos = sorted(k for k in student if k.startswith("encoder.relative_positional_encoder.") and k.endswith("weight"))
        k = student[pos[0]].shape[-1]
        return {"model.conv_pos_depth": len(pos), "model.conv_pos_groups": dim // student[pos[0]].shape[1],
                "model.conv_pos_width": k * len(pos), "model.use_alibi": "encoder.alibi_scale" in student}

    def without_config(self, student: dict, base: Config, given: set[str], from_preset: bool) -> dict[str, Any]:
        if "model.conv_feature_layers" in given:
            return {}
        convs = sorted((k for k in student if k.startswith("encoder.local_encoder.conv_layers.") and k.endswith(".0.weight")),
                       key=lambda k: int(k.split(".")[3]))
        base_layers = base.model.keys(AudioKeys).conv_feature_layers
        if not from_preset or len(base_layers) != len(convs):
            raise ConfigError("the checkpoint has no cfg.model and the CNN strides are not recoverable from tensors; "
                              f"pass model.conv_feature_layers=[[dim,kernel,stride],...] ({len(convs)} layers) "
                              "or --preset NAME with the same CNN")
        return {"model.conv_feature_layers": [[student[k].shape[0], student[k].shape[-1], spec[2]]
                                              for k, spec in zip(convs, base_layers)]}


class Audio(Modality):
    name = "audio"
    model_keys, data_keys = AudioKeys, AudioDataKeys
    data_kinds = (DataKind("audio", _audio, index=AUDIO_INDEX),)
    budget_key, budget_unit = "max_tokens", "audio samples"
    fairseq = _Fairseq()

    def validate(self, cfg: Config) -> None:
        super().validate(cfg)
        m, d, keys, data = cfg.model, cfg.data, cfg.model.keys(AudioKeys), cfg.data.keys(AudioDataKeys)
        require(m.embed_dim % keys.conv_pos_groups == 0,
               f"model.conv_pos_groups={keys.conv_pos_groups} must divide model.embed_dim={m.embed_dim}")
        require(all(isinstance(layer, list) and len(layer) == 3 and all(isinstance(v, int) and v >= 1 for v in layer)
                   for layer in keys.conv_feature_layers),
               "model.conv_feature_layers: allowed values: a list of [channels, kernel, stride] triples of positive "
               "integers")
        require(not cfg.teacher.ema_local_encoder,
               "teacher.ema_local_encoder=true is not supported for audio (the teacher shares the student's CNN); "
               "allowed values: false")
        require(not m.cuda_graphs or d.kind != "audio",
               "model.cuda_graphs=true needs fixed shapes, and data.kind=audio micro-batches vary in length (a graph "
               "recorded per length); allowed: model.cuda_graphs=false, or fixed-length synthetic data")
        require(d.kind != "audio" or data.max_tokens is not None,
               "data.kind=audio needs data.max_tokens (audio samples per micro-batch per rank)")
        rf = receptive_field(keys.conv_feature_layers)
        require(data.min_sample_size >= rf, f"data.min_sample_size={data.min_sample_size} is below the CNN's receptive "
                                           f"field of {rf} samples (one frame); allowed values: >= {rf}")
        require(data.max_sample_size >= data.min_sample_size, f"data.max_sample_size={data.max_sample_size} is below "
                                                             f"data.min_sample_size={data.min_sample_size}; allowed "
                                                             f"values: >= {data.min_sample_size}")
        require(d.sample_length is None or d.sample_length >= rf,
               f"data.sample_length={d.sample_length} is below the CNN's receptive field of {rf} samples; allowed "
               f"values: >= {rf}")
        require(data.max_tokens is None or data.max_tokens >= data.max_sample_size,
               f"data.max_sample_size={data.max_sample_size} exceeds data.max_tokens={data.max_tokens}: one crop would "
               f"not fit a micro-batch; allowed: data.max_tokens >= {data.max_sample_size}")

    def encoder(self, model: ModelConfig) -> AudioEncoder:
        return AudioEncoder(model)

    def decoder(self, spec: ModelSpec, encoder: Encoder) -> Decoder1d:
        return Decoder1d(spec.decoder, spec.model.embed_dim)

    def batch_budget(self, data: DataConfig) -> int | None:
        return data.keys(AudioDataKeys).max_tokens

    def synthetic_batch(self, cfg: Config, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        length = cfg.data.sample_length or cfg.data.keys(AudioDataKeys).max_sample_size
        return torch.randn(batch_size, length, generator=generator)

    def input_length(self, cfg: Config) -> int:
        return cfg.data.keys(AudioDataKeys).max_sample_size

    def positions(self, cfg: Config, input_length: int) -> int:
        return frame_lengths(cfg.model.keys(AudioKeys).conv_feature_layers, input_length)[-1]

    def budget_options(self, cfg: Config) -> list[int]:
        return sorted({int(cfg.data.keys(AudioDataKeys).max_sample_size * k) for k in CROPS_PER_MICRO_BATCH})

    def local_encoder_flops(self, model: ModelConfig, input_length: int, positions: int) -> float:
        flops, c_in = 0.0, 1
        layers = model.keys(AudioKeys).conv_feature_layers
        for (c_out, k, _), length in zip(layers, frame_lengths(layers, input_length)):
            flops += 2.0 * length * c_in * c_out * k
            c_in = c_out
        return flops + 2.0 * positions * c_in * model.embed_dim  # projection

    def context_flops(self, model: ModelConfig, positions: int) -> float:
        h, keys = model.embed_dim, model.keys(AudioKeys)
        k = max(3, keys.conv_pos_width // keys.conv_pos_depth)
        return keys.conv_pos_depth * 2.0 * positions * h * (h // keys.conv_pos_groups) * k

    def local_activation_bytes(self, cfg: Config, layout: Layout, bytes_per_element: int) -> dict[str, float]:
        m, keys, el = cfg.model, cfg.model.keys(AudioKeys), bytes_per_element
        rows = layout.micro_items * m.clone_batch
        kept = int(layout.positions * (1 - cfg.masking.mask_prob)) + m.num_extra_tokens
        cnn = 0.0
        layers = keys.conv_feature_layers
        for (c_out, _, _), length in zip(layers, frame_lengths(layers, layout.input_len)):
            cnn += c_out * length * (el + 4 + 4 + el)  # conv out, fp32 LN in/out, GELU
        conv_pos = keys.conv_pos_depth * 4 * rows * layout.positions * m.embed_dim * el
        alibi = rows * m.num_heads / layout.tp * kept * kept * 4 if keys.use_alibi else 0
        return {"audio_cnn": layout.micro_items * cnn, "conv_positions": conv_pos, "alibi_bias": alibi}

    def feature_items(self, path: Path, model: ModelConfig) -> list[FeatureItem]:
        from ..data.headers import header_length
        from ..data.manifest import read_manifest

        if path.suffix == ".tsv":
            root, names, frames, offsets = read_manifest(path)
            if offsets is not None:
                raise DataError(f"{path} lists segments (an offset column): extract features from whole files")
            entries = [(Path(root) / name, int(n)) for name, n in zip(names, frames)]
        else:
            entries = []
            for p in input_files(path, AUDIO_SUFFIXES, self.name):
                try:
                    n = header_length(p)[0]
                except Exception:  # noqa: BLE001 - a bad header is reported when the file is loaded
                    n = 0
                entries.append((p, n))
        return [FeatureItem(str(p), n, functools.partial(_load_tensor, p)) for p, n in entries]


register(Audio())
