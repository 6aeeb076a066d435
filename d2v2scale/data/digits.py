"""scikit-learn's bundled 8×8 handwritten digits, upsampled to the image preset's size.

Small enough to ship with scikit-learn (no download), real enough to show that pretraining
learns: a linear probe on frozen features separates the ten digits. Items with ``index % 5 == 0``
are held out for probing; training reads the rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import epoch_indices

HELD_OUT_EVERY = 5


def load_digits_tensors(img_size: int, in_chans: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, S, S) normalised to zero mean / unit std, labels (N,)) for split train|heldout."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a test/demo dependency
        raise RuntimeError("data.kind=digits needs scikit-learn (pip install scikit-learn)") from e
    data = load_digits()
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; allowed: train, heldout")
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - images.mean()) / images.std()  # one normalisation for both splits
    labels = torch.tensor(data.target, dtype=torch.int64)
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
