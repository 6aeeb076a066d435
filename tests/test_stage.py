"""Staging a data set to node-local storage: what the data set consists of is copied (not only the
file that names it), training's own loading path reads the local copy with the shared one gone, a
re-run copies nothing, and refusals are one line with exit code 2 before anything is copied."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2v2scale.config import load_config
from d2v2scale.data import stage as stage_mod
from d2v2scale.data.build_tokens import build, byte_tokenizer
from d2v2scale.data.files import AUDIO_SUFFIXES, IMAGE_SUFFIXES, walk
from d2v2scale.data.images import IMAGE_INDEX
from d2v2scale.data.index import SUFFIX, DataIndex, load_index, pack_names, save_index
from d2v2scale.data.indexing import IndexSpec, ensure_index, is_current, publish, read_ticket
from d2v2scale.data.loader import build_source
from d2v2scale.data.manifest import read_manifest
from d2v2scale.data.precheck import check_data, index_spec
from d2v2scale.prepare import main as prepare_main

from data_fixtures import make_audio, make_jpegs

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ["data.kind=audio", "data.max_tokens=24000", "data.min_sample_size=1000", "data.max_sample_size=12000",
         "train.global_batch=48000"]


@pytest.fixture
def data(tmp_path) -> Path:
    """A "shared file system" of this test's own (it may move it away): an image folder and its
    prepared index, an audio folder and its prepared manifest with segments (and index), a token
    prefix. Made per test: a prepared index names its root, so a copy would still point here."""
    root = tmp_path / "shared"
    make_jpegs(root / "imgs", 12)
    make_audio(root / "aud", 6)
    assert prepare_main(["images", str(root / "imgs"), str(root / "imgs.d2v2index")]) == 0
    assert prepare_main(["audio", str(root / "aud"), str(root / "aud.tsv"), "--max-seconds", "0.5"]) == 0
    (root / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    build(root / "tok", [root / "a.txt"], byte_tokenizer)
    return root


def run_stage(capsys, *argv: object) -> tuple[int, list[str], list[str]]:
    """``main`` in this process: (exit code, stdout lines, stderr lines)."""
    code = stage_mod.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err.splitlines()


def staged(capsys, data_path: Path, stage_dir: Path) -> tuple[Path, str]:
    """Stage and return (the printed data.path, the summary line)."""
    code, out, err = run_stage(capsys, data_path, stage_dir)
    assert code == 0 and not err, err
    assert out[-2].startswith("stage: ") and Path(out[-1]).is_absolute()
    return Path(out[-1]), out[-2]


def copied(summary: str) -> int:
    """The files a run copied, from its summary line."""
    return int(summary.split(" copied")[0].rsplit(" ", 1)[1])


def same_files(src_root: Path, dst_root: Path, names: list[str]) -> None:
    for name in names:
        assert (dst_root / name).read_bytes() == (src_root / name).read_bytes(), name


def gone(path: Path) -> None:
    """The shared copy is no longer reachable (a rename: chmod does not stop root)."""
    path.rename(path.with_name(path.name + ".away"))


def test_image_folder_is_copied_and_indexed_locally(data, tmp_path, capsys):
    local, summary = staged(capsys, data / "imgs", tmp_path / "stage")
    assert local == tmp_path / "stage" / "imgs" and copied(summary) == 12
    names = walk(data / "imgs", IMAGE_SUFFIXES, threads=1)[0]
    same_files(data / "imgs", local, names)
    gone(data)
    cfg = load_config("tiny_image", ["data.kind=images", f"data.path={local}"])
    check_data(cfg, builder=True, verbose=False)
    index = ensure_index(index_spec(cfg))
    assert index.root == str(local) and len(index) == 12
    src = build_source(cfg, 12, torch.device("cpu"), verbose=False, index=index)
    x, _ = src.batch(torch.arange(12))
    assert x.shape == (12, 3, 32, 32) and src.skipped == 0
    assert copied(staged(capsys, data.with_name("shared.away") / "imgs", tmp_path / "stage")[1]) == 0


def test_prepared_image_index_is_staged_with_a_local_root(data, tmp_path, capsys):
    original = load_index(data / "imgs.d2v2index")
    local, summary = staged(capsys, data / "imgs.d2v2index", tmp_path / "stage")
    assert local == tmp_path / "stage" / "imgs.d2v2index" and copied(summary) == 12
    index = load_index(local)
    assert index.root == str(tmp_path / "stage" / "imgs") and len(index) == len(original) == 12
    assert [index.name(i) for i in range(12)] == [original.name(i) for i in range(12)]
    # every node writes its own copy at the same path: rank 0's ticket names the build stamp
    assert index.meta["built"] == original.meta["built"] and index.meta["kind"] == "images"
    assert is_current(index, Path(index.root), "images")  # its signature describes the local folder
    same_files(Path(original.root), Path(index.root), [original.name(i) for i in range(12)])
    spec = IndexSpec(str(local), IMAGE_INDEX)
    ticket = publish(ensure_index(spec), spec)
    assert copied(staged(capsys, data / "imgs.d2v2index", tmp_path / "stage")[1]) == 0
    assert len(read_ticket(ticket, wait_s=0)) == 12  # another node's own copy at this path serves rank 0's ticket
    gone(data)
    cfg = load_config("tiny_image", ["data.kind=images", f"data.path={local}"])
    check_data(cfg, builder=True, verbose=False)
    loaded = ensure_index(index_spec(cfg))
    assert loaded.origin == "prepared" and str(loaded.path(0)).startswith(str(tmp_path / "stage"))
    src = build_source(cfg, 12, torch.device("cpu"), verbose=False, index=loaded)
    x, _ = src.batch(torch.arange(12))
    assert x.shape == (12, 3, 32, 32) and src.skipped == 0


def test_audio_manifest_is_staged_with_its_segments_and_a_current_index(data, tmp_path, capsys):
    root, names, frames, offsets = read_manifest(data / "aud.tsv")
    assert offsets is not None and (offsets > 0).any()  # the prepared manifest has segments
    local, summary = staged(capsys, data / "aud.tsv", tmp_path / "stage")
    assert local == tmp_path / "stage" / "aud.tsv" and copied(summary) == 6
    local_root, local_names, local_frames, local_offsets = read_manifest(local)
    assert local_root == str(tmp_path / "stage" / "aud") and local_names == names
    assert local_frames.tolist() == frames.tolist() and local_offsets.tolist() == offsets.tolist()
    same_files(Path(root), Path(local_root), sorted(set(names)))
    index = load_index(Path(str(local) + SUFFIX))
    assert index.root == local_root and is_current(index, local, "audio")
    assert index.meta["built"] == load_index(data / f"aud.tsv{SUFFIX}").meta["built"]
    assert copied(staged(capsys, data / "aud.tsv", tmp_path / "stage")[1]) == 0
    gone(data)
    cfg = load_config("tiny_audio", [*AUDIO, f"data.path={local}"])
    check_data(cfg, builder=True, verbose=False)
    loaded = ensure_index(index_spec(cfg))
    assert loaded.origin == "prepared" and loaded.offset.tolist() == offsets.tolist()  # the local index is current
    src = build_source(cfg, 0, torch.device("cpu"), verbose=False, index=loaded)
    for k in range(src.num_batches):
        x, lengths, _ = src.batch_by_id(k)
        assert torch.isfinite(x).all() and bool((lengths > 0).all())
    assert src.skipped == 0


def test_manifest_without_an_index_and_an_audio_folder(data, tmp_path, capsys):
    (data / f"aud.tsv{SUFFIX}").unlink()
    local, _ = staged(capsys, data / "aud.tsv", tmp_path / "stage")
    index = load_index(Path(str(local) + SUFFIX))
    assert is_current(index, local, "audio") and index.meta["built"].startswith("staged-")
    folder, summary = staged(capsys, data / "aud", tmp_path / "stage")
    assert folder == tmp_path / "stage" / "aud" and copied(summary) == 0  # the manifest's copies, reused
    assert sorted(walk(folder, AUDIO_SUFFIXES, 1)[0]) == sorted(walk(data / "aud", AUDIO_SUFFIXES, 1)[0])


def test_token_prefix(data, tmp_path, capsys):
    local, summary = staged(capsys, data / "tok", tmp_path / "stage")
    assert local == tmp_path / "stage" / "tok" and copied(summary) == 2
    same_files(data, local.parent, ["tok.bin", "tok.json"])
    gone(data)
    cfg = load_config("tiny_text", ["data.kind=text", f"data.path={local}"])
    check_data(cfg, builder=True, verbose=False)
    tokens, _ = build_source(cfg, 2, torch.device("cpu"), verbose=False).batch(torch.arange(2))
    assert tokens.shape == (2, 64)


def test_a_rerun_replaces_a_damaged_copy_and_leaves_no_partial_files(data, tmp_path, capsys):
    local, _ = staged(capsys, data / "imgs.d2v2index", tmp_path / "stage")
    first = load_index(local).name(0)
    (tmp_path / "stage" / "imgs" / first).write_bytes(b"half")  # what a crash mid-copy without the rename leaves
    dead = (tmp_path / "stage" / "imgs" / first).with_name(f".{Path(first).name}.k9x2.tmp")  # a killed stager's
    dead.write_bytes(b"x")
    _, summary = staged(capsys, data / "imgs.d2v2index", tmp_path / "stage")
    assert copied(summary) == 1 and not dead.exists()
    same_files(data / "imgs", tmp_path / "stage" / "imgs", [first])
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["imgs", "imgs.d2v2index"]


def test_an_index_named_as_its_root_is_staged_beside_it(data, tmp_path, capsys):
    (data / "idx").mkdir()
    assert prepare_main(["images", str(data / "imgs"), str(data / "idx" / "imgs")]) == 0
    local, _ = staged(capsys, data / "idx" / "imgs", tmp_path / "stage")
    assert local == tmp_path / "stage" / f"imgs{SUFFIX}" and load_index(local).root == str(tmp_path / "stage" / "imgs")


# -------------------------------------------------------------------------------- refusals
def refused(capsys, *argv) -> str:
    code, out, err = run_stage(capsys, *argv)
    assert code == 2 and not out and len(err) == 1 and err[0].startswith("stage: error: "), (code, out, err)
    return err[0]


def test_refusals_are_one_line_and_copy_nothing(data, tmp_path, capsys, monkeypatch):
    stage_dir = tmp_path / "stage"
    assert "does not exist" in refused(capsys, tmp_path / "nowhere", stage_dir)
    assert "none of what stage copies" in refused(capsys, data / "a.txt", stage_dir)
    (tmp_path / "a_file").write_text("")
    assert "not writable" in refused(capsys, data / "imgs", tmp_path / "a_file" / "stage")
    index = load_index(data / "imgs.d2v2index")
    for k in (3, 7):
        (data / "imgs" / index.name(k)).unlink()
    err = refused(capsys, data / "imgs.d2v2index", stage_dir)
    assert "2 of the 12 files" in err and str(data / "imgs" / index.name(3)) in err
    assert not (stage_dir / "imgs").exists()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    err = refused(capsys, data / "aud.tsv", stage_dir)
    assert "1.0 kB free" in err and "6 of 6 files to copy" in err
    assert sorted(p.name for p in stage_dir.iterdir()) == []
    with pytest.raises(SystemExit) as exit_:
        stage_mod.main([str(data / "imgs"), str(stage_dir), "--threads", "0"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("stage: error: ")


def test_the_command_line_contract(data, tmp_path):
    """A real process: the last stdout line is the data.path, the one before it the summary."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "d2v2scale.data.stage", str(data / "tok"), str(tmp_path / "stage"), "--threads", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines()[-1] == str(tmp_path / "stage" / "tok")
    assert proc.stdout.splitlines()[-2].startswith("stage: 2 files, ")


# ---------------------------------------------------------------------------------- scale
def test_one_hundred_thousand_files_are_surveyed_in_seconds(tmp_path, capsys, monkeypatch):
    """10^5 listed files, each stat-ed through its own path (500 folders linked to one real folder
    of 200 one-byte files, so that making them costs no time): planning and the stat of every one,
    up to the space refusal, take seconds (~1 s here; the threads hide a shared file system's latency)."""
    n, root = 100_000, tmp_path / "big"
    (root / "real").mkdir(parents=True)
    for k in range(200):
        (root / "real" / f"f{k:03d}.jpg").write_bytes(b"x")
    for d in range(n // 200):
        (root / f"d{d:03d}").symlink_to("real")
    names = [f"d{k // 200:03d}/f{k % 200:03d}.jpg" for k in range(n)]
    save_index(DataIndex(str(root), *pack_names(names), meta={"kind": "images"}), tmp_path / "big.idx")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=n - 1))
    t0 = time.perf_counter()
    err = refused(capsys, tmp_path / "big.idx", tmp_path / "stage")
    elapsed = time.perf_counter() - t0
    assert f"{n} of {n} files to copy" in err and "100.0 kB in all" in err and elapsed < 10, (err, elapsed)
