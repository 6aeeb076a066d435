"""Speech (Libri-light / LibriSpeech style) through DALI's CPU audio decoder.

Inputs: a fairseq/wav2vec manifest (``.tsv``: first line the root folder, then ``path<TAB>num_samples``)
or a folder of ``.wav``/``.flac`` files (lengths read from the file headers). Each utterance is
decoded to 16 kHz mono float (DALI ``decoders.audio``: CPU only, the GPU takes over from the
model's first layer), normalised per utterance (zero mean, unit variance: fairseq's
``normalize: true``), and randomly cropped to ``data.max_sample_size``; utterances shorter than
``data.min_sample_size`` are dropped at indexing time.

Batching is by total samples: utterances are sorted by length and cut into micro-batches whose
padded size (count × longest) stays within ``data.max_tokens`` — length bucketing keeps padding
small. The list of micro-batches is fixed; every epoch visits it in a new seeded order. Step ``s``
on DP rank ``r`` reads micro-batches ``(s·dp + r)·grad_accum + i``, so which audio a rank reads,
and its crop offsets, are functions of the step: no loader state beyond it.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..logs import LOG
from ..model import counter_rng
from .files import AUDIO_SUFFIXES, DataError, list_files, log_skipped, screen

RATE = 16_000
_STREAM_CROP = 12


WAV_ENCODINGS = {1: "PCM", 3: "IEEE float", 0xFFFE: "extensible"}


def wav_header(path: Path) -> tuple[int, int]:
    """(frames, sample rate) of a RIFF/WAVE file: PCM or IEEE-float, any chunk order. The frame
    count is capped by the bytes actually present (a truncated file or a header-only one)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError("not a RIFF/WAVE file")
        block = rate = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise ValueError("no data chunk")
            cid, length = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"fmt ":
                body = f.read(length + (length & 1))
                tag, channels, rate = struct.unpack("<HHI", body[:8])
                block = struct.unpack("<H", body[12:14])[0]
                if tag not in WAV_ENCODINGS or not channels or not block:
                    raise ValueError(f"unsupported WAV encoding {tag}, {channels} channels")
            elif cid == b"data":
                if block is None:
                    raise ValueError("data chunk before the fmt chunk")
                return min(length, size - f.tell()) // block, rate
            else:
                f.seek(length + (length & 1), 1)


def header_length(path: Path) -> tuple[int, int]:
    """(frames, sample rate) from a WAV or FLAC header, without decoding."""
    if path.suffix.lower() == ".wav":
        return wav_header(path)
    with open(path, "rb") as f:
        head = f.read(42)  # "fLaC" + metadata block header (4) + STREAMINFO (34)
    if len(head) < 42 or head[:4] != b"fLaC":
        raise ValueError("no FLAC STREAMINFO")
    info = int.from_bytes(head[18:26], "big")  # 20 bits rate, 3 channels, 5 bps, 36 total samples
    return info & ((1 << 36) - 1), info >> 44


@dataclass
class Utterance:
    path: Path
    length: int  # samples at 16 kHz


def index_manifest(path: Path) -> list[tuple[Path, int]]:
    """(file, length in samples) of a fairseq/wav2vec ``.tsv`` manifest: the first line is the root
    folder, then ``relative/path<TAB>num_samples``."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {path} cannot be read ({e})") from None
    if not lines or not lines[0].strip():
        raise DataError(f"manifest {path}: the first line must be the audio root folder")
    base = Path(lines[0].strip())
    out = []
    for k, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[1].strip().isdigit():
            raise DataError(f"manifest {path}:{k}: expected 'relative/path<TAB>num_samples', got {line[:80]!r}")
        out.append((base / fields[0], int(fields[1])))
    return out


@functools.lru_cache(maxsize=4)
def index_audio(path: str, min_size: int, verbose: bool) -> tuple[list[Utterance], list[tuple[Path, str]]]:
    """Usable utterances and (path, reason) for every skipped file (memoised, like
    :func:`~d2v2scale.data.files.build_index`)."""
    root = Path(path)
    entries: list[tuple[Path, int | None, int | None]] = []
    if root.suffix == ".tsv":
        entries = [(p, n, None) for p, n in index_manifest(root)]
    else:
        entries = [(p, None, None) for p in list_files(root, AUDIO_SUFFIXES)]
    usable, skipped = [], []
    for p, frames, rate in entries:
        reason = screen(p)
        if reason is None:
            try:
                hdr_frames, rate = header_length(p)
                frames = frames if frames is not None else hdr_frames
            except (OSError, ValueError, EOFError, struct.error) as e:
                reason = f"unreadable audio header ({e})"
        if reason is None and rate and frames == 0:
            reason = "no audio samples"
        if reason is not None:
            skipped.append((p, reason))
            continue
        length = int(frames * RATE // rate) if rate else int(frames)
        if length >= min_size:
            usable.append(Utterance(p, length))
    if not usable:
        example = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"data.path '{path}' has no usable audio of at least {min_size} samples "
                        f"({len(entries)} listed, {len(skipped)} unusable{example})")
    if verbose:
        log_skipped(skipped)
    return usable, skipped


def bucket_batches(lengths: list[int], max_tokens: int, max_size: int) -> list[list[int]]:
    """Greedy batches over length-sorted utterances with count × padded length ≤ max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (min(lengths[i], max_size), i))
    batches, current, longest = [], [], 0
    for i in order:
        n = min(lengths[i], max_size)
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


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
    reason = screen(path)
    if reason is not None:
        raise DataError(f"{path}: {reason}")
    wav = decode_audio(np.fromfile(path, dtype=np.uint8))
    reason = sample_problem(wav)
    if reason is not None:
        raise DataError(f"{path}: {reason}")
    return normalize(wav)


