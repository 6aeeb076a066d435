"""Tokenise text files into the flat token file :class:`~d2v2scale.data.text.TokenBlocks` reads.

    python -m d2v2scale.data.build_tokens OUT_PREFIX a.txt b.txt ... [--tokenizer bytes|module:function]

``--tokenizer module:function`` names any callable ``str -> list[int]`` you supply (e.g. a
wrapper around your BPE). The built-in ``bytes`` tokenizer maps UTF-8 bytes to ids 2..257
(0 = beginning of document, 1 = padding, matching ``model.pad_idx=1``). Documents are separated
by id 0. Ids are stored as uint16 when they fit, else int32.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np

from ..atomic import atomic_output, write_text
from ..cli import OneLineParser, fail
from .text import token_files

BOS, BYTE_OFFSET = 0, 2


def byte_tokenizer(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def load_tokenizer(spec: str):
    if spec == "bytes":
        return byte_tokenizer
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--tokenizer {spec!r}: expected 'bytes' or 'module:function'")
    return getattr(importlib.import_module(module), name)


def build(out_prefix: str | Path, texts: list[Path], tokenizer) -> dict:
    ids: list[int] = []
    for path in texts:
        ids.append(BOS)
        ids.extend(tokenizer(Path(path).read_text(encoding="utf-8")))
    arr = np.asarray(ids, dtype=np.int64)
    dtype = "uint16" if arr.max(initial=0) < 2**16 else "int32"
    bin_path, meta_path = token_files(out_prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(bin_path, "wb") as f:
        arr.astype(dtype).tofile(f)
    meta = {"dtype": dtype, "num_tokens": int(arr.size), "vocab_size": int(arr.max(initial=0)) + 1}
    write_text(meta_path, json.dumps(meta) + "\n")
    return meta


def main() -> None:
    p = OneLineParser(prog="build_tokens", description=__doc__.splitlines()[0])
    p.add_argument("out_prefix", help="writes OUT_PREFIX.bin and OUT_PREFIX.json (data.path=OUT_PREFIX)")
    p.add_argument("texts", nargs="+", type=Path, help="UTF-8 text files, one document each")
    p.add_argument("--tokenizer", default="bytes", help="bytes, or module:function returning a tokenizer")
    args = p.parse_args()
    try:
        meta = build(args.out_prefix, args.texts, load_tokenizer(args.tokenizer))
    except (OSError, UnicodeDecodeError, ValueError, ImportError, AttributeError) as e:
        sys.exit(fail("build_tokens", e))
    print(f"{meta['num_tokens']} tokens ({meta['dtype']}, vocabulary {meta['vocab_size']}) → {args.out_prefix}.bin")


if __name__ == "__main__":
    main()
