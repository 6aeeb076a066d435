"""What a user meets first: the command-line tools, the log lines, the metric sinks.

Every tool answers ``--help`` (exit 0, an example in it) and a wrong input with one line and exit
2, never a traceback; a run's batch-mode log lines carry a parsable timestamp, elapsed time and
ETA; TensorBoard and CSV sinks configured in the ds_config hold the same series as metrics.jsonl.
"""
import csv
import datetime
import json
import re
import subprocess
import sys

import pytest

from d2v2scale.logs import TIME_FORMAT
from d2v2scale.runfiles import read_metrics

from test_deepspeed_training import ROOT, _env, _launch, _torchrun

TOOLS = {
    "plan": [["--preset", "nope", "--ds_config", "ds_configs/vit_h.json"],
             ["--preset", "vit_h", "--ds_config", "ds_configs/vit_h.json", "--nodes", "0"],
             ["--preset", "vit_h", "--ds_config", "missing.json"]],
    "report": [["/definitely/not/here"], ["README.md"], ["ds_configs"]],
    "convert": [["from-fairseq", "/definitely/not/here.pt", "out.pt"], ["to-fairseq", "README.md", "out.pt"],
                ["sideways", "a", "b"]],
    "features": [["/definitely/not/here.pt", "x", "out.npz"], ["README.md", "x", "out.npz"],
                 ["README.md", "x", "out.txt"]],
    "prepare": [["images", "/definitely/not/here", "out.idx"], ["audio", "/definitely/not/here", "out.tsv"],
                ["videos", "a", "b"]],
}


def _tool(name: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"d2v2scale.{name}", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=120)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_helps_and_refuses_wrong_input_in_one_line(name, tmp_path):
    helped = _tool(name, "--help")
    assert helped.returncode == 0 and "example" in helped.stdout, helped.stdout + helped.stderr
    for args in TOOLS[name]:
        line = _one_line(_tool(name, *[str(ROOT / a) if a in ("README.md", "ds_configs") else a for a in args],
                               cwd=tmp_path))
        assert line.startswith(f"{name}: error: "), line
    # a file that does not exist is named as such, not blamed on pickling
    if name == "convert":
        assert "does not exist" in _one_line(_tool(name, "from-fairseq", "/no/such.pt", "o.pt", cwd=tmp_path))


def test_launcher_lists_presets_and_prints_the_resolved_config():
    listed = subprocess.run([sys.executable, "launchers/pretrain.py", "--list-presets"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and all(p in listed.stdout for p in ("vit_h", "audio_large", "tiny_text"))
    printed = subprocess.run([sys.executable, "launchers/pretrain.py", "--ds_config", "ds_configs/cpu_tiny.json",
                              "--preset", "tiny_text", "--print-config", "--profile", "train.max_updates=70"],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    import yaml

    out = yaml.safe_load(printed.stdout)
    assert printed.returncode == 0 and out["config"]["train"]["max_updates"] == 70
    assert out["config"]["profiling"]["enabled"] is True  # --profile is what the config says
    assert "img_size" not in out["config"]["model"] and "vocab_size" in out["config"]["model"]
    assert out["ds_config"]["gradient_accumulation_steps"] != "auto"  # resolved


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) step (\d+)/(\d+) \((\d+) %\) loss [\d.]+ lr [\d.e+-]+ "
                      r"[\d.]+ samples/s elapsed (\d+):(\d\d):(\d\d) eta (\d+):(\d\d):(\d\d)$")


@pytest.mark.slow
def test_sinks_hold_the_metrics_series_and_log_lines_are_timestamped(tmp_path):
    """2 processes, tiny_image, TensorBoard and CSV sinks in the ds_config: the loss and MFU series
    read back from the event files (TensorBoard's own reader) and the CSVs equal metrics.jsonl; the
    batch-mode lines carry a parsable timestamp, elapsed time and ETA; only rank 0 writes sinks."""
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["tensorboard"] = {"enabled": True, "job_name": "tb"}
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "job"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run_dir = tmp_path / "run"
    proc = _launch(_torchrun(2), "launchers/pretrain.py", "--ds_config", str(tmp_path / "ds.json"), "--preset",
                   "tiny_image", "--run_dir", str(run_dir), "train.max_updates=6", "train.log_every=2",
                   "train.allow_long_warmup=true")
    rows = read_metrics(run_dir / "metrics.jsonl")
    want = {key: [(r["step"], r[key]) for r in rows] for key in ("loss", "mfu")}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    for key, series in want.items():
        got = [(e.step, e.value) for e in events.Scalars(f"Train/{key}")]
        assert [s for s, _ in got] == [s for s, _ in series]
        assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(got, series))  # float32 in events
        with open(tmp_path / "csv" / "job" / f"Train_{key}.csv") as f:
            table = list(csv.reader(f))
        assert table[0] == ["step", key]
        assert [(int(s), float(v)) for s, v in table[1:]] == series
    lines = [line for line in proc.stdout.splitlines() if " step " in line]
    assert len(lines) == 3 and "[rank" not in proc.stdout
    for line in lines:
        m = LOG_LINE.match(line)
        assert m, line
        datetime.datetime.strptime(m.group(1), TIME_FORMAT)
        assert int(m.group(4)) == round(100 * int(m.group(2)) / int(m.group(3)))


