"""Speech (Libri-light / LibriSpeech style) through DALI's CPU audio decoder.

Inputs: a fairseq/wav2vec manifest (``.tsv``: first line the root folder, then
``path<TAB>num_samples``, optionally ``<TAB>offset`` for a segment of a longer recording, as
``python -m d2v2scale.prepare audio`` writes), a folder of ``.wav``/``.flac`` files (lengths read
from the headers, once per job, see :mod:`.index`), or a prepared index. Whole files are decoded to
16 kHz mono float (DALI ``decoders.audio``: CPU only, the GPU takes over from the model's first
layer); a segment is read by a seek and a range read of its frames only (libsndfile, see
:mod:`.segments`), never by decoding its whole recording. Each utterance is normalised (zero mean,
unit variance: fairseq's ``normalize: true``) and randomly cropped to ``data.max_sample_size``;
utterances shorter than ``data.min_sample_size`` are left out.

Batching is by total samples: utterances are sorted by length and cut into micro-batches whose
padded size (count × longest) stays within ``data.max_tokens`` — length bucketing keeps padding
small. The list of micro-batches is fixed; every epoch visits it in a new seeded order. Step ``s``
on DP rank ``r`` reads micro-batches ``(s·dp + r)·grad_accum + i``, so which audio a rank reads,
and its crop offsets, are functions of the step: no loader state beyond it. A file that fails to
read or decode is logged once and its slot takes the next usable member of the same micro-batch
(the budget still holds, and the choice is the same in every layout).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .. import counter_rng
from ..logs import LOG
from .files import AUDIO_SUFFIXES, DataError, log_once, read_file
from .headers import RATE, samples_at_rate
from .index import DataIndex
from .indexing import IndexRules, as_index
from .schedule import epoch_permutation
from .segments import read_range

_STREAM_CROP = 12
_STREAM_SUBSTITUTE = 14
MAX_ATTEMPTS = 64  # micro-batches tried for one id before the data set is declared unusable
# A folder or file list has each header read once (a row needs its length); a manifest's lengths are trusted.
AUDIO_INDEX = IndexRules("audio", AUDIO_SUFFIXES, manifest=True, length=samples_at_rate)


def bucket_batches(lengths: np.ndarray, max_tokens: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy batches over length-sorted utterances with count × padded length ≤ max_tokens, as
    (members in batch order, batch bounds): batch k is ``order[bounds[k]:bounds[k + 1]]``.

    Vectorised, since every rank computes it at start-up (7 M segments): a batch starting at ``s``
    holds the largest ``k`` with ``k × sizes[s + k - 1] ≤ max_tokens`` (sizes ascend, so the last
    member is the longest and the condition, once false, stays false); one pass per batch size
    finds it for every ``s`` at once, then the batches are chained from position 0."""
    clipped = np.minimum(np.asarray(lengths, dtype=np.int64), max_size)
    order = np.argsort(clipped, kind="stable")
    sizes, n = clipped[order], len(order)
    count = np.ones(n, dtype=np.int64)  # one utterance always fits (max_size <= max_tokens)
    fits = np.ones(n, dtype=bool)
    for k in range(2, n + 1):
        fits[n - k + 1 :] = False  # no k-th member past the end
        fits[: n - k + 1] &= k * sizes[k - 1 :] <= max_tokens
        if not fits.any():
            break
        count += fits
    bounds, start, counts = [0], 0, count.tolist()
    while start < n:
        start += counts[start]
        bounds.append(start)
    return order, np.asarray(bounds, dtype=np.int64)


