"""An audio file's length from its header, without decoding: WAV (any chunk order) and FLAC.

Indexing a folder of recordings must not decode them; the frame count and rate sit in the first
bytes of the file. Training reads lengths as 16 kHz samples (``RATE``), as fairseq does.
"""
from __future__ import annotations

import struct
from pathlib import Path

RATE = 16_000  # samples per second the model is trained at

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


def samples_at_rate(path: Path) -> int:
    """The file's length in ``RATE`` samples, from its header (what an audio index records); an
    unusable file is a ValueError saying why."""
    try:
        frames, rate = header_length(path)
    except (OSError, ValueError, EOFError, struct.error) as e:
        raise ValueError(f"unreadable audio header ({e})") from None
    if not rate or not frames:
        raise ValueError("no audio samples")
    return int(frames * RATE // rate)
