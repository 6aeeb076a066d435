"""Copy a data set to node-local storage, so that a job's reads stay off the shared file system.

    python -m d2v2scale.data.stage DATA_PATH STAGE_DIR [--threads N]

Run once per node (``srun --ntasks-per-node=1``). What is copied follows what ``DATA_PATH`` is, so
that the copy is the data set itself and not only the file that names it:

- an image or audio folder: its ``.jpg/.jpeg/.png/.wav/.flac`` files (the indexer's suffixes), to
  ``STAGE_DIR/<folder name>/`` with their relative paths;
- a prepared index (``python -m d2v2scale.prepare images``): every file it lists, to
  ``STAGE_DIR/<root name>/``, and ``STAGE_DIR/<index name>``: the same rows and meta with that
  folder as its root and a signature of the local folder;
- an audio manifest (``.tsv``, with or without its ``.d2v2index`` beside it): the audio files it
  lists, to ``STAGE_DIR/<root name>/``, and ``STAGE_DIR/<manifest name>``: the same rows (segment
  offsets kept) under the local root, with its current index beside it;
- a token prefix (``data.kind=text``): ``PREFIX.bin`` and ``PREFIX.json``, to ``STAGE_DIR/``.

The last line on stdout is the ``data.path`` to train with (the local copy); the line before it
says how many files and bytes there are, how many were copied and reused, and how long it took.

A re-run (a requeued job on the same node) copies only files that are missing or whose size
differs. Each file is copied to a temporary name and renamed, and the index or manifest is written
atomically, so a crash leaves whole files or none. A staged index keeps its original's build stamp:
every node stages its own copy at the same path, and a rank maps the index rank 0 names only when
the stamps agree (:func:`~d2v2scale.data.indexing.read_ticket`).

Nothing is copied until every listed file has been found (one ``stat`` each, in threads) and
``STAGE_DIR`` is known to be writable with room for the bytes still to copy.

Exit codes: 0 staged; 2 refused or failed, with one line ``stage: error: ...`` on stderr (an
unknown or missing ``DATA_PATH``, a listed file missing, ``STAGE_DIR`` not writable or too small,
a copy that failed).
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from ..cli import OneLineParser, fail, positive_int
from ..atomic import atomic_output, cannot_write, is_temporary
from .audio import AUDIO_INDEX
from .files import AUDIO_SUFFIXES, IMAGE_SUFFIXES, DataError, walk
from .index import SUFFIX, DataIndex, is_index_file, load_index, save_index
from .indexing import build_index, is_current, signature
from .text import token_files

CHUNK = 512  # files per thread-pool task: a future per file would cost more than a local stat
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class Plan:
    """What staging a data path means: the files ``names`` (relative to ``src_root``) copied under
    ``dst_root``; ``finish()`` then writes whatever names the local copy and returns ``data.path``."""

    src_root: Path
    dst_root: Path
    names: list[str]
    finish: Callable[[], Path]
    extra_bytes: int = 0  # the index or manifest written at the end
    folders: set[str] = field(default_factory=set)  # relative folders to create even if empty


@dataclass
class Survey:
    """One stat of every listed file: the bytes in all, what still has to be copied, what is missing."""

    total: int = 0
    reused: int = 0
    todo: list[tuple[str, int]] = field(default_factory=list)  # (name, size)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (name, why)


# ------------------------------------------------------------------------------------ plans
def index_names(index: DataIndex) -> list[str]:
    """Every file name of ``index`` (one decode each, not one array slice per name)."""
    blob, ends = index.names.tobytes(), index.ends.tolist()
    return [blob[a:b].decode() for a, b in zip([0, *ends[:-1]], ends)]


def _parents(names: Iterable[str]) -> set[str]:
    """The relative folders holding ``names`` (made before the copy threads start)."""
    return {name.rpartition("/")[0] for name in names}


def _local_root(stage: Path, root: str, what: Path) -> Path:
    """``stage/<name of root>``: the name says which data set a node-local folder holds."""
    name = Path(os.path.abspath(root)).name
    if not name:
        raise DataError(f"{what}: its data root '{root}' has no folder name to stage it under")
    return stage / name


def _plan_folder(source: Path, stage: Path, threads: int) -> Plan:
    """A folder is copied as training would list it (the indexers' suffixes, images and audio alike:
    the folder does not say which kind will read it); training indexes the local copy."""
    names = walk(source, IMAGE_SUFFIXES + AUDIO_SUFFIXES, threads)[0]
    if not names:
        raise DataError(f"data.path '{source}' holds no image or audio files "
                        f"({', '.join(IMAGE_SUFFIXES + AUDIO_SUFFIXES)})")
    dst = _local_root(stage, str(source.absolute()), source)
    return Plan(source, dst, names, lambda: dst)


def _index_path(stage: Path, name: str, dst_root: Path) -> Path:
    """Where a staged index goes: its own name, unless the data folder took that name."""
    return stage / (name if stage / name != dst_root else name + SUFFIX)


def _plan_index(source: Path, stage: Path) -> Plan:
    """A prepared index: its files, then the same index with the local root. Its signature is
    rewritten to describe the local folder (every folder it knew is made, even an empty one), so
    that it is current for the local folder as the original was for the shared one."""
    index = load_index(source)
    names = index_names(index)
    dst = _local_root(stage, index.root, source)
    out = _index_path(stage, source.name, dst)
    kind = index.meta.get("kind", "images")
    folders = set(index.meta.get("signature", {}).get("dirs", {})) | _parents(names) | {""}

    def finish() -> Path:
        sig = signature(dst, kind)  # the local folder's, as build_index would record it
        sig["dirs"] = {rel: (dst / rel).stat().st_mtime_ns for rel in sorted(folders)}
        meta = {**index.meta, "signature": sig, "staged_from": {"index": str(source.absolute()), "root": index.root}}
        save_index(DataIndex(str(dst), index.names, index.ends, index.length, index.offset, index.file, meta), out)
        return out

    return Plan(Path(index.root), dst, names, finish, source.stat().st_size, folders)


def _plan_manifest(source: Path, stage: Path, threads: int) -> Plan:
    """A manifest: its audio files, then its rows verbatim under the local root line, and beside it
    the index with a signature of the local manifest (current, so no rank parses the manifest).
    The files come from the index beside it when that is current, else from the manifest itself."""
    beside = Path(str(source) + SUFFIX)
    index = load_index(beside) if is_index_file(beside) else None
    if index is None or not is_current(index, source, AUDIO_INDEX.kind):
        index = build_index(source.absolute(), AUDIO_INDEX, threads)
        st = source.stat()  # every node must write the same stamp (see the module docstring)
        index.meta["built"] = f"staged-{st.st_size}-{st.st_mtime_ns}"
    names = index_names(index)
    dst = _local_root(stage, index.root, source)
    out = stage / source.name
    if out == dst:
        raise DataError(f"manifest {source}: its audio root '{index.root}' has the manifest's own name; "
                        "rename one of them")

    def finish() -> Path:
        try:
            with open(source, encoding="utf-8") as src, atomic_output(out) as f:
                src.readline()
                f.write(f"{dst}\n")
                shutil.copyfileobj(src, f)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot write the staged manifest {out} ({getattr(e, 'strerror', None) or e})") from None
        meta = {**index.meta, "signature": signature(out, "audio"),
                "staged_from": {"manifest": str(source.absolute()), "root": index.root}}
        save_index(DataIndex(str(dst), index.names, index.ends, index.length, index.offset, index.file, meta),
                   Path(str(out) + SUFFIX))
        return out

    return Plan(Path(index.root), dst, names, finish, source.stat().st_size + index.nbytes() + 4096)


def _plan_tokens(source: Path, stage: Path) -> Plan:
    """A token prefix: its two files, straight into ``stage`` (the prefix keeps its name)."""
    bin_path, meta_path = token_files(source)
    return Plan(bin_path.parent, stage, [bin_path.name, meta_path.name], lambda: stage / source.name)


def plan(source: Path, stage: Path, threads: int) -> Plan:
    """What staging ``source`` (a ``data.path``) into ``stage`` copies and writes."""
    if is_index_file(source):
        return _plan_index(source, stage)
    if source.is_dir():
        return _plan_folder(source, stage, threads)
    if source.is_file() and source.suffix == ".tsv":
        return _plan_manifest(source, stage, threads)
    if all(p.is_file() for p in token_files(source)):
        return _plan_tokens(source, stage)
    if not source.exists():
        raise DataError(f"data.path '{source}' does not exist")
    raise DataError(f"data.path '{source}' is none of what stage copies: an image or audio folder, a prepared "
                    "index (python -m d2v2scale.prepare), an audio manifest (.tsv) or a token prefix "
                    "(PREFIX.bin + PREFIX.json)")


# ------------------------------------------------------------------------------ the work
def _chunked(pool: ThreadPoolExecutor, work: Callable[[list[_T]], _R], items: list[_T]) -> list[_R]:
    """``work`` over ``items`` in chunks of :data:`CHUNK`, in order; a failure cancels what has not started."""
    try:
        return list(pool.map(work, [items[k : k + CHUNK] for k in range(0, len(items), CHUNK)]))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise


def survey(p: Plan, threads: int) -> Survey:
    """Stat every listed file at its source and its local copy, in threads: the copy is kept when
    its size matches (a crash never leaves a partial file under the final name)."""
    src_root, dst_root = str(p.src_root), str(p.dst_root)

    def part(names: list[str]) -> Survey:
        s = Survey()
        for name in names:
            try:
                st = os.stat(os.path.join(src_root, name))
            except OSError as e:
                s.missing.append((name, e.strerror or str(e)))
                continue
            if not stat.S_ISREG(st.st_mode):
                s.missing.append((name, "not a regular file"))
                continue
            s.total += st.st_size
            try:
                kept = os.stat(os.path.join(dst_root, name)).st_size == st.st_size
            except OSError:
                kept = False
            if kept:
                s.reused += 1
            else:
                s.todo.append((name, st.st_size))
        return s

    out = Survey()
    with ThreadPoolExecutor(threads) as pool:
        for s in _chunked(pool, part, p.names):
            out.total += s.total
            out.reused += s.reused
            out.todo += s.todo
            out.missing += s.missing
    return out


def _writable_stage(stage: Path) -> None:
    """Create ``stage`` and prove it takes a file (permission bits alone do not say so: root, read-only mounts)."""
    try:
        stage.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"STAGE_DIR {stage} is not writable ({e.strerror or e})") from None
    why_not = cannot_write(stage)
    if why_not:
        raise DataError(f"STAGE_DIR {stage} is not writable ({why_not})")


def _remove_leftovers(folder: Path) -> None:
    """Partial copies a killed stager left in ``folder`` (dot-files :func:`~d2v2scale.atomic.is_temporary`
    names; never under a data file's name)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and is_temporary(Path(entry.path)):
                Path(entry.path).unlink(missing_ok=True)


def copy(p: Plan, todo: list[tuple[str, int]], threads: int) -> int:
    """Copy ``todo`` in threads, each to a temporary file beside its target, renamed into place
    (:func:`~d2v2scale.atomic.atomic_output`, without fsync: a crash means a re-run); the bytes copied."""
    src_root, dst_root = str(p.src_root), str(p.dst_root)
    numbered = list(enumerate(todo))

    def part(items: list[tuple[int, tuple[str, int]]]) -> int:
        done = 0
        for k, (name, size) in items:
            src, dst = os.path.join(src_root, name), os.path.join(dst_root, name)
            try:
                with open(src, "rb") as source, atomic_output(dst, "wb", durable=False) as f:
                    shutil.copyfileobj(source, f, 1 << 20)
            except OSError as e:
                raise DataError(f"copying {src} to {dst} failed ({e.strerror or e}); a re-run copies what is "
                                "still missing") from None
            done += size
        return done

    with ThreadPoolExecutor(threads) as pool:
        return sum(_chunked(pool, part, numbered))


def stage(source: Path, stage_dir: Path, threads: int = 16) -> tuple[str, Path]:
    """Stage ``source`` into ``stage_dir`` (see the module docstring): (summary line, data.path)."""
    t0 = time.perf_counter()
    stage_dir = stage_dir.absolute()
    p = plan(source, stage_dir, threads)
    _writable_stage(stage_dir)
    s = survey(p, threads)
    if s.missing:
        name, why = s.missing[0]
        raise DataError(f"{len(s.missing)} of the {len(p.names)} files {source} lists are missing or unusable; "
                        f"the first: {p.src_root / name} ({why})")
    need = sum(size for _, size in s.todo) + p.extra_bytes
    free = shutil.disk_usage(stage_dir).free
    if need > free:
        raise DataError(f"STAGE_DIR {stage_dir} has {_human(free)} free; staging {source} needs {_human(need)} more "
                        f"({len(s.todo)} of {len(p.names)} files to copy, {_human(s.total)} in all)")
    try:
        for rel in sorted(_parents(name for name, _ in s.todo) | p.folders):
            (p.dst_root / rel).mkdir(parents=True, exist_ok=True)
            _remove_leftovers(p.dst_root / rel)
    except OSError as e:
        raise DataError(f"cannot create folders under {p.dst_root} ({e.strerror or e})") from None
    copied = copy(p, s.todo, threads) if s.todo else 0
    data_path = p.finish()
    line = (f"stage: {len(p.names)} files, {s.total} bytes ({_human(s.total)}), {len(s.todo)} copied "
            f"({_human(copied)}), {s.reused} reused, {time.perf_counter() - t0:.1f} s: {source} -> {data_path}")
    return line, data_path


def _human(n: float) -> str:
    """Bytes for a log line (decimal units, as df -H and storage quotas state them)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:.1f} {unit}"


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); the exit code."""
    p = OneLineParser(prog="stage", description=__doc__.splitlines()[0],
                      epilog="example:\n  python -m d2v2scale.data.stage /shared/imagenet_train.d2v2index "
                             "/tmp/d2v2scale-$SLURM_JOB_ID")
    p.add_argument("data_path", type=Path, help="the data.path to stage (folder, prepared index, .tsv, token prefix)")
    p.add_argument("stage_dir", type=Path, help="node-local folder to copy into (created if missing)")
    p.add_argument("--threads", type=positive_int, default=16, help="files stat-ed or copied at once (default 16)")
    args = p.parse_args(argv)
    try:
        line, data_path = stage(args.data_path, args.stage_dir, args.threads)
    except (DataError, OSError) as e:
        return fail(p.prog, e)
    print(line)
    print(data_path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
