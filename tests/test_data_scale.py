"""Data at real scale: a data set is indexed once per job and read everywhere with O(1) opens;
unusable files are found at read time and replaced the same way in every layout and resume."""
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from d2v2scale.data.audio import AUDIO_INDEX
from d2v2scale.data.files import DataError
from d2v2scale.data.images import IMAGE_INDEX
from d2v2scale.data.index import load_index, save_index
from d2v2scale.data.indexing import IndexSpec, build_index, ensure_index, is_current, publish, read_ticket
from d2v2scale.prepare import main as prepare_main
from d2v2scale.runfiles import read_metrics

from data_fixtures import make_audio, make_jpegs
from test_deepspeed_training import ROOT, _env, _launch, _torchrun


class Opens:
    """Counts ``open`` (files) and ``os.scandir`` (folders) audit events under a root, while active."""

    active: "Opens | None" = None

    def __init__(self, root: Path):
        self.root, self.files, self.listed = os.path.realpath(root), Counter(), Counter()

    def __enter__(self):
        Opens.active = self
        return self

    def __exit__(self, *exc):
        Opens.active = None

    @staticmethod
    def hook(event: str, args: tuple) -> None:
        self = Opens.active
        if self is None or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except ValueError:  # not a path (events also carry in-memory names)
            return
        if path.startswith(self.root):
            if event == "open":
                self.files[path] += 1
            elif event == "os.scandir":
                self.listed[path] += 1


sys.addaudithook(Opens.hook)


