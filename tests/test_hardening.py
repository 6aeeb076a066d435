"""Hostile input: run directories, start-up checks, Ctrl-C, a full disk, and sweeps of malformed
command lines and data files. Every case is a one-line exit 2 at start, a clean stop, or a
counted, once-logged skip — never a traceback or a silent loss."""
import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from d2v2scale.train.checkpoint import CheckpointWriteError

from data_fixtures import make_jpegs
from test_deepspeed_training import LAUNCH, _env, _launch

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_image"]
SHORT = ["train.max_updates=2", "train.log_every=1", "train.save_every=2", "train.allow_long_warmup=true"]


def _launcher():
    spec = importlib.util.spec_from_file_location("pretrain_launcher", ROOT / "launchers" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAUNCHER = _launcher()


def _main(*argv) -> tuple[int, str, str]:
    """The launcher in this process: bad input must fail in ``prepare``, before any process group."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = LAUNCHER.main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    _launch([sys.executable], *LAUNCH, "--preset", "tiny_image", "--run_dir", str(run_dir), *SHORT)
    return run_dir


def test_an_existing_run_is_never_reused_without_resume(finished_run):
    before = (finished_run / "metrics.jsonl").read_text()
    code, _, err = _main(*BASE, "--run_dir", str(finished_run), *SHORT)
    assert code == 2
    line = _one_line(err)
    assert "already holds a run (checkpoints up to step_00000002)" in line and "--resume auto" in line
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_resume_auto_on_a_finished_run_is_complete(finished_run):
    start = time.perf_counter()
    code, out, err = _main(*BASE, "--run_dir", str(finished_run), "--resume", "auto", *SHORT)
    assert code == 0 and err == ""
    assert "already complete at step 2" in out
    assert time.perf_counter() - start < 5  # no process group, no engine


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 10}\n')
    (run_dir / "config.yaml").write_text("old: true\n")
    code, out, err = _main(*BASE, "--run_dir", str(run_dir), "--overwrite", "--dry_run", *SHORT)
    assert code == 0, err  # a dry run moves nothing
    assert (run_dir / "metrics.jsonl").exists()
    _launch([sys.executable], *LAUNCH, "--preset", "tiny_image", "--run_dir", str(run_dir), "--overwrite", *SHORT)
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 10}\n'
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_rows_of_an_attempt_that_died_before_its_checkpoint_are_not_repeated(tmp_path):
    """--resume auto with no checkpoint yet (killed before the first save) starts at step 0: the
    rows it wrote are dropped, not appended to."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    proc = _launch([sys.executable], *LAUNCH, "--preset", "tiny_image", "--run_dir", str(run_dir),
                   "--resume", "auto", *SHORT)
    assert "dropped 1 rows past step 0" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.0


