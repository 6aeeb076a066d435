"""Training through DeepSpeed on CPU (gloo): launchers, run directory, ZeRO-stage equivalence."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from d2v2scale.runfiles import METRIC_NAMES, read_metrics

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    return env


def _launch(prefix, *args, timeout=300):
    proc = subprocess.run([*prefix, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={_port()}"]


def _check_run_dir(run_dir: Path, steps: int, world: int):
    assert (run_dir / "config.yaml").is_file()
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert "auto" not in json.dumps(ds)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows and all(tuple(r) == METRIC_NAMES for r in rows)
    assert rows[-1]["step"] == steps
    assert all(isinstance(r["loss"], float) for r in rows)
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    files = {p.name for p in (run_dir / "checkpoints" / tag).iterdir()}
    assert {"shards", "run.json"} <= files and {f"rank_tp00_dp{r:05d}.pt" for r in range(world)} <= files
    assert {p.name for p in (run_dir / "checkpoints" / tag / "shards").iterdir()} == {f"rank_{r:05d}.pt" for r in range(world)}


LAUNCH = ["launchers/pretrain.py", "--ds_config", "ds_configs/cpu_tiny.json"]
SHORT = ["train.max_updates=4", "train.log_every=2", "train.save_every=4", "train.allow_long_warmup=true"]


def test_deepspeed_launcher_two_processes(tmp_path):
    """The `make demo` path: the deepspeed launcher with 2 CPU processes on tiny_image (digits)."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    prefix = [str(deepspeed), "--num_gpus", "2", "--master_port", str(_port())]
    proc = _launch(prefix, *LAUNCH, "--preset", "tiny_image", "--run_dir", str(tmp_path / "run"), *SHORT)
    assert "effective global batch 32 samples = micro-batch 16 × grad-accum 1 × data-parallel 2" in proc.stdout
    _check_run_dir(tmp_path / "run", 4, 2)
    # export the trained checkpoint (teacher sharded over the 2 ranks) to fairseq's layout and back
    import torch

    from d2v2scale.config import config_from_dict
    from d2v2scale.convert import main as convert_main
    from d2v2scale.interop.fairseq import from_fairseq
    from d2v2scale.model import Data2Vec2
    from d2v2scale.train.checkpoint import read_run_info

    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert convert_main(["to-fairseq", str(tag_dir), str(tmp_path / "fairseq.pt")]) == 0
    student, teacher = from_fairseq(torch.load(tmp_path / "fairseq.pt", weights_only=True)["model"], "image")
    model = Data2Vec2(config_from_dict(read_run_info(tag_dir)["config"]).model_spec())
    model.load_state_dict(student, strict=True)
    model.teacher_copy().load_state_dict(teacher, strict=True)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # the EMA moved away from the student


def test_bf16_zero2_and_zero3_track_fp32(tmp_path):
    """bf16 at ZeRO-2 and ZeRO-3 on 2 processes against the fp32 single-process run of the same
    global batch. bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 2e-3 per stored value): the
    weights, activations and gradients round at every op, so over 5 AdamW steps the loss may move
    by ~1e-2 relative; 5e-2 leaves margin while a wrong normaliser or a skipped update moves it by
    far more. Targets, the loss and the EMA masters stay fp32; the teacher computes in bf16."""
    overrides = ["train.max_updates=5", "model.mask_noise_std=0"]
    script = "tests/dist/zero_stages.py"
    _launch(_torchrun(2), script, str(tmp_path / "bf16.json"), "tiny_image", "16", "1", "2,3", "1", *overrides,
            "--bf16")
    _launch([sys.executable], script, str(tmp_path / "ref.json"), "tiny_image", "16", "2", "1", "1", *overrides)
    runs = json.loads((tmp_path / "bf16.json").read_text())
    ref = json.loads((tmp_path / "ref.json").read_text())["1"]
    for stage in ("2", "3"):
        for got, want in zip(runs[stage]["losses"], ref["losses"]):
            assert got[0] == pytest.approx(want[0], rel=5e-2), (stage, got, want)
        # the fp32 EMA is exact; what the teacher computes with is its bf16 copy, half an ulp away
        # (weights ≲ 0.25 here: 2^-9 · 0.25 ≈ 5e-4)
        assert runs[stage]["ema_vs_unsharded"] <= 1e-3
        d = runs[stage]["dtypes"]
        assert d["loss"] == "torch.float32" and d["spreads"] == "torch.float64" and d["teacher_masters"] == ["torch.float32"]
        assert d["teacher_compute"] == ["torch.bfloat16"]
    assert runs["2"]["dtypes"]["targets"] == "torch.float32"
    assert ref["dtypes"]["teacher_compute"] == ["torch.float32"]


@pytest.mark.parametrize("preset", ["tiny_audio", "tiny_text"])
def test_torchrun_two_processes(tmp_path, preset):
    _launch(_torchrun(2), *LAUNCH, "--preset", preset, "--run_dir", str(tmp_path / "run"), *SHORT)
    _check_run_dir(tmp_path / "run", 4, 2)


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_plain_single_process(tmp_path, preset):
    _launch([sys.executable], *LAUNCH, "--preset", preset, "--run_dir", str(tmp_path / "run"), *SHORT)
    _check_run_dir(tmp_path / "run", 4, 1)