# ------------------------------------------------------------------------------ in-process
def test_index_file_round_trip_is_one_open_and_flat(tmp_path):
    """10^5 rows: a manifest indexed once, saved, and mapped back with one open, as flat arrays
    (no Python object per row); names, lengths and segment offsets survive exactly."""
    n = 100_000
    manifest = tmp_path / "big.tsv"
    rows = [f"spk{i // 3 % 97}/utt{i // 3:07d}.flac\t{16000 + i}" + (f"\t{i % 3 * 5}" if i % 5 else "")
            for i in range(n)]  # three rows per file; every fifth row a whole file, the others segments
    manifest.write_text("/data/libri\n" + "\n".join(rows) + "\n")
    index = build_index(manifest, AUDIO_INDEX)
    save_index(index, tmp_path / "big.idx")
    with Opens(tmp_path) as opens:
        loaded = load_index(tmp_path / "big.idx")
    assert sum(opens.files.values()) == 1
    assert len(loaded) == n and loaded.num_files == -(-n // 3)
    assert isinstance(loaded.length, np.ndarray) and loaded.length.tolist() == [16000 + i for i in range(n)]
    assert loaded.offset[7] == 5 and loaded.offset[5] == -1  # a segment row, a whole-file row
    assert loaded.path(4) == Path("/data/libri/spk1/utt0000001.flac")
    assert loaded.nbytes() / n < 60  # ~25 bytes of name per file + 3 int64 per row


def test_a_folder_is_listed_once_and_only_its_changed_folders_again(tmp_path):
    """The builder lists every folder once and opens at most the few files it samples; a stale
    index is brought up to date by listing only the folders whose mtime changed."""
    make_jpegs(tmp_path / "data", 40)
    for k in range(2, 6):
        (tmp_path / "data" / f"class{k}").mkdir()
        shutil.copy(tmp_path / "data" / "class0" / "img0000.jpg", tmp_path / "data" / f"class{k}" / "a.jpg")
    settled = time.time_ns() - 10**10  # a data set written 10 s ago (folders changed within 2 s of a build are re-listed)
    for folder in [tmp_path / "data", *(tmp_path / "data").iterdir()]:
        os.utime(folder, ns=(settled, settled))
    spec = IndexSpec(str(tmp_path / "data"), IMAGE_INDEX, str(tmp_path / "cache.idx"))
    with Opens(tmp_path / "data") as opens:
        index = ensure_index(spec)
    publish(index, spec)
    assert len(index) == 44 and index.origin == "built"
    assert set(opens.listed.values()) == {1} and len(opens.listed) == 7  # the root and its 6 folders
    assert sum(opens.files.values()) <= 8 and max(opens.files.values()) == 1  # the sample only
    shutil.copy(tmp_path / "data" / "class0" / "img0000.jpg", tmp_path / "data" / "class3" / "b.jpg")
    stale = load_index(tmp_path / "cache.idx")
    assert not is_current(stale, tmp_path / "data", "images")
    with Opens(tmp_path / "data") as opens:
        fresh = build_index(tmp_path / "data", IMAGE_INDEX, previous=stale)
    assert list(opens.listed) == [os.path.realpath(tmp_path / "data" / "class3")]
    assert len(fresh) == 45 and is_current(fresh, tmp_path / "data", "images")
    assert [fresh.name(i) for i in range(45)] == [build_index(tmp_path / "data", IMAGE_INDEX).name(i)
                                                  for i in range(45)]
    (tmp_path / "cache.idx").write_bytes(b"D2V2IDX1 and then garbage")  # a damaged cache is rebuilt, not fatal
    again = ensure_index(IndexSpec(spec.source, IMAGE_INDEX, spec.cache, 3))
    assert again.origin == "built" and len(again) == 45


def test_readers_map_only_the_builders_file(tmp_path):
    """A reading rank opens no data file: it maps the file the builder's ticket names once that file
    shows the builder's stamp; an earlier build at the same path (a stale cache, another job's) is
    never taken for it — the reader waits, then says so in one line."""
    make_audio(tmp_path / "a", 6)
    spec = IndexSpec(str(tmp_path / "a"), AUDIO_INDEX, str(tmp_path / "cache.idx"))
    save_index(build_index(tmp_path / "a", AUDIO_INDEX), tmp_path / "cache.idx")  # an earlier build
    built = build_index(tmp_path / "a", AUDIO_INDEX)  # this job's builder
    ticket = {"path": str(tmp_path / "cache.idx"), "built": built.meta["built"], "rows": len(built)}
    with pytest.raises(DataError, match="not visible here after 1 s"):
        read_ticket(ticket, wait_s=1)
    assert publish(built, spec) == ticket  # the builder writes its own build over the old one
    with Opens(tmp_path / "a") as opens:
        got = read_ticket(ticket, wait_s=1)
    assert not opens.files and not opens.listed
    assert got.length.tolist() == built.length.tolist()


def _greedy_buckets(lengths: list[int], max_tokens: int, max_size: int) -> list[list[int]]:
    """The bucketing rule written out directly: length-sorted, add while count × longest fits."""
    order = sorted(range(len(lengths)), key=lambda i: (min(lengths[i], max_size), i))
    batches, current, longest = [], [], 0
    for i in order:
        n = min(lengths[i], max_size)
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    return batches + [current] if current else batches


def test_vectorised_bucketing_is_the_greedy_rule():
    """Every rank buckets every utterance at start-up, so it is vectorised; it must be exactly the
    greedy rule, on 300 random cases (ties, clipping, one-member batches) and at 10^5 rows."""
    from d2v2scale.data.audio import bucket_batches

    rng = np.random.default_rng(0)
    cases = [(int(rng.integers(1, 300)), int(rng.integers(5, 200)), int(rng.integers(200, 2000))) for _ in range(300)]
    for n, max_size, max_tokens in cases + [(100_000, 320_000, 1_400_000)]:
        lengths = rng.integers(1, 2 * max_size, n)
        order, bounds = bucket_batches(lengths, max(max_tokens, max_size), max_size)
        got = [order[bounds[k] : bounds[k + 1]].tolist() for k in range(len(bounds) - 1)]
        assert got == _greedy_buckets(lengths.tolist(), max(max_tokens, max_size), max_size), (n, max_size)


def test_synthetic_audio_under_a_sample_budget_counts_samples_not_items():
    """``data.max_tokens`` is a budget of samples: a synthetic micro-batch holds floor(budget / item
    length) items, as the real audio source does - not ``max_tokens`` items (a 10^6-sample budget
    used to ask for 10^6 items of 4000 samples: 16 GB), keyed by micro-batch id like the real one."""
    import torch

    from d2v2scale.config import load_config
    from d2v2scale.data.loader import StepLoader
    from d2v2scale.data.schedule import RankSchedule
    from d2v2scale.data.synthetic import SyntheticSource

    for budget in (4_000, 1_002_000, 1_000_000):  # the small one first: the old rule fails it cheaply
        cfg = load_config("tiny_audio", [f"data.max_tokens={budget}", "data.kind=synthetic"])
        items = budget // cfg.data.sample_length  # 1, 250, 250
        schedule = RankSchedule(global_batch=2 * budget, micro_batch=budget, grad_accum=1, dp_rank=1, dp_size=2)
        loader = StepLoader(cfg, schedule, torch.device("cpu"), torch.float32)
        try:
            (mb,) = loader.step(3)
        finally:
            loader.close()
        first = (3 * 2 + 1) * items  # micro-batch id 7 of a 2-rank step
        assert mb.source.shape == (items, cfg.data.sample_length), budget
        assert torch.equal(mb.sample_ids, torch.arange(first, first + items))
        reference, _ = SyntheticSource(load_config("tiny_audio")).batch(torch.arange(first, first + items))
        assert torch.equal(mb.source, reference)  # the same items the position-keyed source draws


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
    for argv, needle in [(["images", str(tmp_path / "nope"), str(tmp_path / "o")], "does not exist"),
                         (["images", str(tmp_path), str(tmp_path)], "is a folder"),
                         (["audio", str(tmp_path), str(tmp_path / "o.tsv"), "--threads", "0"], "--threads"),
                         (["audio", str(tmp_path), str(tmp_path / "o.tsv")], "no .flac or .wav"),
                         (["videos", str(tmp_path), "o"], "invalid choice")]:
        try:
            code = prepare_main(argv)
        except SystemExit as e:  # argparse's own errors exit from inside
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], (argv, err)


