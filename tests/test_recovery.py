"""A damaged checkpoint never ends a run: every file is checksummed when written, ``--resume auto``
takes the newest intact checkpoint and says what it passed over, and no checkpoint file can run
code when it is read."""
import json
import os
import shutil
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v2scale.train.checkpoint import rng_state, set_rng_state
from d2v2scale.runfiles import read_metrics
from d2v2scale.train.run import resolve_resume
from d2v2scale.train.verify import CheckpointError, problem, safe_load

from test_deepspeed_training import _launch
from test_hardening import _main, _one_line

ARGS = ["launchers/pretrain.py", "--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_image",
        "train.max_updates=6", "train.save_every=3", "train.log_every=1", "train.allow_long_warmup=true",
        "model.mask_noise_std=0", "train.keep_last=3"]
NEWEST, PREVIOUS = "step_00000006", "step_00000003"
FORMATS = {"layout_free": {"shard": "shards/rank_00000.pt", "rng": "rank_tp00_dp00000.pt"},
           "native": {"shard": "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng": "rank_tp00_dp00000.pt",
                      "model": "mp_rank_00_model_states.pt"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted 6-step run per checkpoint format, checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("recovery")
    for fmt in FORMATS:
        _launch([sys.executable], *ARGS, f"train.checkpoint_format={fmt}", "--run_dir", str(root / fmt))
    return {fmt: root / fmt for fmt in FORMATS}


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(run, out)
    return out


def _tensor_data(path: Path) -> tuple[int, int]:
    """(offset, length) of the largest tensor's bytes inside a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip(path: Path, at: int, n: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


DAMAGE = {  # kind → (how, what the warning must say)
    "truncated shard": (lambda tag, f: os.truncate(tag / f["shard"], (tag / f["shard"]).stat().st_size // 2),
                        "is truncated"),
    "deleted shard": (lambda tag, f: (tag / f["shard"]).unlink(), "is missing"),
    "flipped tensor bytes": (lambda tag, f: _flip(tag / f["shard"], sum(_tensor_data(tag / f["shard"])) - 1000),
                             "does not match its checksum"),
    "broken metadata": (lambda tag, f: (tag / "run.json").write_text('{"step": 6, "files": '), "run.json is unreadable"),
    "deleted metadata": (lambda tag, f: (tag / "run.json").unlink(), "run.json is missing"),
    "truncated RNG file": (lambda tag, f: os.truncate(tag / f["rng"], 100), "is truncated"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_resume_auto_passes_over_a_damaged_checkpoint(runs, tmp_path, fmt):
    """Each kind of damage to the newest checkpoint: ``--resume auto`` picks the previous one with
    one warning naming the tag, the file and what is wrong; naming the damaged tag is refused in
    one line (exit 2, no process group); with every checkpoint damaged, one line and exit 2.
    ``latest`` pointed back by hand (DeepSpeed's convention) is where ``auto`` starts."""
    pointed = _copy(runs[fmt], tmp_path, "pointed_back")
    (pointed / "checkpoints" / "latest").write_text(f"{PREVIOUS}\n")
    assert resolve_resume("auto", pointed) == (pointed / "checkpoints" / PREVIOUS, [])
    (pointed / "checkpoints" / "latest").unlink()
    assert resolve_resume("auto", pointed) == (pointed / "checkpoints" / NEWEST, [])
    for kind, (damage, said) in DAMAGE.items():
        run = _copy(runs[fmt], tmp_path, kind.replace(" ", "_"))
        damage(run / "checkpoints" / NEWEST, FORMATS[fmt])
        tag, warnings = resolve_resume("auto", run)
        assert tag.name == PREVIOUS, kind
        assert len(warnings) == 1 and NEWEST in warnings[0] and said in warnings[0], (kind, warnings)
        assert f"resuming from {PREVIOUS}" in warnings[0]
        code, _, err = _main(*ARGS[1:], f"train.checkpoint_format={fmt}", "--run_dir", str(run),
                             "--resume", NEWEST, "train.max_updates=9")
        assert code == 2 and f"checkpoint {NEWEST} is damaged" in _one_line(err) and said in err, (kind, err)
        assert not torch.distributed.is_initialized()
    damage, _ = DAMAGE["deleted metadata"]
    damage(run / "checkpoints" / PREVIOUS, FORMATS[fmt])
    code, _, err = _main(*ARGS[1:], f"train.checkpoint_format={fmt}", "--run_dir", str(run), "--resume", "auto",
                         "train.max_updates=9")
    assert code == 2 and "no intact checkpoint" in _one_line(err), err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_run_resumed_past_damage_continues_the_undamaged_losses(runs, tmp_path, fmt):
    """Flipped bytes in the newest checkpoint: the relaunch warns once, resumes from step 3 and
    logs steps 4-6 with the losses of the run that was never damaged (1e-6: same layout, fp32)."""
    run = _copy(runs[fmt], tmp_path, "flipped")
    DAMAGE["flipped tensor bytes"][0](run / "checkpoints" / NEWEST, FORMATS[fmt])
    proc = _launch([sys.executable], *ARGS, f"train.checkpoint_format={fmt}", "--run_dir", str(run), "--resume", "auto")
    assert (proc.stdout + proc.stderr).count(f"warning: checkpoint {NEWEST} is damaged") == 1
    assert f"resumed from {run / 'checkpoints' / PREVIOUS}" in proc.stdout
    want = {r["step"]: r for r in read_metrics(runs[fmt] / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    for step in (4, 5, 6):
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-6 * abs(want[step]["loss"]), step
    assert problem(run / "checkpoints" / NEWEST) is None  # written again, whole


@pytest.mark.slow
def test_flipped_bytes_are_always_detected(runs, tmp_path):
    """A 4-byte flip anywhere in any checkpoint file (every 1/16 of each, both formats) is found."""
    for fmt in FORMATS:
        tag = _copy(runs[fmt], tmp_path, fmt) / "checkpoints" / NEWEST
        files = json.loads((tag / "run.json").read_text())["files"]
        assert len(files) >= 2
        for rel in files:
            size = (tag / rel).stat().st_size
            for at in range(0, size - 4, max(1, size // 16)):
                _flip(tag / rel, at)
                assert problem(tag) is not None, (fmt, rel, at)
                _flip(tag / rel, at)  # undo
        assert problem(tag) is None


class _CreatesAFile:
    """Unpickling this object would create ``path`` (what a hostile checkpoint could do)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _plant(tag: Path, rel: str, marker: Path) -> None:
    """Replace ``rel`` with a file holding a hostile pickle, and list its checksum in ``run.json``
    as a crafted checkpoint would (so only the unpickling check can stop it)."""
    blob = safe_load(tag / rel)
    blob["extra"] = _CreatesAFile(str(marker))
    torch.save(blob, tag / rel)
    data = (tag / rel).read_bytes()
    info = json.loads((tag / "run.json").read_text())
    info["files"][rel] = [len(data), zlib.crc32(data)]
    (tag / "run.json").write_text(json.dumps(info))


@pytest.mark.slow
@pytest.mark.parametrize("fmt,rel", [("layout_free", "rank_tp00_dp00000.pt"), ("native", "mp_rank_00_model_states.pt")])
def test_a_pickle_that_would_run_code_is_refused(runs, tmp_path, capsys, fmt, rel):
    from d2v2scale.convert import main as convert_main

    marker = tmp_path / "pwned"
    run = _copy(runs[fmt], tmp_path, "hostile")
    _plant(run / "checkpoints" / NEWEST, rel, marker)
    assert problem(run / "checkpoints" / NEWEST) is None  # the checksums agree: only unpickling could tell
    code, _, err = _main(*ARGS[1:], f"train.checkpoint_format={fmt}", "--run_dir", str(run), "--resume", "auto",
                         "train.max_updates=9")
    assert code == 2 and "holds pickled code (io.open)" in _one_line(err), err
    assert convert_main(["to-fairseq", str(run / "checkpoints" / NEWEST), str(tmp_path / "out.pt")]) == 2
    assert "holds pickled code" in _one_line(capsys.readouterr().err)
    assert not marker.exists()


def test_rng_states_are_plain_tensors_and_old_ones_still_load(tmp_path):
    """RNG states round-trip through ``weights_only=True``; a rank file from before (numpy's state as
    an array inside a tuple) still loads with the short numpy allow-list, and restores the same state."""
    import random

    np.random.seed(3)
    random.seed(4)
    torch.save({"rng": rng_state(), "step": 1}, tmp_path / "new.pt")
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"rng": old, "step": 1}, tmp_path / "old.pt")
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    for name in ("new.pt", "old.pt"):
        np.random.seed(0)
        random.seed(0)
        set_rng_state(safe_load(tmp_path / name)["rng"])
        assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected, name


def test_a_shard_set_that_does_not_describe_the_model_is_a_checkpoint_error(tmp_path):
    """Shards that do not cover a tensor (a missing rank file, another model) are refused like any
    damaged checkpoint: a CheckpointError, which the launcher turns into one line and exit 2."""
    from d2v2scale.train.shards import ShardFormatError, ShardReader

    (tmp_path / "shards").mkdir()
    with pytest.raises(ShardFormatError, match="no shard files") as e:
        ShardReader(tmp_path, listing={})
    assert isinstance(e.value, CheckpointError)
