"""Counter-based random numbers: a pure function of (key, counter), vectorised, on any device.

Masks must be reproducible from (seed, step, sample index) alone — on another rank, after a
resume, inside a TP group, on CPU or GPU — and must not depend on which other samples share
the batch. A stateful ``torch.Generator`` per sample would need a Python loop and gives
different streams on CPU and CUDA. Hashing integers does neither: every draw is
``hash(row_key, stream, column)``, computed with int64 tensor ops whose intermediate values stay
below 2**63 (32-bit multiplies are split into 16-bit halves), so results are bit-identical on
every device.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def hash32(x):
    """A 32-bit integer finaliser (Wellons' lowbias32) applied elementwise to int64 values (or to a
    Python int: the same operations, the same result, nothing on a device)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine(*parts: int | torch.Tensor) -> torch.Tensor | int:
    """Fold integers (Python ints or int64 tensors, broadcast together) into one 32-bit key: a
    Python int when every part is one (no tensor to read back), else an int64 tensor."""
    if all(isinstance(part, int) for part in parts):
        key_int: int | None = None
        for part in parts:
            mixed = hash32(((part & _MASK32) ^ hash32(((part >> 32) & _MASK32) + 0x9E3779B9)))
            key_int = mixed if key_int is None else hash32(key_int ^ mixed)
        assert key_int is not None
        return key_int
    device = next(part.device for part in parts if isinstance(part, torch.Tensor))  # where the tensor parts are
    key: torch.Tensor | None = None
    for part in parts:
        part_t = torch.as_tensor(part, dtype=torch.int64, device=device)
        lo, hi = part_t & _MASK32, (part_t >> 32) & _MASK32
        mixed = hash32(lo ^ hash32(hi + 0x9E3779B9))
        key = mixed if key is None else hash32(key ^ mixed)
    assert key is not None
    return key


def uniform_row(key: int, n: int, stream: int) -> list[float]:
    """:func:`uniform` of one Python-int key, in Python (exactly the same numbers; no tensors)."""
    row = hash32(key ^ hash32(stream))
    return [(hash32(row + hash32(col + 0x632BE5AB)) >> 8) * (1.0 / (1 << 24)) for col in range(n)]


def uniform(keys: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """(len(keys), n) float32 uniforms in [0, 1), 24 bits each; ``stream`` separates independent uses."""
    cols = torch.arange(n, device=keys.device, dtype=torch.int64)
    row = hash32(keys.to(torch.int64) ^ hash32(torch.tensor(stream, dtype=torch.int64, device=keys.device)))
    bits = hash32(row[:, None] + hash32(cols + 0x632BE5AB)[None, :])
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
