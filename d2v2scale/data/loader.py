"""Build the batch source for ``data.kind`` and hand out this rank's micro-batches per step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from .schedule import RankSchedule


@dataclass
class MicroBatch:
    source: torch.Tensor
    sample_ids: torch.Tensor  # global positions: they key the masks
    lengths: torch.Tensor | None

    def to(self, device: torch.device, dtype: torch.dtype) -> "MicroBatch":
        src = self.source.to(device, non_blocking=True)
        if src.is_floating_point():
            src = src.to(dtype)
        lengths = None if self.lengths is None else self.lengths.to(device, non_blocking=True)
        return MicroBatch(src, self.sample_ids.to(device, non_blocking=True), lengths)


def build_source(cfg: Config, micro_batch: int, device: torch.device, verbose: bool = True):
    """The batch source for ``data.kind``; ``micro_batch`` sizes the DALI pipeline."""
    kind = cfg.data.kind
    if kind == "synthetic":
        from .synthetic import SyntheticSource

        return SyntheticSource(cfg)
    if kind == "digits":
        if cfg.model.modality != "image":
            raise ValueError(f"data.kind=digits is an image dataset; model.modality={cfg.model.modality}")
        from .digits import DigitsSource

        return DigitsSource(cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    if kind == "images":
        from .images import ImageSource

        m = cfg.model
        return ImageSource(cfg.data.path, m.img_size, m.in_chans, cfg.seed, micro_batch, device,
                           threads=max(1, cfg.data.num_workers), verbose=verbose)
    if kind == "audio":
        from .audio import AudioSource

        d = cfg.data
        if d.max_tokens is None:
            raise ValueError("data.kind=audio needs data.max_tokens (samples per micro-batch per rank)")
        return AudioSource(d.path, d.max_tokens, d.min_sample_size, d.max_sample_size, cfg.seed,
                           threads=max(1, d.num_workers), verbose=verbose)
    if kind == "text":
        from .text import TokenBlocks

        m = cfg.model
        return TokenBlocks(cfg.data.path, cfg.data.sample_length or m.max_positions, m.vocab_size, cfg.seed)
    raise NotImplementedError(f"data.kind={kind} is not available yet; available: synthetic, digits, images, audio, text")


class StepLoader:
    """``loader.step(n)`` → this rank's ``grad_accum`` micro-batches of step ``n``."""

    def __init__(self, cfg: Config, schedule: RankSchedule, device: torch.device = torch.device("cpu"),
                 verbose: bool = True):
        self.source = build_source(cfg, schedule.micro_batch, device, verbose)
        self.schedule = schedule

    def step(self, step: int) -> list[MicroBatch]:
        if getattr(self.source, "by_batch", False):
            out = []
            for batch_id in self.schedule.batch_ids(step):
                source, lengths, ids = self.source.batch_by_id(batch_id)
                out.append(MicroBatch(source, ids, lengths))
            return out
        out = []
        for positions in self.schedule.positions(step):
            source, lengths = self.source.batch(positions)
            out.append(MicroBatch(source, positions, lengths))
        return out
