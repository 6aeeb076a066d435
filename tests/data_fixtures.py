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


def make_audio(root: Path, n: int, corrupt: int = 0, seed: int = 0) -> list[Path]:
    """``n`` tones with noise, 0.3–1.2 s, alternating WAV/FLAC and 16 kHz/44.1 kHz, stereo every third;
    plus ``corrupt`` bad files (empty, truncated FLAC, text renamed .wav)."""
    import soundfile

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rate = 16000 if i % 2 == 0 else 44100
        dur = float(rng.uniform(0.3, 1.2))
        t = np.arange(int(dur * rate)) / rate
        sig = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.normal(size=t.size)
        if i % 3 == 0:
            sig = np.stack([sig, 0.5 * sig], 1)
        path = root / f"utt{i:04d}.{'wav' if i % 4 < 2 else 'flac'}"
        soundfile.write(path, sig.astype(np.float32), rate, subtype="PCM_16")
        paths.append(path)
    for j in range(corrupt):
        kind = j % 3
        path = root / f"bad{j:04d}.{'flac' if kind == 1 else 'wav'}"
        if kind == 0:
            path.write_bytes(b"")
        elif kind == 1:
            path.write_bytes(b"fLaC" + b"\x00" * 10)
        else:
            path.write_bytes(b"not audio\n" * 100)
    return paths