def _decoder_pipeline(max_batch: int, threads: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=max_batch, num_threads=threads, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        audio, _ = fn.decoders.audio(encoded, dtype=types.FLOAT, downmix=True, sample_rate=RATE)
        return audio

    p = pipe()
    p.build()
    return p


def normalize(wav: np.ndarray) -> np.ndarray:
    """Per-utterance zero mean, unit variance (fairseq ``normalize: true``, i.e. ``F.layer_norm``)."""
    wav = wav.astype(np.float32, copy=False)
    return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _single_decoder():
    return _decoder_pipeline(1, 1)


def decode_audio(data: np.ndarray) -> np.ndarray:
    """Encoded WAV/FLAC bytes → 16 kHz mono float32 (DALI, or soundfile without DALI)."""
    try:
        pipe = _single_decoder()
    except ImportError:
        import io

        import soundfile

        return _to_mono_16k(*soundfile.read(io.BytesIO(data.tobytes()), dtype="float32"))
    try:
        pipe.feed_input("encoded", [data])
        return np.array(pipe.run()[0][0], dtype=np.float32).reshape(-1)
    except Exception as e:  # noqa: BLE001 - DALI reports decoder failures with several exception types
        _single_decoder.cache_clear()  # a pipeline that raised is no longer usable
        raise DataError(f"failed to decode ({type(e).__name__})") from None


def sample_problem(wav: np.ndarray) -> str | None:
    """Why decoded audio cannot be trained on, judged by value: nothing decoded, or NaN/inf samples."""
    if wav.size == 0:
        return "decoded to no samples"
    return None if np.isfinite(wav).all() else "NaN or infinite samples"


def load_audio(path: str | Path) -> np.ndarray:
    """An audio file as the model's input: 16 kHz mono float32, normalised as in training."""
    path = Path(path)
    data, reason = read_file(path)
    if reason is not None:
        raise DataError(f"{path}: {reason}")
    wav = decode_audio(data)
    reason = sample_problem(wav)
    if reason is not None:
        raise DataError(f"{path}: {reason}")
    return normalize(wav)


class AudioSource:
    """Token-budget micro-batches, read by global micro-batch id (see module docstring)."""

    by_batch = True

    def __init__(self, index: DataIndex | str, max_tokens: int, min_size: int, max_size: int, seed: int,
                 threads: int = 2, verbose: bool = True):
        self.index = as_index(index, AUDIO_INDEX)
        if max_size > max_tokens:
            raise DataError(f"data.max_sample_size={max_size} exceeds data.max_tokens={max_tokens}: "
                            "a single crop would not fit a micro-batch")
        self.rows = np.flatnonzero(self.index.length >= min_size)  # the usable rows of the index
        if not len(self.rows):
            raise DataError(f"data.path '{self.index.meta.get('signature', {}).get('source', self.index.root)}' has "
                            f"no audio of at least {min_size} samples ({len(self.index)} indexed)")
        self.max_size, self.seed, self.verbose, self.threads = max_size, seed, verbose, threads
        self.order, self.bounds = bucket_batches(self.index.length[self.rows], max_tokens, max_size)
        self.max_count = int(np.diff(self.bounds).max())
        self.bad: dict[int, str] = {}  # row → why it is unusable (found by this rank, at read time)
        self.logged: set[str] = set()  # paths already logged in this run (by this rank, or rank 0 for others)
        for path, reason in self.index.skipped:  # found by the builder: its header did not read
            log_once(self.logged, path, reason, verbose)
        try:
            self.pipe = _decoder_pipeline(self.max_count, threads)
        except ImportError:
            self.pipe = None
            if verbose:
                LOG.warning("NVIDIA DALI is not installed: decoding audio with soundfile")

    @property
    def num_batches(self) -> int:
        return len(self.bounds) - 1

    @property
    def skipped(self) -> int:
        return len(self.index.skipped) + len(self.bad)

    def skipped_files(self) -> dict[str, str]:
        """path → why, of the files the builder could not index and this rank found unusable."""
        return {**dict(self.index.skipped), **{str(self.index.path(i)): why for i, why in self.bad.items()}}

    def batch_rows(self, k: int) -> np.ndarray:
        """The index rows of bucket ``k``."""
        return self.rows[self.order[self.bounds[k] : self.bounds[k + 1]]]

    def _batch_members(self, batch_id: int) -> list[int]:
        n = self.num_batches
        epoch, k = divmod(batch_id, n)
        return self.batch_rows(int(epoch_permutation(n, self.seed, epoch)[k])).tolist()

    def mark_bad(self, i: int, reason: str) -> None:
        """Never read row ``i`` again; one log line per file per run."""
        if i not in self.bad:
            self.bad[i] = reason
            log_once(self.logged, str(self.index.path(i)), reason, self.verbose)

    def _decode(self, members: list[int]) -> list[np.ndarray | None]:
        """Waveforms of ``members``; None for rows known or found to be unusable."""
        todo = [i for i in members if i not in self.bad]
        offset = self.index.offset
        segments = {i for i in todo if offset is not None and offset[i] >= 0}
        whole = [i for i in todo if i not in segments]
        decoded = dict(zip(whole, self._decode_all(whole))) if whole else {}
        decoded.update({i: self._read_segment(i) for i in segments})
        return [decoded.get(i) for i in members]

    def _read_segment(self, i: int) -> np.ndarray | None:
        """A segment's frames only: a seek and a range read, resampled to 16 kHz."""
        try:
            wav, rate = read_range(self.index.path(i), int(self.index.offset[i]), int(self.index.length[i]))
        except DataError as e:
            self.mark_bad(i, str(e).split(": ", 1)[-1])
            return None
        return _to_mono_16k(wav, rate)

    def _decode_all(self, members: list[int]) -> list[np.ndarray | None]:
        read = [read_file(self.index.path(i)) for i in members]
        for i, (_, problem) in zip(members, read):
            if problem is not None:
                self.mark_bad(i, problem)
        ok = [(i, data) for i, (data, problem) in zip(members, read) if problem is None]
        out = dict.fromkeys(members)
        if self.pipe is not None and ok:
            try:
                self.pipe.feed_input("encoded", [data for _, data in ok])
                (decoded,) = self.pipe.run()
                out.update({i: np.array(decoded[j]).reshape(-1) for j, (i, _) in enumerate(ok)})
                return [out[i] for i in members]
            except Exception:  # noqa: BLE001 - DALI reports decoder failures with several exception types
                self.pipe = _decoder_pipeline(self.max_count, self.threads)  # one that raised is no longer usable
        for i, data in ok:  # one at a time, to find the file that fails
            try:
                out[i] = decode_audio(data)
            except Exception:  # noqa: BLE001 - DataError from DALI, soundfile's own errors without it
                self.mark_bad(i, "failed to decode")
        return [out[i] for i in members]

    def _usable(self, members: list[int]) -> list[np.ndarray | None]:
        waves = self._decode(members)
        for j, (i, w) in enumerate(zip(members, waves)):
            reason = None if w is None else sample_problem(w)
            if reason is not None:
                waves[j] = None
                self.mark_bad(i, reason)
        return waves

    def _waves(self, batch_id: int) -> list[np.ndarray]:
        """The waveforms of micro-batch ``batch_id``: an unusable member's slot takes the next usable
        member (cyclically: same budget); a micro-batch with none usable reads a substitute bucket
        chosen by the counter RNG from (batch id, attempt). Either way the same in every layout."""
        members = self._batch_members(batch_id)
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                key = counter_rng.combine(self.seed, _STREAM_SUBSTITUTE, batch_id, attempt)
                members = self.batch_rows(int(key) % self.num_batches).tolist()
            waves = self._usable(members)
            good = [j for j, w in enumerate(waves) if w is not None]
            if good:
                return [w if w is not None else waves[min(good, key=lambda g: (g - j) % len(waves))]
                        for j, w in enumerate(waves)]
        raise DataError(f"every file of micro-batch {batch_id} and of {MAX_ATTEMPTS - 1} substitutes is unusable "
                        f"({len(self.bad)} files found so far): is the data set damaged?")

    def batch_by_id(self, batch_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(waveforms (B, S) zero-padded, lengths (B,), sample ids (B,)) of one micro-batch."""
        waves = self._waves(batch_id)
        ids = torch.arange(batch_id * self.max_count, batch_id * self.max_count + len(waves), dtype=torch.int64)
        offsets = counter_rng.uniform(counter_rng.combine(self.seed, ids).reshape(-1), 1, _STREAM_CROP)[:, 0]
        crops = []
        for w, u in zip(waves, offsets.tolist()):
            w = normalize(w)
            if len(w) > self.max_size:
                start = int(u * (len(w) - self.max_size + 1))
                w = w[start : start + self.max_size]
            crops.append(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        lengths = torch.tensor([len(c) for c in crops], dtype=torch.int64)
        out = torch.zeros(len(crops), int(lengths.max()))
        for j, c in enumerate(crops):
            out[j, : len(c)] = c
        return out, lengths, ids


def _to_mono_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """soundfile fallback: downmix and resample (linear interpolation) to 16 kHz."""
    if audio.ndim == 2:
        audio = audio.mean(1)
    if rate != RATE:
        n = int(round(len(audio) * RATE / rate))
        audio = np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio).astype(np.float32)
    return audio
