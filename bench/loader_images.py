"""Images/s of the DALI CPU image pipeline vs a PIL + torch pipeline, same files, same crops, one run.

Generates ImageNet-sized JPEGs (about 500×375) in a temporary folder, then decodes + random-resized
crops + flips + normalises them to 224×224 with both implementations of
:class:`d2v2scale.data.images.ImageSource` (DALI ``device="cpu"``, and the PIL fallback).

    python bench/loader_images.py [--images 256] [--batch 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2v2scale.data.images import ImageSource  # noqa: E402


def make_images(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        base = rng.integers(0, 255, size=(12, 16, 3)).astype(np.uint8)
        noise = rng.normal(0, 12, size=(h, w, 3))
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.float64) + noise
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"{i:05d}.jpg", quality=90)


def images_per_s(src: ImageSource, n: int, batch: int) -> float:
    src.batch(torch.arange(batch))  # warm-up (thread pools, first allocations)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        src.batch(torch.arange(start, start + batch))
    return n // batch * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images)
        dali = ImageSource(tmp, 224, 3, seed=0, batch_size=args.batch, device=torch.device("cpu"), threads=args.threads)
        pil = ImageSource(tmp, 224, 3, seed=0, batch_size=args.batch, device=torch.device("cpu"), verbose=False)
        pil.pipe = None
        n = args.images // args.batch * args.batch
        r_dali, r_pil = images_per_s(dali, n, args.batch), images_per_s(pil, n, args.batch)
    print(f"{n} JPEGs (~500x375) → 224x224 RRC + flip + normalise, {args.threads} CPU threads:")
    print(f"  DALI (device=cpu): {r_dali:8.1f} images/s")
    print(f"  PIL + torch:       {r_pil:8.1f} images/s")
    print(f"  ratio DALI / PIL:  {r_dali / r_pil:8.2f}")


if __name__ == "__main__":
    main()