class AudioSource:
    """Token-budget micro-batches, read by global micro-batch id (see module docstring)."""

    by_batch = True

    def __init__(self, path: str, max_tokens: int, min_size: int, max_size: int, seed: int,
                 threads: int = 2, verbose: bool = True):
        self.utts, self.screened = index_audio(path, min_size, verbose)
        if max_size > max_tokens:
            raise DataError(f"data.max_sample_size={max_size} exceeds data.max_tokens={max_tokens}: "
                            "a single crop would not fit a micro-batch")
        self.max_size, self.seed, self.verbose = max_size, seed, verbose
        self.batches = bucket_batches([u.length for u in self.utts], max_tokens, max_size)
        self.max_count = max(len(b) for b in self.batches)
        self.bad: set[int] = set()
        try:
            self.pipe = _decoder_pipeline(self.max_count, threads)
        except ImportError:
            self.pipe = None
            if verbose:
                LOG.warning("NVIDIA DALI is not installed: decoding audio with soundfile")

    @property
    def skipped(self) -> int:
        return len(self.screened) + len(self.bad)

    def skipped_files(self) -> set[str]:
        return {str(p) for p, _ in self.screened} | {str(self.utts[i].path) for i in self.bad}

    def _batch_members(self, batch_id: int) -> list[int]:
        n = len(self.batches)
        epoch, k = divmod(batch_id, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return self.batches[int(perm[k])]

    def mark_bad(self, i: int, reason: str) -> None:
        """Never read utterance ``i`` again; one log line per file per run."""
        if i not in self.bad:
            self.bad.add(i)
            if self.verbose:
                LOG.warning(f"skipping {self.utts[i].path}: {reason}")

    def _decode(self, members: list[int]) -> list[np.ndarray | None]:
        """Waveforms of ``members``; None for files known or found to be undecodable."""
        todo = [i for i in members if i not in self.bad]
        decoded = dict(zip(todo, self._decode_all(todo))) if todo else {}
        return [decoded.get(i) for i in members]

    def _decode_all(self, members: list[int]) -> list[np.ndarray | None]:
        data = [np.fromfile(self.utts[i].path, dtype=np.uint8) for i in members]
        if self.pipe is not None:
            try:
                self.pipe.feed_input("encoded", data)
                (out,) = self.pipe.run()
                return [np.array(out[j]).reshape(-1) for j in range(len(members))]
            except Exception:  # noqa: BLE001 - DALI reports decoder failures with several exception types
                self.pipe = _decoder_pipeline(self.max_count, 1)  # a pipeline that raised is no longer usable
        out = []
        for i, d in zip(members, data):  # one at a time, to find the file that fails
            try:
                out.append(decode_audio(d))
            except Exception:  # noqa: BLE001 - DataError from DALI, soundfile's own errors without it
                self.mark_bad(i, "failed to decode")
                out.append(None)
        return out

    def batch_by_id(self, batch_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(waveforms (B, S) zero-padded, lengths (B,), sample ids (B,)) of one micro-batch."""
        members = self._batch_members(batch_id)
        waves = self._decode(members)
        for j, (i, w) in enumerate(zip(members, waves)):
            reason = None if w is None else sample_problem(w)
            if reason is not None:
                waves[j] = None
                self.mark_bad(i, reason)
        keep = [j for j, w in enumerate(waves) if w is not None]
        if not keep:
            raise RuntimeError(f"every file of micro-batch {batch_id} failed to decode")
        ids = torch.tensor([batch_id * self.max_count + j for j in keep], dtype=torch.int64)
        offsets = counter_rng.uniform(counter_rng.combine(self.seed, ids).reshape(-1), 1, _STREAM_CROP)[:, 0]
        crops = []
        for w, u in zip((waves[j] for j in keep), offsets.tolist()):
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
