"""What the checkpoint checksum costs: writing one ViT-H-sized shard with and without CRC-32.

A rank's layout-free shard holds its part of the fp32 weights, both AdamW moments and the fp32
EMA teacher: 4 × 632 M × 4 bytes ≈ 10 GB for ViT-H over all ranks, so ~1.26 GB per rank at 8
data-parallel ranks and ~40 MB at 256. The same dict of tensors is written, in turn: by plain
``torch.save``; by :func:`d2v2scale.train.verify.save_checked` (the CRC-32 computed as the bytes
pass to the file: what checkpoints do); and by ``torch.save`` followed by a read-back CRC (the
alternative). Then the file is verified as a resume does. Each write starts with no dirty pages
pending (``os.sync`` outside the timing).

    python bench/checksum.py [--gb 1.26] [--rounds 3] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2v2scale.train.verify import checksum_file, save_checked  # noqa: E402


def timed(fn) -> float:
    """Seconds for ``fn``, started with no dirty pages pending (else a write pays for the last one's)."""
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def save_then_read_back(obj, path: Path) -> tuple[int, int]:
    """The alternative measured: a plain save, then the CRC-32 of the file read back."""
    torch.save(obj, path)
    return checksum_file(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.26, help="shard size in GB (default: ViT-H at 8 DP ranks)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    n = int(args.gb * 1e9 / 4)
    shard = {"data": [torch.randn(n // 8) for _ in range(8)]}  # a few large pieces, as a shard holds
    ways = {"plain": lambda path: torch.save(shard, path), "checked": lambda path: save_checked(shard, path),
            "read_back": lambda path: save_then_read_back(shard, path)}
    times: dict[str, list[float]] = {name: [] for name in (*ways, "verify")}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for r in range(args.rounds):
            names = list(ways)[r % 3:] + list(ways)[:r % 3]  # rotated: no way always follows the same one
            for name in names:
                path = Path(tmp) / f"{name}.pt"
                path.unlink(missing_ok=True)  # a fresh file each time, as a checkpoint tag is
                times[name].append(timed(lambda: ways[name](path)))
            times["verify"].append(timed(lambda: checksum_file(Path(tmp) / "checked.pt")))
        size = (Path(tmp) / "checked.pt").stat().st_size
    crc = timed(lambda: zlib.crc32(memoryview(shard["data"][0].numpy()).cast("B")))
    crc_gbps = shard["data"][0].numel() * 4 / crc / 1e9
    p_med, c_med, s_med, v_med = (statistics.median(times[k]) for k in (*ways, "verify"))
    print(f"shard {size / 1e9:.2f} GB, median of {args.rounds}:")
    print(f"  torch.save                      {p_med:6.2f} s  ({size / p_med / 1e9:.2f} GB/s)")
    print(f"  save_checked (CRC as it writes) {c_med:6.2f} s  ({c_med / p_med:.2f}x)")
    print(f"  torch.save, then read-back CRC  {s_med:6.2f} s  ({s_med / p_med:.2f}x)")
    print(f"  verify (read back + CRC-32)     {v_med:6.2f} s  ({size / v_med / 1e9:.2f} GB/s, page cache warm)")
    print(f"  CRC-32 alone                    {crc_gbps:.2f} GB/s")


if __name__ == "__main__":
    main()
