"""A resume notices a changed data set: each checkpoint records the index's fingerprint, a resume
onto another one warns naming the counts that changed, and ``data.allow_changed=false`` refuses it."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from data_fixtures import make_jpegs
from test_deepspeed_training import LAUNCH, ROOT, _env

from d2v2scale.data.fingerprint import describe_change, fingerprint
from d2v2scale.data.index import DataIndex, pack_names
from d2v2scale.exit_codes import EXIT_BAD_INPUT
from d2v2scale.train.checkpoint import read_run_info


def _index(names: list[str], lengths: list[int] | None = None) -> DataIndex:
    import numpy as np

    blob, ends = pack_names(names)
    return DataIndex("/data", blob, ends, None if lengths is None else np.array(lengths, dtype=np.int64))


def test_fingerprint_names_what_changed():
    base = fingerprint(_index(["a.wav", "b.wav", "c.wav"], [10, 20, 30]))
    assert base == {"rows": 3, "files": 3, "total_length": 60, "sha256": base["sha256"]}
    assert describe_change(base, fingerprint(_index(["a.wav", "b.wav", "c.wav"], [10, 20, 30]))) is None
    assert describe_change(base, fingerprint(_index(["a.wav", "b.wav"], [10, 20]))) == \
        "rows 3 → 2, files 3 → 2, total length 60 → 30"
    assert describe_change(base, fingerprint(_index(["a.wav", "b.wav", "d.wav"], [10, 20, 30]))) == \
        "the same counts, but other names or lengths"  # one file replaced by another of the same length
    assert describe_change(base, fingerprint(_index(["a.wav", "b.wav", "c.wav"], [10, 20, 31]))) == \
        "total length 60 → 61"
    images = fingerprint(_index(["x.jpg", "y.jpg"]))
    assert images["total_length"] is None and describe_change(images, fingerprint(_index(["x.jpg"]))) == \
        "rows 2 → 1, files 2 → 1"


def _run(run_dir, data, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *LAUNCH, "--preset", "tiny_image", "--run_dir", str(run_dir),
                           "data.kind=images", f"data.path={data}", "train.global_batch=8", "train.log_every=1",
                           "train.save_every=2", "train.allow_long_warmup=true", *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_resume_onto_changed_data_warns_and_can_refuse(tmp_path, dali):
    data = tmp_path / "jpegs"
    make_jpegs(data, 16)
    first = _run(tmp_path / "run", data, "train.max_updates=2")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = read_run_info(tmp_path / "run" / "checkpoints" / "step_00000002")["data"]
    assert (saved["rows"], saved["files"]) == (16, 16)

    same = _run(tmp_path / "run", data, "train.max_updates=3", "--resume", "auto")
    assert same.returncode == 0 and "data set changed" not in same.stdout + same.stderr

    shutil.copytree(data, tmp_path / "more")  # 16 more files under another folder name
    shutil.move(str(tmp_path / "more"), str(data / "more"))
    refused = _run(tmp_path / "run", data, "train.max_updates=4", "--resume", "auto", "data.allow_changed=false")
    assert refused.returncode == EXIT_BAD_INPUT, refused.stdout[-2000:] + refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if "data set changed" in line]
    assert len(errors) == 1 and "rows 16 → 32, files 16 → 32" in errors[0] and "data.allow_changed=true" in errors[0]
    assert "Traceback" not in refused.stderr

    warned = _run(tmp_path / "run", data, "train.max_updates=4", "--resume", "auto")
    assert warned.returncode == 0, warned.stderr[-3000:]
    lines = [line for line in (warned.stdout + warned.stderr).splitlines() if "data set changed" in line]
    assert len(lines) == 1 and "warning:" in lines[0] and "rows 16 → 32, files 16 → 32" in lines[0], lines
    assert read_run_info(tmp_path / "run" / "checkpoints" / "step_00000004")["data"]["rows"] == 32  # the new record
