"""Where to cut long recordings, and how to read one cut without decoding the rest.

Libri-light files run from minutes to an hour; training crops are seconds. Cutting 60k hours of
audio into short files would mean a second copy of the corpus, so a long file is instead listed as
``(offset, length)`` segments (:mod:`d2v2scale.data.manifest`) and read with a seek and a range read.
Cuts fall at the start of the quietest 20 ms frame in the second before each length limit, so a
cut lands in a pause between words rather than inside one.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile

from .files import DataError

_CHUNK = 1 << 20  # samples per float64 block in frame_energy


def frame_energy(wav: np.ndarray, frame: int) -> np.ndarray:
    """Mean-square energy of each non-overlapping ``frame``-sample frame of mono ``wav``; a shorter
    last frame is averaged over the samples it has (``ceil(len / frame)`` values)."""
    wav = np.asarray(wav)
    if frame < 1 or wav.ndim != 1:
        raise ValueError(f"frame_energy needs mono samples and a frame of at least 1 (shape {wav.shape}, frame {frame})")
    energy = np.empty(-(-len(wav) // frame))
    step = max(1, _CHUNK // frame) * frame  # float64 in chunks: an hour of audio is never copied whole
    for a in range(0, len(wav), step):
        x = wav[a : a + step].astype(np.float64)
        full = len(x) // frame
        k = a // frame
        energy[k : k + full] = np.square(x[: full * frame]).reshape(full, frame).mean(1)
        if len(x) > full * frame:
            energy[k + full] = np.square(x[full * frame :]).mean()
    return energy


def cut_points(energy: np.ndarray, total: int, frame: int, max_len: int, min_len: int, window: int) -> list[int]:
    """Sample positions (excluding 0 and ``total``) where a ``total``-sample recording is cut so that
    every segment is at most ``max_len`` samples, each cut at the start of the quietest frame near
    the limit. ``energy[k]`` is the energy of frame ``k``, samples ``[k·frame, (k+1)·frame)``.

    While the rest after ``start`` is longer than ``max_len``: ``limit = min(start + max_len,
    total - min_len)`` (so the last piece is not shorter than ``min_len`` where possible), and the
    cut is the frame boundary in ``[max(start + min_len, limit - window), limit]`` with the least
    energy, the earliest on ties. Degenerate cases, all of which still give pieces of at most
    ``max_len`` that cover ``[0, total)`` once, in order:

    - the window is empty because ``min_len`` is over half the rest (or over ``max_len``): the last
      piece cannot be kept long, so ``limit = start + max_len`` and the window starts at
      ``max(start + min(min_len, max_len), limit - window)``;
    - no frame boundary in the window (``window < frame``, or a very narrow window): cut at
      ``limit`` itself, off the frame grid;
    - ``min_len <= 0``: every cut is still after ``start`` (no empty pieces); ``window <= 0``: the
      window is ``limit`` alone;
    - frames missing from ``energy`` (too short) or NaN count as the loudest.

    ``frame < 1`` or ``max_len < 1`` raise ValueError: no cut can satisfy them.
    """
    if frame < 1 or max_len < 1:
        raise ValueError(f"frame and max_len must be at least 1 sample, got frame={frame}, max_len={max_len}")
    energy = np.nan_to_num(np.asarray(energy, dtype=np.float64).reshape(-1), nan=np.inf)
    window = max(window, 0)
    cuts: list[int] = []
    start = 0
    while total - start > max_len:
        limit = min(start + max_len, total - min_len)
        lo = max(start + max(min_len, 1), limit - window)
        if lo > limit:
            limit = start + max_len
            lo = max(start + max(min(min_len, max_len), 1), limit - window)
        first, last = -(-lo // frame), limit // frame
        if first > last:
            start = limit
        else:
            e = np.full(last - first + 1, np.inf)
            have = energy[first : last + 1]
            e[: len(have)] = have
            start = (first + int(np.argmin(e))) * frame
        cuts.append(start)
    return cuts


def segments(total: int, cuts: list[int]) -> list[tuple[int, int]]:
    """(offset, length) of the pieces that ``cuts`` make of ``[0, total)``; none for an empty recording."""
    if total <= 0:
        return []
    edges = [0, *cuts, total]
    return [(a, b - a) for a, b in zip(edges[:-1], edges[1:])]


def read_range(path: str | Path, offset: int, frames: int, reader: BinaryIO | None = None) -> tuple[np.ndarray, int]:
    """(float32 mono samples, sample rate) of ``frames`` frames from frame ``offset`` of an audio
    file: a seek and a range read, so a 20 s segment of an hour-long FLAC costs about 20 s of
    reading. ``reader`` is an open binary file object to read through instead of opening ``path``
    (for example one that counts bytes); it is left open. Multi-channel audio is averaged."""
    path = Path(path)
    if offset < 0 or frames < 0:
        raise DataError(f"{path}: offset and frames must be non-negative, got {offset} and {frames}")
    try:
        f = reader if reader is not None else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be opened ({e.strerror})") from None
    try:
        with soundfile.SoundFile(f) as snd:
            if offset > snd.frames or (offset == snd.frames and frames > 0):
                raise DataError(f"{path}: offset {offset} is past the end ({snd.frames} frames)")
            snd.seek(offset)
            data, rate = snd.read(frames, dtype="float32", always_2d=True), snd.samplerate
            expected = min(frames, snd.frames - offset)
    except DataError:
        raise
    except soundfile.LibsndfileError as e:
        raise DataError(f"{path}: cannot be decoded ({e.error_string.rstrip('.')})") from None
    except RuntimeError as e:  # soundfile's own checks (unknown format, bad arguments)
        raise DataError(f"{path}: cannot be decoded ({type(e).__name__})") from None
    finally:
        if reader is None:
            f.close()
    if len(data) < expected:
        raise DataError(f"{path}: only {len(data)} of {expected} frames from offset {offset} decode (truncated?)")
    return (data[:, 0] if data.shape[1] == 1 else data.mean(1, dtype=np.float32)), rate
