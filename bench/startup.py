"""Start-up before the first step against the number of data entries, unprepared and prepared.

Generated data sets (hard links to a few real files, so the disk holds names, not bytes):

- image folders of 2k / 20k / 200k JPEGs in 1000-file class folders;
- audio manifests of 20k / 200k / 2M rows (``d<k>/f<j>.flac``; the ``d<k>`` folders are links to one
  folder of 2000 linked FLACs, so every row names a distinct, readable path).

Two measurements, side by side in one run:

1. **in-process**, the data part alone: the builder's index time (``ensure_index``: listing and
   sampling a folder, parsing a manifest), a reading rank's time (``read_built_index``: mapping the
   builder's file) and the index's bytes in memory;
2. **black-box**: a whole launch with ``train.max_updates=1`` on 1 and 4 CPU ranks (torchrun,
   ``ds_configs/cpu_tiny.json``), unprepared (``data.path`` = the folder / manifest) and prepared
   (``python -m d2v2scale.prepare``), and its growth per entry against the smallest size.

    python bench/startup.py [--images 2000,20000,200000] [--rows 20000,200000,2000000] [--ranks 1,4]
                            [--repeat 2] [--no-launch]

The page cache is warm (this machine cannot drop it): a cold shared file system makes the
unprepared numbers larger, the prepared ones do not change (one open per rank).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from d2v2scale.data.audio import AUDIO_INDEX  # noqa: E402
from d2v2scale.data.images import IMAGE_INDEX  # noqa: E402
from d2v2scale.data.index import SUFFIX, save_index  # noqa: E402
from d2v2scale.data.indexing import IndexRules, IndexSpec, build_index, ensure_index, publish, read_ticket  # noqa: E402
from d2v2scale.prepare import main as prepare  # noqa: E402

PER_FOLDER = 1000
POOL = 2000


def image_folder(root: Path, n: int, sources: list[Path]) -> Path:
    """``n`` links to ``sources`` in turn (a file takes at most 65 000 links on ext4)."""
    folder = root / f"images_{n}"
    for i in range(n):
        sub = folder / f"n{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            sub.mkdir(parents=True)
        os.link(sources[i % len(sources)], sub / f"{i:08d}.jpg")
    return folder


def audio_manifest(root: Path, n: int, pool: Path) -> Path:
    """``n`` rows over ``n / POOL`` linked folders of the pool; lengths as a manifest states them."""
    tree = root / f"audio_{n}"
    tree.mkdir()
    for k in range(-(-n // POOL)):
        (tree / f"d{k:05d}").symlink_to(pool, target_is_directory=True)
    lengths = np.random.default_rng(0).integers(32_000, 320_000, n)
    path = root / f"audio_{n}.tsv"
    with open(path, "w") as f:
        f.write(f"{tree}\n")
        f.writelines(f"d{i // POOL:05d}/f{i % POOL:04d}.flac\t{lengths[i]}\n" for i in range(n))
    return path


def in_process(source: Path, rules: IndexRules, cache: Path) -> tuple[float, float, float]:
    """(builder s: index and publish, reader s: map the published file, MB in memory)."""
    cache.unlink(missing_ok=True)
    spec = IndexSpec(str(source), rules, str(cache), 8)
    t0 = time.perf_counter()
    built = ensure_index(spec)
    ticket = publish(built, spec)
    t1 = time.perf_counter()
    read_ticket(ticket)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, built.nbytes() / 1e6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, run_dir: Path, overrides: list[str]) -> float:
    prefix = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  f"--nproc_per_node={ranks}", f"--master_port={_port()}"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [*prefix, "launchers/pretrain.py", "--ds_config", "ds_configs/cpu_tiny.json", "--run_dir", str(run_dir),
           "train.max_updates=1", "train.allow_long_warmup=true", "data.num_workers=2", "data.prefetch_steps=0",
           *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"launch failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    shutil.rmtree(run_dir)
    return time.perf_counter() - t0


def table(title: str, sizes: list[int], rows: dict[str, list[float]]) -> None:
    """Seconds (or MB) per size, and the growth per entry between the smallest and largest size
    (µs, or bytes for MB rows)."""
    print(f"\n{title}")
    print(f"| {'':36} | " + " | ".join(f"{n:>9,}" for n in sizes) + " | growth per entry |")
    print("|" + "-" * 38 + "|" + "|".join("-" * 11 for _ in sizes) + "|------------------|")
    for name, values in rows.items():
        growth = (values[-1] - values[0]) / (sizes[-1] - sizes[0]) * 1e6 if len(values) > 1 else float("nan")
        unit = "bytes" if name.endswith("MB") else "µs"
        cells = " | ".join(f"{v:>9.4g}" for v in values)
        print(f"| {name:36} | {cells} | {growth:>8.2f} {unit:5} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="2000,20000,200000")
    p.add_argument("--rows", default="20000,200000,2000000")
    p.add_argument("--ranks", default="1,4")
    p.add_argument("--no-launch", action="store_true", help="in-process measurements only")
    p.add_argument("--repeat", type=int, default=2, help="launches per cell; the fastest is kept (default 2)")
    args = p.parse_args()
    image_sizes = [int(v) for v in args.images.split(",")]
    row_sizes = [int(v) for v in args.rows.split(",")]
    ranks = [int(v) for v in args.ranks.split(",")]
    from data_fixtures import make_audio, make_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jpegs = make_jpegs(tmp / "seed_jpegs", 16)["good"]
        flac = next(p for p in make_audio(tmp / "seed_audio", 4) if p.suffix == ".flac")
        pool = tmp / "pool"
        pool.mkdir()
        for j in range(POOL):
            os.link(flac, pool / f"f{j:04d}.flac")
        t0 = time.perf_counter()
        folders = [image_folder(tmp, n, jpegs) for n in image_sizes]
        manifests = [audio_manifest(tmp, n, pool) for n in row_sizes]
        print(f"generated {sum(image_sizes):,} image links and {sum(row_sizes):,} manifest rows "
              f"in {time.perf_counter() - t0:.0f} s")

        rows = {"images: builder (list+sample) s": [], "images: reader (map) s": [], "images: index MB": [],
                "audio: builder (parse) s": [], "audio: reader (map) s": [], "audio: index MB": []}
        for folder in folders:
            b, r, mb = in_process(folder, IMAGE_INDEX, tmp / "cache.idx")
            rows["images: builder (list+sample) s"].append(b)
            rows["images: reader (map) s"].append(r)
            rows["images: index MB"].append(mb)
        for manifest in manifests:
            b, r, mb = in_process(manifest, AUDIO_INDEX, tmp / "cache.idx")
            rows["audio: builder (parse) s"].append(b)
            rows["audio: reader (map) s"].append(r)
            rows["audio: index MB"].append(mb)
        print("\nin-process (the data part of start-up; sizes are image files, then manifest rows)")
        table("images", image_sizes, {k: v for k, v in rows.items() if k.startswith("images")})
        table("audio", row_sizes, {k: v for k, v in rows.items() if k.startswith("audio")})
        if args.no_launch:
            return

        for folder in folders:
            assert prepare(["images", str(folder), str(folder) + ".d2v2index"]) == 0
        for manifest in manifests:  # the index prepare writes beside a manifest, from the manifest alone
            save_index(build_index(manifest, AUDIO_INDEX), Path(str(manifest) + SUFFIX))
        image_args = ["--preset", "tiny_image", "data.kind=images"]
        audio_args = ["--preset", "tiny_audio", "data.kind=audio", "data.max_tokens=640000",
                      "data.max_sample_size=320000", "data.min_sample_size=32000", "train.global_batch=2560000"]
        launches: dict[str, list[float]] = {}
        for n_ranks in ranks:
            for label, data_args, paths in (("images", image_args, folders), ("audio", audio_args, manifests)):
                for prepared in (False, True):
                    name = f"{label}, {n_ranks} rank{'s' * (n_ranks > 1)}, {'prepared' if prepared else 'unprepared'} s"
                    times = []
                    for path in paths:
                        if prepared and label == "images":
                            source = f"{path}.d2v2index"
                        else:
                            source = str(path)
                            if not prepared and label == "audio":
                                Path(str(path) + ".d2v2index").rename(tmp / "aside.idx")
                        times.append(min(launch(n_ranks, tmp / "run", [*data_args, f"data.path={source}"])
                                         for _ in range(args.repeat)))
                        if not prepared and label == "audio":
                            (tmp / "aside.idx").rename(str(path) + ".d2v2index")
                    launches[name] = times
        table("whole launch to the end of step 1 (images: files; audio: manifest rows)", image_sizes,
              {k: v for k, v in launches.items() if k.startswith("images")})
        table("", row_sizes, {k: v for k, v in launches.items() if k.startswith("audio")})


if __name__ == "__main__":
    main()
