"""Image and text loaders on generated files: shapes, normalisation, sharding, determinism, bad files."""
import sys

import numpy as np
import pytest
import torch

from d2v2scale.data.build_tokens import build, byte_tokenizer
from d2v2scale.data.files import DataError
from d2v2scale.data.images import IMAGE_INDEX, MEAN, STD, ImageSource, crop_params, substitute
from d2v2scale.data.indexing import build_index
from d2v2scale.data.schedule import RankSchedule, epoch_indices
from d2v2scale.data.text import TokenBlocks

from data_fixtures import make_jpegs



@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    make_jpegs(root, 24, corrupt=4)
    return root


def test_unusable_files_are_found_at_read_time_and_replaced_the_same_way_in_every_split(jpeg_dir, dali):
    """Indexing opens no image; reading an epoch finds the empty, truncated and wrong-format files
    (bytes) and the undecodable one (DALI), and every split of the positions gets the same pixels:
    each unusable position reads the substitute its position names."""
    index = build_index(jpeg_dir, IMAGE_INDEX)
    assert len(index) == 28 and index.skipped == []  # 24 good + 4 bad, none opened
    whole = ImageSource(index, 32, 3, seed=0, batch_size=28, device=torch.device("cpu"), verbose=False)
    x, _ = whole.batch(torch.arange(28))
    reasons = sorted(whole.bad.values())
    assert len(reasons) == 4 and torch.isfinite(x).all()
    assert reasons[0] == "empty file" and reasons[1] == "failed to decode" and "not a JPG" in reasons[2] \
        and "truncated" in reasons[3]
    split = ImageSource(index, 32, 3, seed=0, batch_size=7, device=torch.device("cpu"), verbose=False)
    assert torch.equal(torch.cat([split.batch(torch.arange(k, k + 7))[0] for k in range(0, 28, 7)]), x)
    files = epoch_indices(torch.arange(28), 28, 0).tolist()
    for position, file in enumerate(files):
        if file in whole.bad:  # its substitute: the first usable file of the position's own sequence
            sub = next(s for s in (substitute(0, position, a, 28) for a in range(1, 64)) if s not in whole.bad)
            alone = ImageSource(index, 32, 3, seed=0, batch_size=1, device=torch.device("cpu"), verbose=False)
            assert torch.equal(_with_file(alone, sub, position), x[position])


def _with_file(src, file: int, position: int) -> torch.Tensor:
    """What ``src`` makes of ``file`` at ``position`` (its crop and flip), read directly."""
    from d2v2scale.data.images import crop_params

    data = np.fromfile(src.index.path(file), dtype=np.uint8)
    return src._run_dali([data], crop_params(src.seed, torch.tensor([position])))[0]


def test_image_batches_shape_normalisation_and_determinism(jpeg_dir, dali):
    src = ImageSource(str(jpeg_dir), 32, 3, seed=0, batch_size=8, device=torch.device("cpu"))
    x, _ = src.batch(torch.arange(8))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    lo = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    assert bool(((x >= lo - 1e-3) & (x <= hi + 1e-3)).all())
    assert x.std() > 0.1
    # a second source (another TP rank) reading the same positions gets identical batches
    other = ImageSource(str(jpeg_dir), 32, 3, seed=0, batch_size=8, device=torch.device("cpu"))
    assert torch.equal(other.batch(torch.arange(8))[0], x)
    assert not torch.equal(src.batch(torch.arange(8, 16))[0], x)


def test_dali_matches_the_pil_fallback(jpeg_dir, dali):
    """Same crop windows and flips: the two decoders/resizers differ only in rounding and filters."""
    src = ImageSource(str(jpeg_dir), 32, 3, seed=0, batch_size=4, device=torch.device("cpu"))
    positions = torch.arange(4)
    dali, _ = src.batch(positions)
    src.pipe = None
    pil, _ = src.batch(positions)
    assert (dali - pil).abs().mean() < 0.1  # normalised units (≈ 6/255 of the pixel range)


def test_every_file_once_per_epoch_across_dp_ranks():
    n, g = 20, 8
    seen = []
    for step in range(5):  # 40 positions = 2 epochs of 20 files
        for r in range(2):
            for pos in RankSchedule(g, 4, 1, r, 2).positions(step):
                seen += epoch_indices(pos, n, seed=3).tolist()
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))


def test_decode_failure_is_skipped_and_counted(jpeg_dir, dali):
    src = ImageSource(str(jpeg_dir), 32, 3, seed=0, batch_size=28, device=torch.device("cpu"))
    x, _ = src.batch(torch.arange(28))  # one epoch: includes the file with garbage between valid markers
    assert x.shape == (28, 3, 32, 32) and torch.isfinite(x).all()
    assert src.skipped == 4 and list(src.bad.values()).count("failed to decode") == 1


def test_crop_params_are_keyed_by_position():
    a = crop_params(1, torch.tensor([5, 6]))
    b = crop_params(1, torch.tensor([6]))
    assert np.array_equal(a[1], b[0])
    assert (a[:, 0] >= 0.2).all() and (a[:, 0] <= 1).all()
    assert (np.exp(a[:, 1]) >= 0.75 - 1e-6).all() and (np.exp(a[:, 1]) <= 4 / 3 + 1e-6).all()


def test_no_usable_files_fails_clearly(tmp_path, dali):
    """No image files, or only unusable ones among those the builder samples: refused at indexing.
    Files that all break after indexing: one DataError at read time (the launcher exits 2)."""
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="has no usable files"):
        build_index(tmp_path, IMAGE_INDEX)
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="has no usable files .*x.jpg: empty file"):
        build_index(tmp_path, IMAGE_INDEX)
    make_jpegs(tmp_path, 2)
    src = ImageSource(build_index(tmp_path, IMAGE_INDEX), 32, 3, seed=0, batch_size=1,
                      device=torch.device("cpu"), verbose=False)
    for path in tmp_path.rglob("*.jpg"):
        path.write_bytes(b"")
    with pytest.raises(DataError, match="unusable for position 0"):
        src.batch(torch.arange(1))