def _wav(path: Path, data: np.ndarray, subtype="PCM_16", rate=16000):
    soundfile.write(path, data, rate, subtype=subtype)


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, text the one-line error must contain), at least 40."""
    (tmp / "afile").write_text("x")
    empty = tmp / "empty_dir"
    empty.mkdir()
    corrupt = tmp / "corrupt_jpegs"
    corrupt.mkdir()
    for k in range(3):
        (corrupt / f"{k}.jpg").write_bytes(b"")
    (tmp / "nojson.bin").write_bytes(b"\x00" * 100)
    (tmp / "badmeta.bin").write_bytes(b"\x00" * 100)
    (tmp / "badmeta.json").write_text("{not json")
    manifests = {"nonint": "clip.wav\tabc", "missing": "clip.wav", "negative": "clip.wav\t-5"}
    for name, line in manifests.items():
        (tmp / f"{name}.tsv").write_text(f"{tmp}\n{line}\n")
    (tmp / "noroot.tsv").write_text("")
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    bad_ds = {"micro5.json": {**ds, "train_micro_batch_size_per_gpu": 5},
              "auto_lr.json": {**ds, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}}
    for name, content in bad_ds.items():
        (tmp / name).write_text(json.dumps(content))
    (tmp / "notjson.json").write_text("{")
    audio = ["--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_audio"]
    text = ["--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_text"]
    rd = ["--run_dir", str(tmp / "r")]
    return [
        (BASE + rd + ["model.foo=1"], "model.foo"),
        (BASE + rd + ["foo=1"], "unknown key 'foo'"),
        (BASE + rd + ["model.depth"], "section.key=value"),
        (BASE + rd + ["a.b.c=1"], "section.key=value"),
        (BASE + rd + ["train.max_updates=ten"], "train.max_updates"),
        (BASE + rd + ["train.max_updates=0"], "train.max_updates=0"),
        (BASE + rd + ["train.max_updates=-3"], "train.max_updates=-3"),
        (BASE + rd + ["masking.mask_prob=1.5"], "masking.mask_prob"),
        (BASE + rd + ["masking.mask_prob=0"], "masking.mask_prob"),
        (BASE + rd + ["model.clone_batch=0"], "model.clone_batch"),
        (BASE + rd + ["model.num_heads=3"], "model.num_heads=3"),
        (BASE + rd + ["parallel.tp=3"], "parallel.tp"),
        (BASE + rd + ["parallel.tp=0"], "parallel.tp=0"),
        (BASE + rd + ["model.encoder_dropout=1.0"], "model.encoder_dropout"),
        (BASE + rd + ["model.activation_checkpointing=-1"], "model.activation_checkpointing"),
        (BASE + rd + ["model.average_top_k_layers=99"], "model.average_top_k_layers"),
        (BASE + rd + ["teacher.ema_decay=1.5"], "teacher.ema_decay"),
        (BASE + rd + ["data.kind=imagenet"], "data.kind"),
        (BASE + rd + ["data.kind=images"], "data.path"),
        (BASE + rd + ["data.kind=images", f"data.path={tmp / 'nope'}"], "does not exist"),
        (BASE + rd + ["data.kind=images", f"data.path={empty}"], "no usable files"),
        (BASE + rd + ["data.kind=images", f"data.path={corrupt}"], "no usable files"),
        (BASE + rd + ["data.prefetch_steps=-1"], "data.prefetch_steps"),
        (BASE + rd + ["train.batch_scaling=quadratic"], "train.batch_scaling"),
        (BASE + ["--run_dir", str(tmp / "afile")], "not a directory"),
        (BASE + ["--run_dir", str(tmp / "afile" / "sub")], "not a directory"),
        (BASE + ["--run_dir", "/proc/d2v2scale-run"], "not writable"),
        (BASE + rd + ["--resume", "step_00000042"], "--resume"),
        (BASE + rd + ["--bogus_flag"], "unrecognized arguments"),
        (["--preset", "tiny_image"] + rd, "--ds_config"),
        (["--ds_config", "ds_configs/cpu_tiny.json", "--preset", "vit_z"] + rd, "vit_z"),
        (["--ds_config", str(tmp / "missing.json"), "--preset", "tiny_image"] + rd, "missing.json"),
        (["--ds_config", str(tmp / "notjson.json"), "--preset", "tiny_image"] + rd, "not valid JSON"),
        (["--ds_config", str(tmp / "micro5.json"), "--preset", "tiny_image"] + rd, "batch math"),
        (["--ds_config", str(tmp / "auto_lr.json"), "--preset", "tiny_image"] + rd, "auto"),
        (["--ds_config", "ds_configs/vit_h.json", "--preset", "tiny_image"] + rd, "warms up for 50040 updates"),
        (["--ds_config", "ds_configs/cpu_tiny.json", "--preset", str(tmp / "missing.yaml")] + rd, "does not exist"),
        (text + rd + ["model.vocab_size=0"], "model.vocab_size=0"),
        (text + rd + ["data.kind=text", f"data.path={tmp / 'nojson'}"], "expected"),
        (text + rd + ["data.kind=text", f"data.path={tmp / 'badmeta'}"], "not a token-file description"),
        (audio + rd + ["data.min_sample_size=1"], "receptive field"),
        (audio + rd + ["data.max_sample_size=100", "data.min_sample_size=200"], "data.max_sample_size=100"),
        (audio + rd + ["data.kind=audio"], "data.max_tokens"),
        (audio + rd + ["data.kind=images", f"data.path={corrupt}"], "data.kind=images is not data for model.modality=audio"),
        (text + rd + ["data.kind=digits"], "data.kind=digits is not data for model.modality=text"),
        (audio + rd + ["data.kind=audio", "data.max_tokens=8000", "data.max_sample_size=9000"], "exceeds data.max_tokens"),
        (audio + rd + ["model.cuda_graphs=true"], "needs model.compile=true"),
        (audio + rd + ["model.compile=true", "model.cuda_graphs=true", "data.kind=audio", "data.max_tokens=8000"],
         "vary in length"),
    ] + [
        (audio + rd + ["data.kind=audio", "data.max_tokens=8000", "train.global_batch=16000",
                       f"data.path={tmp / f'{name}.tsv'}"],
         "first line must be" if name == "noroot" else "expected 'relative/path<TAB>num_samples'")
        for name in ["nonint", "missing", "negative", "noroot"]
    ]


def test_malformed_command_lines_sweep(tmp_path):
    cases = _bad_inputs(tmp_path)
    assert len(cases) >= 40
    for argv, needle in cases:
        code, _, err = _main(*argv)
        assert code == 2, (argv, err)
        assert needle in _one_line(err), (argv, err)


def test_a_ds_config_for_another_preset_is_named(tmp_path):
    code, out, err = _main("--ds_config", "ds_configs/vit_h.json", "--preset", "tiny_image", "--run_dir",
                           str(tmp_path / "r"), "--dry_run", "train.allow_long_warmup=true")
    assert code == 0, err
    assert "ds_configs/vit_h.json is written for preset 'vit_h', this run is 'tiny_image'" in out


def test_ctrl_c_checkpoints_the_step_and_exits_3(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(_env(), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, *LAUNCH, "--preset", "tiny_image", "--run_dir", str(run_dir),
                             "train.max_updates=500", "train.log_every=1", "train.save_every=1000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Ctrl-C: finishing this step and checkpointing" in out
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[-1]["step"] in (saved, saved - 1) and saved >= 3


class _FakeBackend:
    """One fp32 weight with its AdamW moments: enough state for a real layout-free checkpoint write."""

    def __init__(self):
        self.w = torch.zeros(250)

    def state_ranges(self):
        return [("w", 0, 250, {"model": self.w, "exp_avg": self.w, "exp_avg_sq": self.w})]

    def counters(self):
        return {"optimizer_steps": 0, "lr_iteration": 0, "skipped_steps": 0, "global_steps": 0}


class _FakeTeacher:
    num_updates = 0

    def ranges(self):
        return [("w", 0, 250, torch.zeros(250))]


def _fake_trainer():
    from types import SimpleNamespace

    dims = SimpleNamespace(rank=0, tp_rank=0, dp_rank=0)
    cfg = SimpleNamespace(train=SimpleNamespace(checkpoint_format="layout_free"))
    return SimpleNamespace(backend=_FakeBackend(), teacher=_FakeTeacher(), tp_rng=None, dims=dims, cfg=cfg,
                           params={"w": ((250,), None)}, device=torch.device("cpu"))


def test_a_full_disk_is_one_line_and_keeps_latest(tmp_path, monkeypatch):
    from d2v2scale.train import checkpoint

    ckpt = tmp_path / "checkpoints"
    tr = _fake_trainer()
    checkpoint.save_checkpoint(tr, ckpt, 2, 3, {"config": {}})
    assert checkpoint.read_latest(ckpt) == "step_00000002"

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(CheckpointWriteError) as e:
        checkpoint.save_checkpoint(tr, ckpt, 4, 3, {"config": {}})
    message = str(e.value)
    assert "\n" not in message and "step_00000004.tmp" in message and "ENOSPC" in message
    assert "latest stays step_00000002" in message
    assert not (ckpt / "step_00000004.tmp").exists() and checkpoint.read_latest(ckpt) == "step_00000002"

    monkeypatch.undo()
    usage = type("Usage", (), {"free": 10, "total": 10**9, "used": 0})
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(CheckpointWriteError, match="not enough space for the step-6 checkpoint"):
        checkpoint.save_checkpoint(tr, ckpt, 6, 3, {"config": {}})
    assert not (ckpt / "step_00000006.tmp").exists() and checkpoint.read_latest(ckpt) == "step_00000002"


def _image_cases(root: Path) -> tuple[int, int]:
    """(usable, unusable) image entries of every kind we could think of."""
    from PIL import Image

    good = make_jpegs(root / "good", 6)["good"]
    raw = good[0].read_bytes()
    bad = root / "cases"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "one_byte.jpg").write_bytes(b"\xff")
    (bad / "text.jpg").write_text("not an image")
    (bad / "png_named.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (bad / "half.jpg").write_bytes(raw[: len(raw) // 2])
    (bad / "no_eoi.jpg").write_bytes(raw[:-2])
    (bad / "garbage_body.jpg").write_bytes(raw[:200] + os.urandom(len(raw) - 400) + raw[-200:])
    (bad / "dir.jpg").mkdir()
    (bad / "broken.jpg").symlink_to(bad / "nowhere.jpg")
    (bad / "magic_only.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(300) + b"\xff\xd9")
    (bad / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10))
    usable = root / "ok"
    usable.mkdir()
    (usable / "trailing.jpg").write_bytes(raw + b"EXIF-like trailer" * 20)
    (usable / "UPPER.JPG").write_bytes(raw)
    (usable / "link.jpg").symlink_to(good[1])
    Image.new("L", (40, 30), 128).save(usable / "gray.jpg")
    Image.new("RGBA", (33, 17), (1, 2, 3, 100)).save(usable / "alpha.png")
    Image.new("RGB", (1, 1), (250, 0, 0)).save(usable / "tiny.png")
    Image.new("RGB", (64, 48), (0, 90, 0)).save(usable / "progressive.jpg", progressive=True)
    Image.new("CMYK", (32, 32), (0, 50, 100, 0)).save(usable / "cmyk.jpg")
    return 6 + 8, 11


def test_malformed_image_files_sweep(tmp_path, capsys, dali, run_logging):
    """Each unusable file is one warning line on stderr, as a run shows it (its logging set up
    here, not left over from another test), and is replaced, never a crash."""
    from d2v2scale.data.images import ImageSource

    n_good, n_bad = _image_cases(tmp_path)
    src = ImageSource(str(tmp_path), 32, 3, seed=0, batch_size=8, device=torch.device("cpu"))
    total = len(src)
    for start in range(0, 2 * total, 8):  # two epochs: a bad file is found, logged once, then reused around
        x, _ = src.batch(torch.arange(start, start + 8))
        assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert src.skipped == n_bad, (src.skipped_files(), err)
    for name in src.skipped_files():
        assert err.count(Path(name).name + ":") == 1, (name, err)
    assert total - len(src.bad) == n_good  # every usable file stayed in


def _audio_cases(root: Path) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(np.arange(6000) * 0.05)).astype(np.float32)
    ok = bad = root / "a"  # one folder, as a real data set mixes them
    ok.mkdir()
    usable = []
    for name, data, subtype, rate in [("pcm16.wav", tone, "PCM_16", 16000), ("float32.wav", tone, "FLOAT", 16000),
                                      ("pcm24.wav", tone, "PCM_24", 16000), ("u8.wav", tone, "PCM_U8", 16000),
                                      ("stereo.wav", np.stack([tone, tone], 1), "PCM_16", 16000),
                                      ("rate8k.wav", tone, "PCM_16", 8000), ("rate44k.flac", tone, "PCM_16", 44100),
                                      ("double.wav", tone.astype(np.float64), "DOUBLE", 16000),
                                      ("noise.flac", rng.standard_normal(7000).astype(np.float32) * 0.1, "PCM_16", 16000)]:
        _wav(ok / name, data, subtype, rate)
        usable.append(name)
    raw = (ok / "pcm16.wav").read_bytes()
    (bad / "empty.wav").write_bytes(b"")
    (bad / "text.wav").write_text("not audio at all")
    (bad / "header_only.wav").write_bytes(raw[:44])
    (bad / "no_fmt.wav").write_bytes(b"RIFF" + struct.pack("<I", 4) + b"WAVE")
    adpcm = bytearray(raw)
    adpcm[20:22] = struct.pack("<H", 2)
    (bad / "adpcm.wav").write_bytes(bytes(adpcm))
    (bad / "bad_magic.flac").write_bytes(b"fLaX" + bytes(100))
    (bad / "short_flac.flac").write_bytes(b"fLaC" + bytes(10))
    nan = tone.copy()
    nan[100] = np.nan
    _wav(bad / "nan.wav", nan, "FLOAT")
    inf = tone.copy()
    inf[5] = np.inf
    _wav(bad / "inf.wav", inf, "FLOAT")
    (bad / "dir.wav").mkdir()
    (bad / "broken.wav").symlink_to(bad / "nowhere.wav")
    flac = (ok / "noise.flac").read_bytes()
    (bad / "cut.flac").write_bytes(flac[: len(flac) // 3])
    return usable, ["empty.wav", "text.wav", "header_only.wav", "no_fmt.wav", "adpcm.wav", "bad_magic.flac",
                    "short_flac.flac", "nan.wav", "inf.wav", "dir.wav", "broken.wav", "cut.flac"]


def test_malformed_audio_files_sweep(tmp_path, capsys, dali, run_logging):
    from d2v2scale.data.audio import AudioSource

    usable, unusable = _audio_cases(tmp_path)
    src = AudioSource(str(tmp_path / "a"), max_tokens=24000, min_size=4000, max_size=8000, seed=0)
    for batch_id in range(2 * src.num_batches):
        try:
            wav, lengths, _ = src.batch_by_id(batch_id)
        except RuntimeError as e:  # a micro-batch made only of files that failed at decode time
            assert "every file of micro-batch" in str(e)
            continue
        assert torch.isfinite(wav).all() and (lengths > 0).all()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    skipped = {Path(p).name for p in src.skipped_files()}
    assert not skipped & set(usable), skipped
    assert {"empty.wav", "text.wav", "header_only.wav", "no_fmt.wav", "adpcm.wav", "bad_magic.flac",
            "short_flac.flac", "nan.wav", "inf.wav", "dir.wav", "broken.wav"} <= skipped, skipped
    for name in skipped:
        assert err.count(name + ":") == 1, (name, err)
    assert len(usable) + len(unusable) >= 20


def test_float32_wav_is_indexed_with_its_length(tmp_path):
    from d2v2scale.data.audio import AUDIO_INDEX
    from d2v2scale.data.indexing import build_index

    (tmp_path / "a").mkdir()
    _wav(tmp_path / "a" / "f.wav", np.zeros(5000, np.float32) + 0.1, "FLOAT")
    index = build_index(tmp_path / "a", AUDIO_INDEX)
    assert index.length.tolist() == [5000] and index.skipped == []


def test_logs_directory_ships_with_the_repository():
    tracked = subprocess.run(["git", "ls-files", "logs"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert tracked == ["logs/.gitignore"]


def test_dropping_rows_of_a_dead_attempt_survives_a_cut_line(tmp_path):
    from d2v2scale.train.run import drop_rows_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed mid-write
    assert drop_rows_after(path, 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert drop_rows_after(path, 2) == 0 and drop_rows_after(tmp_path / "absent.jsonl", 0) == 0


def test_a_short_run_with_its_own_ds_config_is_a_warning_not_a_refusal(tmp_path):
    """A smoke test (train.max_updates below the JSON's warm-up) starts, with one warning in the log
    and at the top of config.yaml; the same with another preset's JSON is still refused."""
    code, out, err = _main("--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_image", "--run_dir",
                           str(tmp_path / "r"), "train.max_updates=8", "--dry_run")
    assert code == 0 and out.count("warning: the learning rate never reaches its peak") == 1, out + err
    code, _, err = _main("--ds_config", "ds_configs/vit_h.json", "--preset", "tiny_image", "--run_dir",
                         str(tmp_path / "r"), "train.max_updates=8", "--dry_run")
    assert code == 2 and "written for preset 'vit_h'" in _one_line(err)
    from d2v2scale.pretrain import parse_args
    from d2v2scale.train.run import _write_run_files, prepare

    setup = prepare(parse_args(["--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_image", "--run_dir",
                                str(tmp_path / "r"), "train.max_updates=8"]))
    _write_run_files(setup)
    first = (tmp_path / "r" / "config.yaml").read_text().splitlines()[0]
    assert first.startswith("# warning: the learning rate never reaches its peak")
