"""A resume reads its checkpoint once per restart, not once per rank: the ranks split the files by
bytes, check size, CRC-32 and pickles of their share, and agree on one verdict; each rank still
refuses a file it opens whose size is not what ``run.json`` lists."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from d2v2scale.distributed.runtime import free_port
from d2v2scale.train.checkpoint import (LATEST, load_checkpoint, newest_intact, newest_verified, resume_candidates,
                                       verify_tag)
from d2v2scale.train.shards import Piece, ShardReader, write_shards
from d2v2scale.train.verify import RUN_FILE, CheckpointError, save_checked, share, verify_collectively

ROOT = Path(__file__).resolve().parents[1]
WORLD = 4
# KiB per file. Sorted by name, a split by count puts two of the three large files on rank 0
# (round-robin: files 0 and 4; contiguous ranges: files 0 and 1), 66 % of the bytes; by bytes, at most 43 %.
SIZES_KIB = {"rank_tp00_dp00000.pt": 1500, "rank_tp00_dp00001.pt": 800, "rank_tp00_dp00002.pt": 75,
             "rank_tp00_dp00003.pt": 75, "shards/rank_00000.pt": 800, "shards/rank_00001.pt": 75,
             "shards/rank_00002.pt": 75, "shards/rank_00003.pt": 75}
DAMAGED_FILE = "shards/rank_00000.pt"
HOSTILE_FILE = "shards/rank_00001.pt"


class _RunsCode:
    """Unpickling this would run a shell command (what a hostile checkpoint could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_tag(ckpt_dir: Path, step: int, extra: dict | None = None) -> Path:
    """A tag as a save leaves it: files written with their (bytes, crc32), ``run.json`` listing
    them, ``latest`` naming it. ``extra``: {file: object} written in place of (or beside) the tensors."""
    tag = ckpt_dir / f"step_{step:08d}"
    files = {}
    for i, (rel, kib) in enumerate(SIZES_KIB.items()):
        (tag / rel).parent.mkdir(parents=True, exist_ok=True)
        files[rel] = save_checked({"data": torch.full((kib * 256,), float(i))}, tag / rel)
    for rel, obj in (extra or {}).items():
        (tag / rel).parent.mkdir(parents=True, exist_ok=True)
        record = save_checked(obj, tag / rel)
        if rel in files:
            files[rel] = record
    (tag / RUN_FILE).write_text(json.dumps({"step": step, "files": files}))
    (ckpt_dir / LATEST).write_text(tag.name + "\n")
    return tag


def _flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def _launch(out: Path, runs: list[str]) -> list[list[dict]]:
    """One 4-process gloo group of tests/dist/verify_bytes.py over ``runs``; every rank's results."""
    port, procs = free_port(), []
    for rank in range(WORLD):
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "tests/dist/verify_bytes.py", str(out), *runs], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * WORLD, "\n".join(o[-3000:] for o in outputs)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
def test_four_ranks_read_the_checkpoint_once_and_agree(tmp_path):
    """4 ranks: ``newest_verified`` reads the checkpoint's bytes once in all (the per-rank
    ``newest_intact``, run in the same processes, reads them 4 times), no rank more than 60 % of
    them; a flipped byte in the newest tag → every rank takes the older tag with the same warning
    as ``newest_intact``; pickled code (listed or not) → the same one-line refusal on every rank."""
    marker = tmp_path / "pwned"
    intact = tmp_path / "intact"
    tag = _write_tag(intact, 4)
    total = sum((tag / rel).stat().st_size for rel in SIZES_KIB)
    damaged, hostile, unlisted = tmp_path / "damaged", tmp_path / "hostile", tmp_path / "unlisted"
    for ckpt_dir in (damaged, hostile):
        _write_tag(ckpt_dir, 2)
    _flip_byte(_write_tag(damaged, 4) / DAMAGED_FILE, (SIZES_KIB[DAMAGED_FILE] << 10) // 2)
    _write_tag(hostile, 4, {HOSTILE_FILE: {"data": torch.zeros(4), "run": _RunsCode(marker)}})
    _write_tag(unlisted, 4, {"extra/stray.pt": {"run": _RunsCode(marker)}})
    assert resume_candidates(damaged) == [damaged / "step_00000004", damaged / "step_00000002"]
    out = tmp_path / "out"
    out.mkdir()
    runs = [f"verified:{intact}", f"intact:{intact}", *(f"verified:{d}" for d in (damaged, hostile, unlisted))]
    verified, old, after_damage, refused, refused_unlisted = zip(*_launch(out, runs))

    assert all(r["tag"] == "step_00000004" and not r["warnings"] and not r["error"] for r in verified + old)
    new_read, old_read = sum(r["read"] for r in verified), sum(r["read"] for r in old)
    assert 0.9 * total <= new_read <= 1.3 * total, (new_read, total)
    assert old_read >= 3.5 * new_read, (old_read, new_read)
    assert max(r["read"] for r in verified) <= 0.6 * total, ([r["read"] for r in verified], total)

    want_tag, want_warnings = newest_intact(damaged)
    assert want_tag.name == "step_00000002" and DAMAGED_FILE in want_warnings[0]
    assert all((r["tag"], r["warnings"], r["error"]) == (want_tag.name, want_warnings, None) for r in after_damage)
    for ckpt_dir, results in ((hostile, refused), (unlisted, refused_unlisted)):
        with pytest.raises(CheckpointError) as e:
            newest_intact(ckpt_dir)
        assert "holds pickled code (posix.system)" in str(e.value) and "\n" not in str(e.value)
        assert all(r["tag"] is None and r["error"] == str(e.value) for r in results)
    assert not marker.exists()


def test_one_process_verifies_alone_and_a_split_covers_every_file_once(tmp_path):
    """``world_size`` 1 without a process group: the whole check by one process, with the answers
    of the single-process functions; the split by bytes gives every file to exactly one rank."""
    tag = _write_tag(tmp_path, 4)
    (tmp_path / "step_00000003").mkdir()  # never completed: no run.json
    (tmp_path / "step_00000005").mkdir()  # after the one latest names
    assert resume_candidates(tmp_path) == [tag]
    assert verify_collectively(tag, 0, 1) is None
    assert newest_verified(tmp_path, 0, 1) == (tag, [])
    verify_tag(tag, 0, 1)
    _flip_byte(tag / DAMAGED_FILE, 5000)
    said = f"{DAMAGED_FILE} does not match its checksum (damaged after it was written)"
    assert verify_collectively(tag, 0, 1) == said
    with pytest.raises(CheckpointError) as e:
        verify_tag(tag, 0, 1)
    assert str(e.value) == f"checkpoint step_00000004 is damaged ({said})"
    with pytest.raises(CheckpointError) as old:
        newest_intact(tmp_path)
    with pytest.raises(CheckpointError) as new:
        newest_verified(tmp_path, 0, 1)
    assert str(new.value) == str(old.value) and "step_00000003 is damaged (run.json is missing" in str(new.value)
    sizes = {f"f{i}": (i * 7919) % 1000 for i in range(50)}
    for world in (1, 3, 4, 64):
        parts = [share(sizes, r, world) for r in range(world)]
        assert sorted(f for part in parts for f in part) == sorted(sizes)
        assert max(sum(sizes[f] for f in part) for part in parts) <= sum(sizes.values()) / world + max(sizes.values())


def test_a_file_changed_after_verification_is_refused_by_the_rank_that_opens_it(tmp_path):
    """Shards and a rank file listed in ``run.json``, then one truncated, grown, or a stray shard
    added: ``ShardReader`` and ``load_checkpoint`` raise CheckpointError naming the file before
    opening it (the trainer stub is never touched)."""
    tag = tmp_path / "step_00000001"
    files = {}
    for rank in range(2):
        data = torch.arange(10, dtype=torch.float32)[rank * 5 : rank * 5 + 5]
        files.update(write_shards(tag, rank, [Piece("model/w", (10,), None, rank * 5, rank * 5 + 5, data)]))
    (tag / RUN_FILE).write_text(json.dumps({"step": 1, "files": files}))
    assert torch.equal(ShardReader(tag).full("model/w"), torch.arange(10, dtype=torch.float32))
    shard = tag / "shards" / "rank_00001.pt"
    original = shard.read_bytes()
    size = len(original)
    for change, said in ((lambda: os.truncate(shard, size - 10), f"is truncated ({size - 10} of {size} bytes)"),
                         (lambda: os.truncate(shard, size + 3), f"has {size + 3} bytes, {size} were written")):
        change()
        for load in (lambda: ShardReader(tag), lambda: load_checkpoint(SimpleNamespace(), tag)):
            with pytest.raises(CheckpointError, match=f"checkpoint file {shard} does not match run.json") as e:
                load()
            assert said in str(e.value)
    shard.write_bytes(original)
    shutil.copy(shard, tag / "shards" / "rank_00002.pt")
    with pytest.raises(CheckpointError, match="shards/rank_00002.pt is not listed in run.json"):
        ShardReader(tag)
    (tag / "shards" / "rank_00002.pt").unlink()
    native = tmp_path / "native"  # DeepSpeed's files: every *.pt is checked before the scan opens it
    native.mkdir()
    record = save_checked({"x": torch.zeros(8)}, native / "mp_rank_00_model_states.pt")
    (native / RUN_FILE).write_text(json.dumps({"step": 1, "files": {"mp_rank_00_model_states.pt": record}}))
    os.truncate(native / "mp_rank_00_model_states.pt", 100)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is truncated"):
        load_checkpoint(SimpleNamespace(), native)
