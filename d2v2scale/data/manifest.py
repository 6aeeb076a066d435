"""A Libri-light-style tree of long recordings → a fairseq/wav2vec ``.tsv`` manifest with segments.

The first line is the absolute root folder; then ``relative/path<TAB>num_frames`` for a whole
file, and ``relative/path<TAB>num_frames<TAB>offset`` for each segment of a file longer than
``max_seconds`` (frames and offsets at the file's own rate). Rows are sorted by path, then offset.
No audio is rewritten: a segment is read with a seek (:func:`d2v2scale.data.segments.read_range`).

Headers are read in a thread pool (the work is waiting on storage, and soundfile releases the GIL
while decoding). A long file is decoded once, block by block, to place its cuts in pauses
(:func:`d2v2scale.data.segments.cut_points`). Tens of thousands of files take hours to decode, so
``OUT.state.json`` keeps each file's (size, mtime_ns, frames, rate, cuts): a re-run with the same
parameters opens only new or changed files.

The command is ``python -m d2v2scale.prepare audio ROOT OUT.tsv`` (:mod:`d2v2scale.prepare`).
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from tqdm import tqdm

from ..logs import LOG
from .headers import RATE, header_length
from ..atomic import atomic_output
from .files import AUDIO_SUFFIXES, DataError, walk
from .segments import cut_points, frame_energy

FRAME_S = 0.02  # energy frame: cuts fall on 20 ms boundaries
WINDOW_S = 1.0  # a cut is searched for in the last second before the length limit
BLOCK_S = 60  # seconds decoded at a time: an hour-long file never sits in memory whole
STATE_VERSION = 1
_NAMED = 3  # unreadable files named in the summary


@dataclass
class ManifestStats:
    """What :func:`build_manifest` did; ``skipped`` holds (relative path, reason)."""

    files: int = 0  # audio files listed
    reused: int = 0  # taken from the state file without opening the audio
    read: int = 0  # opened: new, changed, or all when the parameters changed
    segmented: int = 0  # written as segments
    rows: int = 0
    other_rates: int = 0  # files listed that are not 16 kHz (manifest lengths are read as 16 kHz samples)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a log."""
        short = sum(r.startswith("shorter than") for _, r in self.skipped)
        bad = [(p, r) for p, r in self.skipped if not r.startswith("shorter than")]
        named = "".join(f"; {p}: {r}" for p, r in bad[:_NAMED]) + ("; ..." if len(bad) > _NAMED else "")
        return (f"{self.rows} rows from {self.files} files ({self.reused} reused, {self.read} read, "
                f"{self.segmented} segmented); skipped {short} short, {len(bad)} unreadable{named}")


def _params(root: Path, max_seconds: float | None, min_seconds: float) -> dict:
    return {"version": STATE_VERSION, "root": str(root), "max_seconds": max_seconds, "min_seconds": min_seconds,
            "frame_s": FRAME_S, "window_s": WINDOW_S}


