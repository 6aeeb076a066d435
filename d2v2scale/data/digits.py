"""scikit-learn's bundled 8×8 handwritten digits, upsampled to the image preset's size.

Small enough to ship with scikit-learn (no download), real enough to show that pretraining
learns: a linear probe on frozen features separates the ten digits. Items with ``index % 5 == 0``
are held out for probing; training reads the rest.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .schedule import epoch_indices

HELD_OUT_EVERY = 5


def _digits_file() -> Path:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn (its
    import costs a second in every process that trains on digits)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("data.kind=digits needs scikit-learn (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise RuntimeError(f"data.kind=digits: {path} is missing from the installed scikit-learn")
    return path


def load_digits_tensors(img_size: int, in_chans: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, S, S) normalised to zero mean / unit std, labels (N,)) for split train|heldout.
    The file is what ``sklearn.datasets.load_digits`` reads: 1797 rows of 64 pixels (0..16) and a label."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; allowed: train, heldout")
    table = torch.from_numpy(np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32))
    images = table[:, :64].reshape(-1, 1, 8, 8) / 16.0
    images = (images - images.mean()) / images.std()  # one normalisation for both splits
    labels = table[:, 64].to(torch.int64)
    held = torch.arange(len(labels)) % HELD_OUT_EVERY == 0
    keep = held if split == "heldout" else ~held
    images = F.interpolate(images[keep], size=(img_size, img_size), mode="bilinear", align_corners=False)
    labels = labels[keep]
    return images.expand(-1, in_chans, -1, -1).contiguous(), labels


class DigitsSource:
    """Training split, read by global position (see :mod:`~d2v2scale.data.schedule`)."""

    def __init__(self, img_size: int, in_chans: int, seed: int):
        self.images, _ = load_digits_tensors(img_size, in_chans, "train")
        self.seed = seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.images[epoch_indices(positions, len(self), self.seed)], None