def test_a_sink_without_its_package_is_refused_before_anything_starts(monkeypatch):
    """W&B and TensorBoard are optional: asking for one whose package is missing is a ConfigError in
    ``prepare`` (one line, exit 2, before any process group: the launcher's contract)."""
    import importlib.util

    from d2v2scale.config import ConfigError
    from d2v2scale.config import load_config
    from d2v2scale.run_spec import run_spec
    from d2v2scale.train.sinks import check_sinks

    def monitors(wandb: bool):
        ds = {"optimizer": {"type": "AdamW"}, "wandb": {"enabled": wandb}, "tensorboard": {"enabled": True}}
        return run_spec(ds, load_config("tiny_image"), 1).monitors

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="ds_config wandb.enabled=true needs the 'wandb' package: pip install wandb"):
        check_sinks(monitors(wandb=True))
    check_sinks(monitors(wandb=False))  # tensorboard is installed in the test venv


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("poisoned,steps", [("2,3", 4), ("1,2", 2)])
def test_a_poisoned_step_breaks_no_bookkeeping(tmp_path, poisoned, steps):
    """Steps whose every statistic is NaN (loss, spreads, gradient norm; the test hook poisons them
    all): skipped, and metrics.jsonl, diagnostics.jsonl, TensorBoard, CSV and the profiling report
    are all written, as standard JSON, with no exception — also when no logged step is finite."""
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["tensorboard"] = {"enabled": True, "job_name": "tb"}
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "job"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launchers/pretrain.py", "--ds_config", str(tmp_path / "ds.json"),
                           "--preset", "tiny_image", "--run_dir", str(run_dir), "--profile", f"train.max_updates={steps}",
                           "train.log_every=1", "train.allow_long_warmup=true"],
                          cwd=ROOT, env=dict(_env(), D2V2SCALE_TEST_NAN_STEPS=poisoned), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    for step in map(int, poisoned.split(",")):
        assert {rows[step][k] for k in ("loss", "target_var", "pred_var", "grad_norm")} <= {"nan", "inf"}, rows[step]
    assert rows[steps]["skipped_updates"] == 2
    diagnostics = [_strict_json(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in diagnostics] == list(range(1, steps + 1))
    assert any("non-finite spread" in w for d in diagnostics for w in d["warnings"])
    with open(tmp_path / "csv" / "job" / "Train_loss.csv") as f:
        assert [row[0] for row in list(csv.reader(f))[1:]] == [str(s) for s in range(1, steps + 1)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("Train/loss")] == list(range(1, steps + 1))
    report = _strict_json((run_dir / "report" / "report.json").read_text())
    assert (run_dir / "report" / "report.md").is_file() and report["training"]["skipped_updates"] == 2


def test_tools_find_their_own_defaults_from_any_folder(tmp_path):
    """The package ships its DeepSpeed JSONs: the planner's paper table and a shipped --ds_config
    name work from a folder that is not the repository."""
    paper = subprocess.run([sys.executable, "-m", "d2v2scale.plan", "--paper"], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert paper.returncode == 0 and "ViT-H/14, ImageNet" in paper.stdout, paper.stderr
    dry = subprocess.run([sys.executable, "-m", "d2v2scale.pretrain", "--ds_config", "ds_configs/cpu_tiny.json",
                          "--preset", "tiny_image", "--dry_run", "--run_dir", str(tmp_path / "r")],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "effective global batch 32" in dry.stdout, dry.stderr