def _energy(path: Path, frame: int) -> tuple[np.ndarray, int]:
    """Frame energies of a whole file and the frames actually decoded (mono, block by block)."""
    parts, total = [], 0
    with open(path, "rb") as f, soundfile.SoundFile(f) as snd:
        block = max(1, BLOCK_S * snd.samplerate // frame) * frame
        for x in snd.blocks(blocksize=block, dtype="float32", always_2d=True):
            parts.append(frame_energy(x.mean(1) if x.shape[1] > 1 else x[:, 0], frame))
            total += len(x)
    return (np.concatenate(parts) if parts else np.zeros(0)), total


def _scan(path: Path, max_seconds: float | None, min_seconds: float) -> dict:
    """The state entry of one file: frames, rate and cuts, or the reason it cannot be used."""
    try:
        frames, rate = header_length(path)
    except (ValueError, EOFError, struct.error) as e:
        return {"error": f"unreadable audio header ({e})"}
    if not frames or not rate:
        return {"error": f"no audio samples or no sample rate in the header ({frames} frames, {rate} Hz)"}
    entry = {"frames": frames, "rate": rate, "cuts": []}
    if max_seconds is None or frames <= int(max_seconds * rate) or frames < min_seconds * rate:
        return entry
    frame = max(1, round(FRAME_S * rate))
    try:
        energy, decoded = _energy(path, frame)
    except RuntimeError as e:  # soundfile's errors are RuntimeErrors
        return {"error": f"cannot be decoded ({getattr(e, 'error_string', None) or type(e).__name__})"}
    if decoded != frames:
        return {"error": f"the header says {frames} frames but {decoded} decode (truncated?)"}
    entry["cuts"] = cut_points(energy, frames, frame, int(max_seconds * rate), math.ceil(min_seconds * rate),
                               round(WINDOW_S * rate))
    return entry


def _load_state(path: Path, params: dict) -> dict:
    """The per-file entries of a previous run with the same parameters, else nothing."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        LOG.warning(f"ignoring the manifest state {path} ({e}): every file is read again")
        return {}
    if not isinstance(state, dict) or state.get("params") != params or not isinstance(state.get("files"), dict):
        return {}
    return state["files"]


def read_manifest(path: Path) -> tuple[str, list[str], np.ndarray, np.ndarray | None]:
    """A fairseq/wav2vec ``.tsv``: the root folder, then ``relative/path<TAB>frames[<TAB>offset]``
    (the offset column: segments of a longer recording, see ``python -m d2v2scale.prepare audio``).
    Returns (root, names per row, frames per row, offsets per row (-1: a whole file) or None)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {path} cannot be read ({e})") from None
    if not lines or not lines[0].strip():
        raise DataError(f"manifest {path}: the first line must be the audio root folder")
    names, frames, offsets = [], [], []
    for k, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (2, 3) or not all(f.strip().isascii() and f.strip().isdigit() for f in fields[1:]):
            raise DataError(f"manifest {path}:{k}: expected 'relative/path<TAB>num_samples' (a segment: "
                            f"'<TAB>offset' after it), got {line[:80]!r}")
        names.append(fields[0])
        frames.append(int(fields[1]))
        offsets.append(int(fields[2]) if len(fields) == 3 else -1)
    offset = np.asarray(offsets, dtype=np.int64)
    return lines[0].strip(), names, np.asarray(frames, dtype=np.int64), offset if (offset >= 0).any() else None


def _rows(rel: str, e: dict) -> list[str]:
    if not e["cuts"]:
        return [f"{rel}\t{e['frames']}\n"]
    edges = [0, *e["cuts"], e["frames"]]
    return [f"{rel}\t{b - a}\t{a}\n" for a, b in zip(edges[:-1], edges[1:])]


def _check_args(root: Path, out: Path, max_seconds: float | None, min_seconds: float, threads: int) -> None:
    if not root.is_dir():
        raise DataError(f"audio root {root} {'is not a folder' if root.exists() else 'does not exist'}")
    if min_seconds < 0:
        raise DataError(f"min_seconds must be non-negative, got {min_seconds}")
    if max_seconds is not None and max_seconds <= min_seconds:
        raise DataError(f"max_seconds ({max_seconds}) must exceed min_seconds ({min_seconds})")
    if max_seconds is not None and max_seconds < FRAME_S:
        raise DataError(f"max_seconds ({max_seconds}) must be at least {FRAME_S:g} (one energy frame)")
    if threads < 1:
        raise DataError(f"threads must be at least 1, got {threads}")
    if out.is_dir():
        raise DataError(f"manifest output {out} is a folder")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise DataError(f"manifest output folder {out.parent} does not exist or is not writable")


def build_manifest(root: str | Path, out: str | Path, max_seconds: float | None, min_seconds: float, threads: int,
                   progress: bool = True) -> ManifestStats:
    """Write the manifest of every ``.flac``/``.wav`` under ``root`` to ``out`` (see module docstring):
    files under ``min_seconds`` and unreadable ones are skipped, files over ``max_seconds`` (when
    given) are listed as segments of at most ``max_seconds``."""
    root, out = Path(root).resolve(), Path(out).absolute()
    _check_args(root, out, max_seconds, min_seconds, threads)
    # sorted as the rows are, so rows stream to the file (Libri-light at 20 s is ~10M rows)
    files = [root / rel for rel in sorted(walk(root, AUDIO_SUFFIXES, threads)[0])]
    if not files:
        raise DataError(f"audio root {root} has no .flac or .wav files")
    state_path = out.with_name(out.name + ".state.json")
    params = _params(root, max_seconds, min_seconds)
    old = _load_state(state_path, params)
    stats = ManifestStats(files=len(files))

    def entry(path: Path) -> tuple[str, dict, bool]:
        rel = path.relative_to(root).as_posix()
        try:
            st = path.stat()  # follows links: a link's target decides whether it changed
            if stat.S_ISDIR(st.st_mode):
                return rel, {"error": "a directory, not a file"}, True
            prev = old.get(rel)
            if isinstance(prev, dict) and prev.get("size") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns:
                return rel, prev, False
            return rel, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **_scan(path, max_seconds, min_seconds)}, True
        except OSError as e:  # kept without size and mtime, so the next run tries again (storage hiccups pass)
            return rel, {"error": f"cannot be read ({e.strerror or e})"}, True

    bar = tqdm(total=len(files), unit="file", desc="manifest", disable=not progress or not sys.stderr.isatty())
    entries = {}
    try:
        with ThreadPoolExecutor(threads) as pool, bar, atomic_output(out) as f:
            f.write(f"{root}\n")
            for rel, e, fresh in pool.map(entry, files):
                bar.update()
                stats.read += fresh
                stats.reused += not fresh
                entries[rel] = e
                if "error" in e:
                    stats.skipped.append((rel, e["error"]))
                elif e["frames"] < min_seconds * e["rate"]:
                    stats.skipped.append((rel, f"shorter than {min_seconds:g} s"))
                else:
                    rows = _rows(rel, e)
                    f.writelines(rows)
                    stats.rows += len(rows)
                    stats.segmented += bool(e["cuts"])
                    stats.other_rates += e["rate"] != RATE
        with atomic_output(state_path) as f:
            json.dump({"params": params, "files": entries}, f, separators=(",", ":"))
    except OSError as e:
        raise DataError(f"cannot write the manifest {out} ({e.strerror or e})") from None
    return stats
