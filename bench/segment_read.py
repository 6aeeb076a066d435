"""Reading one 20-s segment of a long FLAC with a seek and a range read vs decoding the whole file.

Writes a 1-minute and a 15-minute speech-like FLAC (16 kHz, 16-bit; the generator of
tests/test_segments.py) to a temporary folder, then measures side by side, in one run, the median
time and the bytes read (``rchar`` of /proc/self/io: bytes through read calls, page cache warm) of
:func:`d2v2scale.data.segments.read_range` on the 20 s in the middle of each file, and of
``soundfile.read`` of the whole file. A range read should cost the same for both files; a whole
decode grows with the file. ``--tree`` also times :func:`d2v2scale.data.manifest.build_manifest`
on a Libri-light-sized tree (20 files of 5–15 minutes), first run and re-run.

    python bench/segment_read.py [--minutes 1,15] [--segment 20] [--repeats 11] [--tree]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import soundfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from d2v2scale.data.manifest import build_manifest  # noqa: E402
from d2v2scale.data.segments import read_range  # noqa: E402
from test_segments import libri_light_tree, write_speech  # noqa: E402


def rchar() -> int | None:
    """Bytes this process has passed through read calls so far (None where /proc is absent)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(fns: list, repeats: int) -> list[tuple[float, int | None]]:
    """Median seconds and median bytes read of each of ``fns`` (after one warm-up call each). The
    calls take turns, so a load that comes and goes on the machine touches all of them alike."""
    for fn in fns:
        fn()
    times, reads = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            r0, t0 = rchar(), time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
            r1 = rchar()
            reads[i].append(None if r0 is None or r1 is None else r1 - r0)
    return [(statistics.median(t), None if None in r else int(statistics.median(r))) for t, r in zip(times, reads)]


def manifest_times(root: Path, threads: int) -> None:
    t0 = time.perf_counter()
    libri_light_tree(root)
    print(f"Libri-light-sized tree written in {time.perf_counter() - t0:.0f} s")
    out = root.parent / "train.tsv"
    for run in ("first run", "re-run"):
        t0 = time.perf_counter()
        stats = build_manifest(root, out, 20, 2, threads, progress=False)
        print(f"  build_manifest {run:9s} ({threads} threads): {time.perf_counter() - t0:7.2f} s  {stats.summary()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", default="1,15", help="lengths of the two files, comma-separated")
    p.add_argument("--segment", type=float, default=20.0, help="seconds read from the middle")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--tree", action="store_true", help="also time build_manifest on 20 files of 5-15 min")
    p.add_argument("--threads", type=int, default=2, help="build_manifest threads (with --tree)")
    args = p.parse_args()
    minutes = [float(m) for m in args.minutes.split(",")]
    if len(minutes) != 2 or min(minutes) * 60 <= args.segment or args.repeats < 1:
        p.error("--minutes needs two lengths longer than --segment, and --repeats at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        fns, sizes = [], []
        for i, m in enumerate(minutes):
            path = Path(tmp) / f"rec{m:g}min.flac"
            write_speech(path, 60 * m, seed=i)
            info = soundfile.info(str(path))
            n = int(args.segment * info.samplerate)
            offset = (info.frames - n) // 2
            fns += [lambda p=path, o=offset, n=n: read_range(p, o, n), lambda p=path: soundfile.read(p, dtype="float32")]
            sizes.append(path.stat().st_size)
        res = measure(fns, args.repeats)
        rows = [(m, size, res[2 * i], res[2 * i + 1]) for i, (m, size) in enumerate(zip(minutes, sizes))]
        mb = lambda b: "n/a" if b is None else f"{b / 1e6:.2f} MB"  # noqa: E731
        print(f"{args.segment:g}-s segment from the middle of a speech-like 16 kHz FLAC, median of {args.repeats}:")
        print(f"  {'file':>7} {'size':>9} | {'read_range':>10} {'read':>9} | {'whole decode':>12} {'read':>9} | whole/range")
        for m, size, (t_r, b_r), (t_w, b_w) in rows:
            print(f"  {m:5g} m {mb(size):>9} | {t_r * 1e3:7.1f} ms {mb(b_r):>9} | {t_w * 1e3:9.1f} ms {mb(b_w):>9} |"
                  f" {t_w / t_r:6.1f}x")
        (_, _, (t1, b1), (w1, c1)), (m2, _, (t2, b2), (w2, c2)) = rows
        ratio = lambda a, b: "n/a" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
        print(f"  ratio {minutes[1]:g}-min / {minutes[0]:g}-min: read_range time {t2 / t1:.2f}, bytes {ratio(b2, b1)}"
              f"  (whole decode: time {w2 / w1:.2f}, bytes {ratio(c2, c1)})")
        if args.tree:
            manifest_times(Path(tmp) / "tree", args.threads)


if __name__ == "__main__":
    main()