def test_token_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    meta = build(tmp_path / "tok", [tmp_path / "a.txt"], byte_tokenizer)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 258
    blocks = TokenBlocks(tmp_path / "tok", 64, 258, seed=0)
    x, _ = blocks.batch(torch.arange(4))
    assert x.shape == (4, 64) and x.dtype == torch.int64
    assert not bool((x == 1).any())  # no padding ids inside blocks
    with pytest.raises(DataError, match="vocabulary"):
        TokenBlocks(tmp_path / "tok", 64, 100, seed=0)


def _pretrain(launcher: list[str], preset: str, run_dir, *overrides: str) -> list[dict]:
    """``launchers/pretrain.py`` with ``ds_configs/cpu_tiny.json``; the metrics rows the run wrote."""
    from test_deepspeed_training import LAUNCH, _launch
    from d2v2scale.runfiles import read_metrics

    proc = _launch(launcher, *LAUNCH, "--preset", preset, "--run_dir", str(run_dir), *overrides,
                   "train.allow_long_warmup=true")
    _pretrain.output = proc.stdout + proc.stderr
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.slow
def test_tiny_image_trains_on_jpegs_with_ten_percent_bad_files(tmp_path, dali):
    from test_deepspeed_training import _torchrun

    bad = make_jpegs(tmp_path / "jpegs", 90, corrupt=10)["bad"]
    rows = _pretrain(_torchrun(2), "tiny_image", tmp_path / "run", "data.kind=images",
                     f"data.path={tmp_path / 'jpegs'}", "train.max_updates=8", "train.log_every=4")
    # every bad file is met within these 256 samples (3 epochs of 100 files), at read time: 8 by
    # their bytes, the 2 with valid markers around garbage when they fail to decode
    assert rows[-1]["step"] == 8 and rows[-1]["skipped_samples"] == 10
    for path in bad:  # each logged exactly once in the run, whichever rank met it
        assert _pretrain.output.count(f"skipping {path}:") == 1, (path, _pretrain.output[-3000:])


@pytest.mark.slow
def test_tiny_text_trains_on_a_token_file(tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    build(tmp_path / "tok", [tmp_path / "a.txt"], byte_tokenizer)
    rows = _pretrain([sys.executable], "tiny_text", tmp_path / "run", "data.kind=text",
                     f"data.path={tmp_path / 'tok'}", "train.max_updates=6", "train.log_every=3")
    assert rows[-1]["step"] == 6 and rows[-1]["loss"] < rows[0]["loss"] * 2


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    from data_fixtures import make_audio

    root = tmp_path_factory.mktemp("audio")
    make_audio(root, 16, corrupt=3)
    return root


def test_audio_index_batches_and_crops(audio_dir, dali):
    from d2v2scale.data.audio import AudioSource
    from d2v2scale.data.headers import header_length

    src = AudioSource(str(audio_dir), max_tokens=32000, min_size=4000, max_size=12000, seed=0, verbose=False)
    length = src.index.length
    assert len(src.rows) == 16 and src.skipped == 3
    # header lengths of the 44.1 kHz files are converted to 16 kHz
    frames, rate = header_length(sorted(audio_dir.glob("utt0001.*"))[0])
    assert rate == 44100 and length[1] == frames * 16000 // 44100
    batches = [src.batch_rows(k).tolist() for k in range(src.num_batches)]
    for members in batches:
        assert len(members) * max(min(length[i], 12000) for i in members) <= 32000
    assert sorted(i for b in batches for i in b) == list(range(16))  # each file once per epoch
    for batch_id in range(src.num_batches):
        x, lengths, ids = src.batch_by_id(batch_id)
        assert x.shape[0] == len(lengths) == len(ids) and x.shape[1] == int(lengths.max())
        assert bool((lengths <= 12000).all()) and bool((lengths >= 4000).all())
        assert x.numel() <= 32000
        for row, n, i in zip(x, lengths, ids):
            member = length[src._batch_members(batch_id)[int(i) - batch_id * src.max_count]]
            # decoded at 16 kHz: the uncropped waveform has the header length (±1 from resampling)
            assert n == min(member, 12000) or abs(int(n) - member) <= 1
            assert abs(float(row[:n].std()) - 1.0) < 0.2 and bool((row[n:] == 0).all())
    again = AudioSource(str(audio_dir), max_tokens=32000, min_size=4000, max_size=12000, seed=0, verbose=False)
    assert torch.equal(again.batch_by_id(3)[0], src.batch_by_id(3)[0])  # a TP peer reads the same


@pytest.mark.slow
def test_tiny_audio_trains_on_wav_and_flac_files(tmp_path, dali):
    from data_fixtures import make_audio
    from test_deepspeed_training import _torchrun

    make_audio(tmp_path / "audio", 24, corrupt=3)
    rows = _pretrain(_torchrun(2), "tiny_audio", tmp_path / "run", "data.kind=audio", f"data.path={tmp_path / 'audio'}",
                     "data.max_tokens=24000", "data.min_sample_size=4000", "data.max_sample_size=12000",
                     "train.global_batch=48000", "train.max_updates=6", "train.log_every=3")
    assert rows[-1]["step"] == 6 and rows[-1]["skipped_samples"] == 3
    assert all(isinstance(r["loss"], float) for r in rows)
