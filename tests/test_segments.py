"""Long recordings as segments: cuts in pauses within the length limit, an incremental manifest that
opens only changed files, and range reads that read (and decode) only the segment."""
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile

from d2v2scale.data import manifest as manifest_mod
from d2v2scale.data.files import DataError
from d2v2scale.data.manifest import build_manifest
from d2v2scale.data.segments import cut_points, frame_energy, read_range, segments

RATE = 16_000


def speech_like(seconds: float, seed: int, rate: int = RATE) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Speech-like float32 audio and its pauses as [start, end) samples: bursts of noise-modulated
    harmonic tones (0.4–0.8 s) between pauses of near-silence (0.25–0.5 s, amplitude 1e-4),
    starting with a pause."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    k = n // int(0.65 * rate) + 2  # pairs (pause, burst): more than enough to fill n
    lens = np.empty(2 * k, dtype=np.int64)
    lens[0::2] = rng.integers(int(0.25 * rate), int(0.5 * rate) + 1, k)
    lens[1::2] = rng.integers(int(0.4 * rate), int(0.8 * rate) + 1, k)
    edges = np.minimum(np.concatenate([[0], np.cumsum(lens)]), n)
    burst = np.repeat(np.arange(2 * k) % 2 == 1, np.diff(edges))
    freq = np.repeat(np.where(np.arange(2 * k) % 2 == 1, np.repeat(rng.uniform(90, 300, k), 2), 0.0), np.diff(edges))
    phase = np.cumsum(2 * np.pi * freq / rate)
    tone = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    step = rate // 100  # the noise envelope changes every 10 ms
    knots = np.arange(0, n + step, step)
    mod = np.interp(np.arange(n), knots, rng.uniform(0.3, 1.0, len(knots)))
    wav = np.where(burst, 0.2 * tone * mod + 0.03 * rng.standard_normal(n), 1e-4 * rng.standard_normal(n))
    pauses = [(int(edges[j]), int(edges[j + 1])) for j in range(0, 2 * k, 2) if edges[j] < n]
    return wav.astype(np.float32), pauses


def write_speech(path: Path, seconds: float, seed: int, rate: int = RATE, channels: int = 1) -> list[tuple[int, int]]:
    """A speech-like 16-bit file (format from the suffix; extra channels are quieter copies); its pauses."""
    wav, pauses = speech_like(seconds, seed, rate)
    if channels > 1:
        wav = np.stack([wav * (1 - 0.3 * c) for c in range(channels)], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wav, rate, subtype="PCM_16")
    return pauses