def test_zero_stages_match_single_process(tmp_path):
    """ZeRO 0/1/2/3 and FSDP2 on 2 processes (and TP=2 × FSDP2 on 4) (micro-batch 16 each) vs 1 process (micro-batch 16, 2 accumulation
    steps, ZeRO-1 and ZeRO-0): the same global batch, samples and masks, so the same objective. Mask noise is set to 0
    because it is drawn from each process's torch RNG stream.

    Tolerance: fp32 runs differ only in reduction order (an all-reduce of two partial gradients vs a
    local sum over two micro-batches, ZeRO's flattened buckets), ~1e-7 relative per step; 1e-5
    over 8 AdamW steps leaves margin, while a real difference (a wrong normaliser, a missed
    micro-batch, a CLS weight off by the DP size) moves the loss by >1e-2 from the first step on
    (more steps would prove nothing more).

    The same runs check the DP-sharded EMA teacher: after 8 steps it equals an unsharded fp32 EMA
    of the same student (≤ 1e-6; on DeepSpeed the update is the same lerp on the same fp32 values,
    so exactly 0 is expected; FSDP2's device-flag form, ema·(1 - w) + student·w, rounds differently
    by an fp32 ulp or so a step), and each rank holds half the fp32 EMA bytes of the 1-process run.
    """
    overrides = ["train.max_updates=8", "model.mask_noise_std=0"]
    script = "tests/dist/zero_stages.py"
    _launch(_torchrun(2), script, str(tmp_path / "zero.json"), "tiny_image", "16", "1", "0,1,2,3,fsdp2", "1", *overrides)
    _launch(_torchrun(4), script, str(tmp_path / "tp.json"), "tiny_image", "16", "1", "fsdp2", "2", *overrides)
    _launch([sys.executable], script, str(tmp_path / "ref.json"), "tiny_image", "16", "2", "1,0", "1", *overrides)
    runs = json.loads((tmp_path / "zero.json").read_text())
    refs = json.loads((tmp_path / "ref.json").read_text())
    ref = refs["1"]
    assert ref["losses"][-1][0] < ref["losses"][0][0]
    # one process at stage 0 skips DeepSpeed's all-reduce over its one rank: the same run
    for got, want in zip(refs["0"]["losses"], ref["losses"], strict=True):
        assert got[:3] == pytest.approx(want[:3], rel=1e-5), (got, want)
    for stage in ("0", "1", "2", "3"):
        for got, want in zip(runs[stage]["losses"], ref["losses"]):
            # (loss, loss_reg, loss_cls, grad_norm); DeepSpeed reports no grad norm at stage 0 fp32
            n = 3 if stage == "0" else 4
            assert got[:n] == pytest.approx(want[:n], rel=1e-5), (stage, got, want)
        assert runs[stage]["teacher_sum"] == pytest.approx(ref["teacher_sum"], rel=1e-6)
        assert runs[stage]["ema_vs_unsharded"] <= 1e-6, (stage, runs[stage]["ema_vs_unsharded"])
        full = ref["teacher_bytes_per_rank"][0]
        for b in runs[stage]["teacher_bytes_per_rank"]:
            assert b <= full / 2 + 4096, (stage, b, full)  # up to one alignment pad per group
    # The FSDP2 backend: the same losses, grad norms and teacher as ZeRO-3 and the 1-process run; its
    # teacher holds 1/dp per rank; TP=2 × FSDP2 dp=2 on 4 processes reproduces them too.
    from test_backends import check_fsdp2_run

    check_fsdp2_run(runs["fsdp2"], [runs["3"], ref])
    check_fsdp2_run(json.loads((tmp_path / "tp.json").read_text())["fsdp2"], [ref], tp=2)
    # ... and the planner's FSDP2 teacher shard bytes are the measured ones (dim-0 padding aside)
    from d2v2scale.config import load_config
    from d2v2scale.planning.memory import Layout, model_state_bytes, param_counts

    planned = model_state_bytes(param_counts(load_config("tiny_image"), 1), Layout(1, 2, 3, False, 1, 1, 0, "fsdp2"))
    for resident in runs["fsdp2"]["teacher_resident_bytes"]:
        assert resident == pytest.approx(planned["teacher_fp32_masters"], rel=0.05)
    # activation checkpointing composes with ZeRO's sharding: recomputed blocks, same objective
    _launch(_torchrun(2), script, str(tmp_path / "ckpt.json"), "tiny_image", "16", "1", "2,3,fsdp2+compile", "1",
            *overrides, "model.activation_checkpointing=1")
    checkpointed = json.loads((tmp_path / "ckpt.json").read_text())
    for stage in ("2", "3", "fsdp2+compile"):  # ... and with FSDP2 and regional torch.compile on top
        for got, want in zip(checkpointed[stage]["losses"], ref["losses"]):
            assert got == pytest.approx(want, rel=1e-5), (stage, got, want)


def test_bf16_single_process(tmp_path):
    """bf16 through DeepSpeed (student weights bf16, fp32 EMA masters, fp32 targets and loss)."""
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["bf16"] = {"enabled": True}
    (tmp_path / "bf16.json").write_text(json.dumps(ds))
    _launch([sys.executable], "launchers/pretrain.py", "--ds_config", str(tmp_path / "bf16.json"), "--preset", "tiny_audio",
            "--run_dir", str(tmp_path / "run"), *SHORT)
    _check_run_dir(tmp_path / "run", 4, 1)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["loss"] == r["loss"] and r["loss"] < 1e3 for r in rows)
