"""Prepare a data set once, so that no training rank lists, opens or measures its files at start-up.

    python -m d2v2scale.prepare images ROOT OUT [--threads N]
    python -m d2v2scale.prepare audio ROOT OUT.tsv [--max-seconds S] [--min-seconds s] [--threads N]

``images``: an ImageNet-style folder → the index training reads (``data.path=OUT``): relative paths
as flat arrays, one file, mapped by every rank. No image is opened (a few are sampled to refuse a
wrong folder); unusable files are found, logged once and replaced when a batch reads them.

``audio``: a Libri-light-style tree of FLAC/WAV → a fairseq/wav2vec manifest (``data.path=OUT.tsv``)
with each file's length from its header, read in threads; with ``--max-seconds`` a longer recording
is listed as segments cut at the quietest 20 ms frame in the second before each limit (no audio is
rewritten; training reads a segment with a seek and a range read). Beside the manifest,
``OUT.tsv.d2v2index`` holds it as the index every rank maps, so nobody parses the manifest at start.

Both are incremental: a re-run lists only folders whose mtime changed (images) and opens only new or
changed files (audio, ``OUT.tsv.state.json``). Errors are one line and exit code 2.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from .cli import OneLineParser, fail, positive_int
from .data.audio import AUDIO_INDEX
from .data.files import DataError
from .data.images import IMAGE_INDEX
from .data.index import SUFFIX, is_index_file, load_index, save_index
from .data.indexing import build_index
from .data.manifest import build_manifest


def prepare_images(root: Path, out: Path, threads: int) -> str:
    """Write (or bring up to date) the index of the image folder ``root`` at ``out``; one line back."""
    if not root.is_dir():
        raise DataError(f"image root {root} {'is not a folder' if root.exists() else 'does not exist'}")
    previous = load_index(out) if is_index_file(out) else None
    t0 = time.perf_counter()
    index = build_index(root.resolve(), IMAGE_INDEX, threads, previous=previous)
    save_index(index, out)
    folders = len(index.meta["signature"]["dirs"])
    return (f"{out}: {len(index)} images in {folders} folders, {index.nbytes() / 1e6:.1f} MB, "
            f"{time.perf_counter() - t0:.1f} s{' (unchanged folders reused)' if previous else ''}; "
            f"train with data.path={out}")


def prepare_audio(root: Path, out: Path, max_seconds: float | None, min_seconds: float, threads: int) -> list[str]:
    """Write the manifest of ``root`` at ``out`` and its index beside it; the lines to print."""
    stats = build_manifest(root, out, max_seconds, min_seconds, threads, progress=True)
    index = build_index(out.absolute(), AUDIO_INDEX)  # the manifest just written: trusted
    save_index(index, Path(str(out) + SUFFIX))
    lines = [f"{out}: {stats.summary()}; index {out}{SUFFIX} ({index.nbytes() / 1e6:.1f} MB); "
             f"train with data.path={out}"]
    if stats.other_rates:
        lines.append(f"warning: {stats.other_rates} files are not 16 kHz; manifest lengths are read as 16 kHz "
                     "samples (as fairseq does), so resample them first for exact token budgets")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="prepare", description=__doc__.splitlines()[0],
                      epilog="examples:\n"
                             "  python -m d2v2scale.prepare images /data/imagenet/train imagenet_train.d2v2index\n"
                             "  python -m d2v2scale.prepare audio /data/libri-light librilight.tsv --max-seconds 20 "
                             "--min-seconds 2")
    sub = p.add_subparsers(dest="what", required=True, parser_class=OneLineParser)
    a = sub.add_parser("images", help="an image folder → the index training reads")
    a.add_argument("root", type=Path, help="ImageNet-style folder (searched recursively)")
    a.add_argument("out", type=Path, help="index file to write (train with data.path=OUT)")
    b = sub.add_parser("audio", help="a tree of FLAC/WAV → a fairseq manifest with segments, and its index")
    b.add_argument("root", type=Path, help="Libri-light-style folder (searched recursively)")
    b.add_argument("out", type=Path, help="manifest to write (.tsv; train with data.path=OUT.tsv)")
    b.add_argument("--max-seconds", type=float, default=None,
                   help="cut longer recordings into segments of at most this many seconds (default: no cuts)")
    b.add_argument("--min-seconds", type=float, default=0.0, help="leave out shorter recordings (default 0)")
    for parser in (a, b):
        parser.add_argument("--threads", type=positive_int, default=8,
                            help="files read or folders listed at once (default 8)")
    args = p.parse_args(argv)
    try:
        if args.out.is_dir():
            raise DataError(f"output {args.out} is a folder; give a file name")
        if args.what == "images":
            lines = [prepare_images(args.root, args.out, args.threads)]
        else:
            lines = prepare_audio(args.root, args.out, args.max_seconds, args.min_seconds, args.threads)
    except DataError as e:
        return fail(p.prog, e)
    for line in lines:
        tqdm.write(line, file=sys.stdout)
    return 0


def entry() -> None:
    """The ``d2v2scale-prepare`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
