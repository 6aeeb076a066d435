"""One atomic-write rule: every file a later read trusts whole goes through ``d2v2scale.atomic``,
which fsyncs the file and its directory. A crash between the write and the rename (the rename made
to fail) leaves each writer's old file as it was, and no temporary file beside it; and no module
renames a file into place by itself."""
import ast
import json
import os
from pathlib import Path

import pytest
import torch

import d2v2scale.atomic as atomic

PACKAGE = Path(__file__).resolve().parents[1] / "d2v2scale"
OLD = b"the previous, complete file\n"


def _crash_before_rename(monkeypatch, target: Path):
    """The rename onto ``target`` fails (other files a writer writes first are renamed as usual)."""
    real = os.replace

    def refuse(src, dst):
        if Path(dst) == target:
            raise OSError("simulated crash between write and rename")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", refuse)


def _checkpoint_file(path):
    from d2v2scale.train.verify import save_checked

    save_checked({"w": torch.ones(3)}, path)


def _latest(path):
    from d2v2scale.train.checkpoint import _write_latest

    _write_latest(path.parent, "step_00000009")


def _run_files(path):
    from d2v2scale.config import load_config
    from d2v2scale.run_spec import load_ds_config
    from d2v2scale.run_spec import run_spec
    from d2v2scale.train.run import Setup, _write_run_files

    cfg = load_config("tiny_image")
    _write_run_files(Setup(cfg, run_spec(load_ds_config("cpu_tiny.json"), cfg, 1), path.parent, None, {}))


def _job_marker(path):
    from d2v2scale.resilience.supervisor import Supervisor

    Supervisor(path.parent, ["true"], 1, 1.0, 600.0)._claim_run_dir()


def _converted_weights(path):
    from d2v2scale.convert import _save

    _save(str(path), {"w": torch.ones(2)})


def _token_meta(path):
    from d2v2scale.data.build_tokens import build, byte_tokenizer

    text = path.parent / "corpus.txt"
    text.write_text("hello")
    build(path.parent / "tokens", [text], byte_tokenizer)


WRITERS = {  # writer → the file it replaces
    "checkpoint file": (_checkpoint_file, "rank_00000.pt"),
    "latest": (_latest, "latest"),
    "config.yaml": (_run_files, "config.yaml"),
    "ds_config.json": (_run_files, "ds_config.json"),
    "job marker": (_job_marker, "job.id"),
    "converted weights": (_converted_weights, "out.pt"),
    "token metadata": (_token_meta, "tokens.json"),
    "token ids": (_token_meta, "tokens.bin"),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_crash_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch, writer):
    write, name = WRITERS[writer]
    target = tmp_path / name
    target.write_bytes(OLD)
    _crash_before_rename(monkeypatch, target)
    with pytest.raises(Exception, match="simulated crash"):
        write(target)
    assert target.read_bytes() == OLD
    assert not [p for p in tmp_path.iterdir() if atomic.is_temporary(p)]


def test_a_rewritten_metrics_file_survives_a_crash_whole(tmp_path, monkeypatch):
    from d2v2scale.train.run import drop_rows_after

    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    path.write_text(rows)
    _crash_before_rename(monkeypatch, path)
    with pytest.raises(OSError):
        drop_rows_after(path, 1)
    assert path.read_text() == rows


def test_the_file_and_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    atomic.write_text(tmp_path / "x.json", "{}")
    assert synced[0].startswith(str(tmp_path / ".x.json.")) and synced[-1] == str(tmp_path)
    assert (tmp_path / "x.json").read_text() == "{}"


# Renames that are not a file written into place: a finished checkpoint directory (its files were
# each written through atomic_output) and a previous run moved aside by --overwrite.
ALLOWED = {("train/checkpoint.py", "os.replace"), ("train/run.py", ".rename")}


def test_no_module_renames_a_file_into_place_by_itself():
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel == "atomic.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            f = node.func
            if isinstance(f.value, ast.Name) and f.value.id == "os" and f.attr in ("replace", "rename"):
                name = f"os.{f.attr}"
            elif f.attr == "rename" or (f.attr == "replace" and len(node.args) == 1):  # Path.rename/.replace
                name = f".{f.attr}"
            else:
                continue
            if (rel, name) not in ALLOWED:
                found.append(f"{rel}:{node.lineno} {name}")
    assert not found, found