def libri_light_tree(root: Path, files: int = 20, minutes: tuple[float, float] = (5, 15), seed: int = 0) -> dict:
    """A Libri-light-sized tree (speaker/book/file.flac, 5–15 minutes each): relative path → pauses.
    About 0.25 s of CPU per minute of audio (~50 s in all), so the benchmark uses it, not the unit tests."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(files):
        rel = f"{i % 7:04d}/book{i % 3}/rec{i:03d}.flac"
        out[rel] = write_speech(root / rel, 60 * float(rng.uniform(*minutes)), seed + i)
    return out


# the unit-test tree: (relative path, seconds, rate, channels); 18 minutes of audio, ~5 s to write
LONG = [("100/emma/ch01.flac", 60, RATE, 1), ("100/emma/ch02.flac", 95, RATE, 1),
        ("100/persuasion/ch01.flac", 140, RATE, 1), ("2048/walden/part1.wav", 185, RATE, 1),
        ("2048/walden/part2.flac", 240, 8000, 2), ("77/odyssey/book1.flac", 360, RATE, 1)]
SHORT = [("100/emma/intro.flac", 8.5, RATE, 1), ("2048/walden/preface.wav", 20.0, RATE, 1),
         ("77/odyssey/title.flac", 3.0, RATE, 1)]
TOO_SHORT = [("77/odyssey/blip.flac", 1.0, RATE, 1)]
BAD = {"77/odyssey/broken.flac": b"fLaC" + bytes(10), "100/emma/empty.wav": b""}
MAX_S, MIN_S = 20, 2


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("librilight")
    spec = {}
    for i, (rel, seconds, rate, channels) in enumerate(LONG + SHORT + TOO_SHORT):
        pauses = write_speech(root / rel, seconds, seed=i, rate=rate, channels=channels)
        spec[rel] = {"frames": int(round(seconds * rate)), "rate": rate, "pauses": pauses}
    for rel, data in BAD.items():
        (root / rel).write_bytes(data)
    return root, spec


def parse(path: Path) -> tuple[str, list[tuple[str, int, int | None]]]:
    """(root line, rows as (path, frames, offset or None))."""
    lines = path.read_text().splitlines()
    rows = []
    for line in lines[1:]:
        f = line.split("\t")
        assert len(f) in (2, 3), line
        rows.append((f[0], int(f[1]), int(f[2]) if len(f) == 3 else None))
    return lines[0], rows


# ---------------------------------------------------------------- frame energy and cut placement


def test_frame_energy_matches_per_frame_means():
    rng = np.random.default_rng(0)
    for n, frame in [(0, 320), (319, 320), (2_500_003, 320), (100_001, 7), (5, 1)]:
        wav = rng.standard_normal(n).astype(np.float32)
        starts = np.arange(0, n, frame)
        sq = wav.astype(np.float64) ** 2
        expect = np.add.reduceat(sq, starts) / np.diff(np.append(starts, n)) if n else np.zeros(0)
        got = frame_energy(wav, frame)
        assert got.shape == (-(-n // frame),)
        np.testing.assert_allclose(got, expect, rtol=1e-9)


def brute_force_cut(energy, start, total, frame, max_len, min_len, window):
    """The documented rule, written out: every sample position of the window, one by one."""
    limit = min(start + max_len, total - min_len)
    lo = max(start + min_len, limit - window, start + 1)
    frames = [p for p in range(lo, limit + 1) if p % frame == 0]
    if not frames:
        return limit
    return min(frames, key=lambda p: (energy[p // frame], p))


def check_pieces(cuts, total, max_len):
    if total == 0:
        assert cuts == [] and segments(total, cuts) == []
        return
    edges = [0, *cuts, total]
    assert all(a < b for a, b in zip(edges[:-1], edges[1:])), cuts  # strictly increasing, no empty piece
    assert all(b - a <= max_len for a, b in zip(edges[:-1], edges[1:]))
    pieces = segments(total, cuts)
    assert sum(n for _, n in pieces) == total and pieces[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(pieces[:-1], pieces[1:]))


def test_cut_points_take_the_quietest_frame_of_each_window():
    for seed in range(400):
        rng = np.random.default_rng(seed)
        frame = int(rng.choice([1, 7, 32]))
        max_len = int(rng.integers(2 * frame, 60 * frame))
        min_len = int(rng.integers(0, max_len // 2 + 1))
        window = int(rng.integers(frame, 2 * max_len))
        total = int(rng.integers(0, 12 * max_len))
        # few distinct values, so ties are common and "the earliest" is exercised
        energy = rng.integers(0, 4, -(-total // frame)).astype(float) * rng.choice([1.0, 1e-6])
        cuts = cut_points(energy, total, frame, max_len, min_len, window)
        check_pieces(cuts, total, max_len)
        if total <= max_len:
            assert cuts == []
            continue
        assert all(n >= min_len for _, n in segments(total, cuts))
        start = 0
        for c in cuts:
            assert c == brute_force_cut(energy, start, total, frame, max_len, min_len, window), (seed, start)
            start = c


def test_cut_points_terminate_and_stay_within_the_limit_on_degenerate_input():
    for seed in range(400):
        rng = np.random.default_rng(1000 + seed)
        frame = int(rng.integers(1, 50))
        max_len = int(rng.integers(1, 200))
        min_len = int(rng.integers(-5, 2 * max_len + 2))  # over half, over max_len, negative
        window = int(rng.integers(-5, 2 * frame + 2))  # shorter than a frame, zero, negative
        total = int(rng.integers(0, 3000))
        energy = rng.random(int(rng.integers(0, -(-total // frame) + 2)))  # too short or too long
        energy[rng.random(energy.size) < 0.1] = np.nan
        cuts = cut_points(energy, total, frame, max_len, min_len, window)
        check_pieces(cuts, total, max_len)
    with pytest.raises(ValueError):
        cut_points(np.zeros(10), 100, 0, 10, 0, 10)
    with pytest.raises(ValueError):
        cut_points(np.zeros(10), 100, 10, 0, 0, 10)


# ---------------------------------------------------------------- the manifest


def test_manifest_cuts_long_files_in_pauses_and_lists_short_ones_whole(tree, tmp_path):
    root, spec = tree
    out = tmp_path / "train.tsv"
    stats = build_manifest(root, out, MAX_S, MIN_S, threads=2, progress=False)
    first, rows = parse(out)
    assert first == str(root.resolve())
    assert [(p, o or 0) for p, _, o in rows] == sorted((p, o or 0) for p, _, o in rows)
    by_file = {}
    for p, n, o in rows:
        by_file.setdefault(p, []).append((n, o))
    assert set(by_file) == {rel for rel, *_ in LONG + SHORT}
    for rel, *_ in LONG:
        s = spec[rel]
        frame, pieces = round(0.02 * s["rate"]), by_file[rel]
        assert all(o is not None for _, o in pieces)
        edges = [o for _, o in pieces] + [pieces[-1][1] + pieces[-1][0]]
        assert edges[0] == 0 and edges[-1] == s["frames"] == soundfile.info(str(root / rel)).frames
        assert [o + n for n, o in pieces[:-1]] == [o for _, o in pieces[1:]]  # each sample once, in order
        assert all(MIN_S * s["rate"] <= n <= MAX_S * s["rate"] for n, _ in pieces)
        for cut in edges[1:-1]:  # the quiet frame that starts each piece lies inside a pause
            assert any(a <= cut and cut + frame <= b for a, b in s["pauses"]), (rel, cut)
    for rel, *_ in SHORT:
        assert by_file[rel] == [(spec[rel]["frames"], None)]
    skipped = dict(stats.skipped)
    assert skipped["77/odyssey/blip.flac"].startswith("shorter than 2")
    assert "unreadable" in skipped["77/odyssey/broken.flac"] and "unreadable" in skipped["100/emma/empty.wav"]
    assert (stats.files, stats.read, stats.reused, stats.segmented, stats.rows) == (
        len(spec) + len(BAD), len(spec) + len(BAD), 0, len(LONG), len(rows))
    assert "broken.flac" in stats.summary() and "\n" not in stats.summary()


_OPENED: list[str] | None = None  # files opened while a test records (an audit hook cannot be removed)
_HOOKED = False


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _OPENED.append(os.fspath(args[0]))


@contextlib.contextmanager
def recording_opens() -> Iterator[list[str]]:
    """The paths Python opens inside the block (the ``open`` audit event)."""
    global _OPENED, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def build_watching(root: Path, out: Path, monkeypatch, max_s=MAX_S) -> tuple[manifest_mod.ManifestStats, set[str]]:
    """build_manifest, recording every Python-level open of a file under ``root``; soundfile opening
    paths itself (below Python) fails the test."""

    def refuse(*a, **k):
        raise AssertionError(f"soundfile opened a path itself: {a[:1]}")

    with monkeypatch.context() as m:
        for name in ("SoundFile", "info", "read"):
            m.setattr(soundfile, name, lambda file, *a, _real=getattr(soundfile, name), **k:
                      _real(file, *a, **k) if hasattr(file, "read") else refuse(file))
        with recording_opens() as paths:
            stats = build_manifest(root, out, max_s, MIN_S, threads=2, progress=False)
    return stats, {Path(p).relative_to(root).as_posix() for p in paths if Path(p).is_relative_to(root)}


def test_rerun_opens_nothing_and_a_touched_file_is_read_alone(tree, tmp_path, monkeypatch):
    src, spec = tree
    root = (tmp_path / "tree").resolve()
    shutil.copytree(src, root)
    out = tmp_path / "train.tsv"
    state = Path(f"{out}.state.json")
    stats, opened = build_watching(root, out, monkeypatch)
    assert stats.read == stats.files and {rel for rel, *_ in LONG + SHORT} <= opened
    manifest, saved = out.read_bytes(), state.read_bytes()

    stats, opened = build_watching(root, out, monkeypatch)
    assert opened == set() and (stats.reused, stats.read) == (stats.files, 0)
    assert out.read_bytes() == manifest and state.read_bytes() == saved
    assert stats.skipped and stats.segmented == len(LONG)  # skips and segments come from the state too

    touched = root / LONG[1][0]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    stats, opened = build_watching(root, out, monkeypatch)
    assert opened == {LONG[1][0]} and (stats.read, stats.reused) == (1, stats.files - 1)
    assert out.read_bytes() == manifest

    changed = root / SHORT[0][0]  # new content: the row follows it
    write_speech(changed, 12.0, seed=99)
    stats, opened = build_watching(root, out, monkeypatch)
    assert opened == {SHORT[0][0]}
    assert (SHORT[0][0], 12 * RATE, None) in parse(out)[1]

    stats, opened = build_watching(root, out, monkeypatch, max_s=30)  # new parameters: everything again
    assert stats.read == stats.files and stats.reused == 0
    assert all(n <= 30 * spec[p]["rate"] for p, n, _ in parse(out)[1] if p in spec)

    state.write_text("{not json")  # a damaged state is a cache miss, not an error
    stats, _ = build_watching(root, out, monkeypatch, max_s=30)
    assert stats.read == stats.files
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary files left


# ---------------------------------------------------------------- range reads


class CountingReader:
    """A binary file that counts the bytes read through it (soundfile calls readinto/seek/tell)."""

    def __init__(self, path: Path):
        self.f, self.bytes = open(path, "rb", buffering=0), 0

    def readinto(self, buf) -> int:
        n = self.f.readinto(buf)
        self.bytes += n
        return n

    def read(self, size=-1) -> bytes:
        data = self.f.read(size)
        self.bytes += len(data)
        return data

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()


def test_read_range_reads_only_the_segment_and_decodes_it_exactly(tree):
    root, spec = tree
    rel = LONG[-1][0]  # 6 minutes
    path, frames = root / rel, spec[rel]["frames"]
    full, rate = soundfile.read(path, dtype="float32")
    n = 20 * rate
    for offset in (frames // 2, 12345, frames - n):
        reader = CountingReader(path)
        try:
            wav, got_rate = read_range(path, offset, n, reader=reader)
        finally:
            reader.close()
        assert got_rate == rate and wav.dtype == np.float32
        np.testing.assert_array_equal(wav, full[offset : offset + n])
        share = n / frames * path.stat().st_size
        assert reader.bytes <= 1.5 * share + 64 * 1024, (offset, reader.bytes, share)
    with recording_opens() as opened:  # without a reader it opens the file in Python (countable), once
        wav, _ = read_range(path, 1000, 50)
    assert opened == [str(path)] and np.array_equal(wav, full[1000:1050])


def test_manifest_segments_read_back_to_the_whole_file(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "train.tsv"
    build_manifest(root, out, MAX_S, MIN_S, threads=1, progress=False)
    rows = parse(out)[1]
    for rel in (LONG[3][0], LONG[4][0]):  # a WAV, and a stereo 8 kHz FLAC (averaged to mono)
        full, _ = soundfile.read(root / rel, dtype="float32", always_2d=True)
        mono = full[:, 0] if full.shape[1] == 1 else full.mean(1)
        pieces = [read_range(root / p, o, n)[0] for p, n, o in rows if p == rel]
        assert len(pieces) > 1
        np.testing.assert_allclose(np.concatenate(pieces), mono, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- bad input


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


def test_bad_input_is_one_line(tree, tmp_path):
    root, spec = tree
    out = tmp_path / "m.tsv"
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = [
        ((tmp_path / "missing", out, 20, 2, 1), "does not exist"),
        ((tmp_path / "file.txt", out, 20, 2, 1), "is not a folder"),
        ((tmp_path / "empty", out, 20, 2, 1), "no .flac or .wav"),
        ((root, tmp_path / "nowhere" / "m.tsv", 20, 2, 1), "does not exist or is not writable"),
        ((root, tmp_path / "file.txt" / "m.tsv", 20, 2, 1), "does not exist or is not writable"),
        ((root, tmp_path, 20, 2, 1), "is a folder"),
        ((root, out, 2, 2, 1), "must exceed min_seconds"),
        ((root, out, 20, -1, 1), "non-negative"),
        ((root, out, 20, 2, 0), "threads"),
    ]
    for args, words in cases:
        with pytest.raises(DataError) as e:
            build_manifest(*args, progress=False)
        assert words in one_line(e), (args, str(e.value))
    assert not out.exists()

    long = root / LONG[0][0]
    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(b"fLaC" + os.urandom(4000))
    for args, words in [((tmp_path / "none.flac", 0, 10), "cannot be opened"), ((garbage, 0, 10), "cannot be decoded"),
                        ((long, spec[LONG[0][0]]["frames"] + 1, 10), "past the end"), ((long, -1, 10), "non-negative")]:
        with pytest.raises(DataError) as e:
            read_range(*args)
        assert words in one_line(e) and str(args[0]) in str(e.value), str(e.value)
