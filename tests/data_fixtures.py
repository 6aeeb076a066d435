"""Generated data files for loader tests: JPEGs of mixed sizes (with optional corrupt ones) and text."""
from pathlib import Path

import numpy as np


def make_jpegs(root: Path, n: int, corrupt: int = 0, seed: int = 0) -> dict[str, list[Path]]:
    """``n`` good JPEGs in two class folders, sizes 40–160 px, smooth random content; plus ``corrupt``
    bad files cycling through: empty, truncated, not-a-JPEG, and valid markers around garbage."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    good, bad = [], []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(40, 160, size=2))
        base = rng.integers(0, 255, size=(4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        path = root / f"class{i % 2}" / f"img{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        good.append(path)
    for j in range(corrupt):
        path = root / f"class{j % 2}" / f"bad{j:04d}.jpg"
        kind = j % 4
        if kind == 0:
            path.write_bytes(b"")
        elif kind == 1:
            path.write_bytes(good[j % n].read_bytes()[:300])
        elif kind == 2:
            path.write_bytes(b"this is not an image at all\n" * 20)
        else:
            path.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 255, 2000, dtype=np.uint8).tobytes() + b"\xff\xd9")
        bad.append(path)
    return {"good": good, "bad": bad}
