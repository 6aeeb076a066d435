"""Build the batch source for ``data.kind`` and hand out this rank's micro-batches per step."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .. import modality_registry
from ..config import Config
from ..model.masking import MaskInfo
from .files import log_once
from .index import DataIndex
from .prefetch import StepPrefetcher
from .schedule import RankSchedule


@dataclass
class MicroBatch:
    source: torch.Tensor
    sample_ids: torch.Tensor  # global positions: they key the masks
    lengths: torch.Tensor | None
    mask: MaskInfo | None = None  # made with the batch, off the training step's path (see StepLoader)

    def to(self, device: torch.device, dtype: torch.dtype) -> "MicroBatch":
        src = self.source.to(device, non_blocking=True)
        if src.is_floating_point():
            src = src.to(dtype)
        lengths = None if self.lengths is None else self.lengths.to(device, non_blocking=True)
        mask = None if self.mask is None else MaskInfo(self.mask.mask.to(device, non_blocking=True),
                                                       self.mask.keep_idx.to(device, non_blocking=True))
        return MicroBatch(src, self.sample_ids.to(device, non_blocking=True), lengths, mask)


def build_source(cfg: Config, micro_batch: int, device: torch.device, verbose: bool = True,
                 index: DataIndex | None = None):
    """The batch source for ``data.kind`` (the modality's :class:`~d2v2scale.modality_registry.DataKind`);
    ``micro_batch`` sizes the DALI pipeline; ``index`` is the job's index of ``data.path`` (indexed
    kinds; None: the source indexes the path itself)."""
    kind = modality_registry.data_kind(cfg)
    if kind is None:
        from .synthetic import SyntheticSource

        return SyntheticSource(cfg)
    return kind.build(cfg, micro_batch, device, verbose, index)


class StepLoader:
    """``loader.step(n)`` → this rank's ``grad_accum`` micro-batches of step ``n``, on ``device`` in
    ``dtype``, read ahead ``prefetch_steps`` steps on a background thread (see :mod:`.prefetch`).

    ``masker(step, micro_batch)`` (the model's ``make_mask``: a pure function of the step, the
    sample ids and the shapes) makes each micro-batch's masks with it, on the host and ahead of
    time, so the training step neither spends the time nor reads anything back from the device."""

    def __init__(self, cfg: Config, schedule: RankSchedule, device: torch.device, dtype: torch.dtype,
                 verbose: bool = True, prefetch_steps: int = 0,
                 masker: Callable[[int, MicroBatch], MaskInfo] | None = None, index: DataIndex | None = None):
        self.source = build_source(cfg, schedule.micro_batch, device, verbose, index)
        self.schedule, self.device, self.dtype, self.masker = schedule, device, dtype, masker
        self._skipped: dict[str, str] = {}
        init = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None  # device is per thread
        self._prefetcher = StepPrefetcher(self._load, prefetch_steps, cfg.train.max_updates, thread_init=init)

    def step(self, step: int) -> list[MicroBatch]:
        batches, self._skipped = self._prefetcher.get(step)
        return batches

    def skipped_files(self) -> dict[str, str]:
        """path → why, of the data files this rank found unusable up to the last step handed out
        (not the read-ahead)."""
        return self._skipped

    def log_found_elsewhere(self, found: dict[str, str]) -> None:
        """Log, once per run, unusable files other ranks found (rank 0 speaks for the run)."""
        logged = getattr(self.source, "logged", set())
        for path, why in sorted(found.items()):
            log_once(logged, path, why)

    def close(self) -> None:
        self._prefetcher.close()

    def _load(self, step: int) -> tuple[list[MicroBatch], dict[str, str]]:
        if getattr(self.source, "by_batch", False):
            raw = [self.source.batch_by_id(b) for b in self.schedule.batch_ids(step)]
            batches = [MicroBatch(source, ids, lengths) for source, lengths, ids in raw]
        else:
            batches = []
            for positions in self.schedule.positions(step):
                source, lengths = self.source.batch(positions)
                batches.append(MicroBatch(source, positions, lengths))
        skipped = dict(self.source.skipped_files()) if hasattr(self.source, "skipped_files") else {}
        if self.masker is not None:
            batches = [replace(mb, mask=self.masker(step, mb)) for mb in batches]
        return [mb.to(self.device, self.dtype) for mb in batches], skipped