# --------------------------------------------------------------------------- launches
AUDIT = ["tests/dist/open_audit.py", "--ds_config", "ds_configs/cpu_tiny.json", "train.max_updates=1",
         "train.allow_long_warmup=true", "data.num_workers=2"]


def _audited(tmp_path: Path, name: str, data_root: Path, preset: str, *overrides: str) -> dict[int, list]:
    out = tmp_path / f"audit_{name}"
    out.mkdir()
    env = dict(_env(), AUDIT_ROOT=str(data_root), AUDIT_OUT=str(out))
    cmd = [*_torchrun(2), *AUDIT, "--preset", preset, "--run_dir", str(tmp_path / f"run_{name}"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}


def _startup(records: list) -> Counter:
    return Counter(path for path, for_a_step in records if not for_a_step)


@pytest.mark.slow
def test_only_the_builder_touches_data_files_before_step_1(tmp_path, dali):
    """2-process launches under an audit hook on ``open``: on an image folder and an audio folder,
    rank 1 opens no data file before step 1 and rank 0 (the builder) opens each at most once; with
    a prepared index (images) or manifest (audio) nobody opens one before step 1."""
    make_jpegs(tmp_path / "img", 48)
    make_audio(tmp_path / "aud", 16)
    image = ["data.kind=images", f"data.path={tmp_path / 'img'}"]
    audio = ["data.kind=audio", "data.max_tokens=24000", "data.min_sample_size=4000", "data.max_sample_size=12000",
             "train.global_batch=48000"]
    opened = _audited(tmp_path, "img", tmp_path / "img", "tiny_image", *image)
    assert not _startup(opened[1]) and set(_startup(opened[0]).values()) == {1}
    assert any(for_a_step for _, for_a_step in opened[1])  # the audit saw rank 1's step reads
    opened = _audited(tmp_path, "aud", tmp_path / "aud", "tiny_audio", *audio, f"data.path={tmp_path / 'aud'}")
    assert not _startup(opened[1])
    assert set(_startup(opened[0])) == {str(p) for p in (tmp_path / "aud").iterdir()}  # headers, once each
    assert set(_startup(opened[0]).values()) == {1}

    assert prepare_main(["images", str(tmp_path / "img"), str(tmp_path / "img.d2v2index")]) == 0
    assert prepare_main(["audio", str(tmp_path / "aud"), str(tmp_path / "aud.tsv"), "--max-seconds", "0.5"]) == 0
    opened = _audited(tmp_path, "img_prepared", tmp_path / "img", "tiny_image", "data.kind=images",
                      f"data.path={tmp_path / 'img.d2v2index'}")
    assert not _startup(opened[0]) and not _startup(opened[1])
    opened = _audited(tmp_path, "aud_prepared", tmp_path / "aud", "tiny_audio", *audio,
                      f"data.path={tmp_path / 'aud.tsv'}")
    assert not _startup(opened[0]) and not _startup(opened[1])


@pytest.mark.slow
def test_files_broken_after_indexing_are_replaced_alike_in_every_layout_and_resume(tmp_path, dali):
    """Three files emptied after the index was prepared: each is logged once and counted, its
    samples read their substitutes; a 2-process run resumed at step 3 on 1 process with another
    micro-batch continues with the same losses (the same batches)."""
    make_jpegs(tmp_path / "img", 40)
    assert prepare_main(["images", str(tmp_path / "img"), str(tmp_path / "img.idx")]) == 0
    broken = sorted((tmp_path / "img").rglob("*.jpg"))[::13][:3]
    for path in broken:
        path.write_bytes(b"")
    args = ["launchers/pretrain.py", "--preset", "tiny_image", "data.kind=images", f"data.path={tmp_path / 'img.idx'}",
            "train.max_updates=6", "train.save_every=3", "train.log_every=1", "train.allow_long_warmup=true",
            "model.mask_noise_std=0"]
    proc = _launch(_torchrun(2), *args, "--ds_config", "ds_configs/cpu_tiny_zero1_mb16.json", "--run_dir",
                   str(tmp_path / "a"))
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert rows[-1]["skipped_samples"] == 3  # 192 samples: every file is read (4.8 epochs of 40)
    for path in broken:
        assert (proc.stdout + proc.stderr).count(f"skipping {path}: empty file") == 1
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_00000003\n")
    _launch([sys.executable], *args, "--ds_config", "ds_configs/cpu_tiny.json", "--run_dir", str(tmp_path / "b"),
            "--resume", "auto")  # one micro-batch of 32
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "b" / "metrics.jsonl")}
    for row in rows[3:]:
        assert abs(resumed[row["step"]]["loss"] - row["loss"]) <= 1e-5 * abs(row["loss"]), row["step"]
