"""``python -m d2v2scale.doctor``: one line per check, exit 0 on this (CPU-only) node with warnings, and
exit 2 with one FAIL line naming the cause for each planted blocker: a DeepSpeed JSON that asks for a
GPU, a read-only run directory, a missing data path. The decisions that need a GPU or another
driver to be seen (DALI's CUDA flavour, torch's CUDA build, bf16 on an old GPU) are pure functions
tested here with the values such a node would give."""
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from d2v2scale import doctor
from d2v2scale.doctor import FAIL, OK, WARN, Driver, Gpu, Node

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(ok  |warn|FAIL) ([a-z_]+): \S.*$")
ALWAYS = ["python", "torch", "driver", "gpus", "nccl", "deepspeed", "apex", "dali", "infiniband", "nccl_env",
          "run_dir", "verdict"]
CPU_ONLY = not __import__("torch").cuda.is_available()


def _env(**extra: str) -> dict:
    """This environment without what would make the answer depend on where the tests run (a Slurm
    allocation, NCCL settings), DeepSpeed's accelerator named as the launchers name it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM", "NCCL_", "TORCH_NCCL_")) and k not in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _doctor(*args: str, **env: str) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-m", "d2v2scale.doctor", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def _parsed(lines: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (status, line); every line is a check line and no name comes twice."""
    out = {}
    for line in lines:
        m = LINE.match(line)
        assert m, f"not a check line: {line!r}"
        assert m.group(2) not in out, f"{m.group(2)} reported twice"
        out[m.group(2)] = (m.group(1).strip(), line)
    return out


def _only_blocker(lines: list[str]) -> tuple[str, str]:
    """The one FAIL line besides the verdict, as (name, line)."""
    checks = _parsed(lines)
    failed = [(name, line) for name, (status, line) in checks.items() if status == FAIL and name != "verdict"]
    assert len(failed) == 1, failed
    assert checks["verdict"][0] == FAIL and "cannot start" in checks["verdict"][1] and "1 blocker" in checks["verdict"][1]
    return failed[0]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff")
    return folder


# ------------------------------------------------------------------------------ this node
def test_this_node_can_start_a_job_with_one_line_per_check(tmp_path, data_dir):
    code, lines, err = _doctor("--ds_config", "ds_configs/cpu_tiny.json", "--run_dir", str(tmp_path / "run"),
                               "--data_path", str(data_dir), "--min_free_gb", "0.01",
                               NCCL_DEBUG="WARN", TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
    assert code == 0, lines + [err]
    assert "Traceback" not in err and err.strip() == "", err
    checks = _parsed(lines)
    names = ALWAYS[:-2] + ["ds_config", "run_dir", "data_path", "verdict"]
    assert list(checks) == names  # one line each, in order, the verdict last
    assert all(status != FAIL for status, _ in checks.values()), lines
    assert "NCCL_DEBUG=WARN" in checks["nccl_env"][1] and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in checks["nccl_env"][1]
    assert "writable" in checks["run_dir"][1] and "to be created under" in checks["run_dir"][1]
    assert "a.jpg" in checks["data_path"][1]
    assert "can start the job" in checks["verdict"][1]
    if CPU_ONLY:  # the facts of a node without a GPU are warnings, never blockers
        assert checks["gpus"][0] == WARN and "CPU" in checks["gpus"][1]
        assert checks["nccl"][0] == WARN and "gloo" in checks["nccl"][1]
        assert checks["torch"][0] == OK and "CPU-only build" in checks["torch"][1]
        warned = sum(status == WARN for status, _ in checks.values())
        assert f"0 blocker(s), {warned} warning(s)" in checks["verdict"][1]


def test_without_arguments_the_optional_checks_are_left_out():
    code, lines, _ = _doctor("--min_free_gb", "0")  # run_dir: runs (the default)
    checks = _parsed(lines)
    assert code == 0 and list(checks) == ALWAYS
    assert checks["run_dir"][1].startswith("ok   run_dir: runs")


def test_import_has_no_side_effects():
    proc = subprocess.run([sys.executable, "-c", "import os, d2v2scale.doctor; print(os.environ.get('DS_ACCELERATOR'))"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "None\n", proc.stdout + proc.stderr


@pytest.mark.parametrize("args, needle", [(["--min_free_gb", "-1"], "--min_free_gb"), (["--bogus"], "--bogus"),
                                          (["--min_free_gb", "lots"], "not a number")])
def test_a_wrong_argument_is_one_line_and_exit_2(args, needle):
    code, lines, err = _doctor(*args)
    errors = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines == [] and len(errors) == 1 and errors[0].startswith("doctor: error: "), err
    assert needle in errors[0]


def test_help_has_an_example():
    code, lines, _ = _doctor("--help")
    assert code == 0 and any("example" in line for line in lines)


# ------------------------------------------------------------------------------ planted blockers
@pytest.mark.skipif(not CPU_ONLY, reason="a GPU-asking JSON is a blocker only where there is no CUDA")
def test_a_json_that_asks_for_a_gpu_is_one_fail_naming_the_key(tmp_path):
    code, lines, _ = _doctor("--ds_config", "ds_configs/vit_h_a100_40gb.json", "--run_dir", str(tmp_path),
                             "--min_free_gb", "0")
    name, line = _only_blocker(lines)
    assert code == 2 and name == "ds_config", lines
    assert "zero_optimization.overlap_comm=true" in line and "asks for a GPU" in line


@pytest.mark.skipif(not CPU_ONLY, reason="a GPU-asking JSON is a blocker only where there is no CUDA")
def test_a_hand_written_fp16_json_fails_on_its_key(tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["fp16"] = {"enabled": True}
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(ds))
    code, lines, _ = _doctor("--ds_config", str(path), "--run_dir", str(tmp_path), "--min_free_gb", "0")
    name, line = _only_blocker(lines)
    assert code == 2 and name == "ds_config" and "fp16.enabled=true" in line


def test_a_ds_config_that_does_not_load_is_the_loaders_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, lines, _ = _doctor("--ds_config", str(bad), "--run_dir", str(tmp_path), "--min_free_gb", "0")
    name, line = _only_blocker(lines)
    assert code == 2 and name == "ds_config" and "is not valid JSON" in line


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs mounted under ``tmp_path`` (as root); without the privilege to mount,
    ``/sys`` (sysfs: nothing can be created in its root, by root neither)."""
    target = tmp_path / "ro"
    target.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    try:
        yield (target, True) if mounted else (Path("/sys"), False)
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], capture_output=True, timeout=30)


def test_a_read_only_run_dir_fails(read_only_dir):
    path, mounted = read_only_dir
    code, lines, _ = _doctor("--run_dir", str(path / "run"), "--min_free_gb", "0")
    name, line = _only_blocker(lines)
    assert code == 2 and name == "run_dir", lines
    if mounted:
        assert "read-only file system" in line.lower()
    else:
        assert "cannot write" in line or "read-only" in line


def test_a_missing_data_path_fails(tmp_path):
    missing = tmp_path / "imagenet" / "train"
    code, lines, _ = _doctor("--run_dir", str(tmp_path), "--min_free_gb", "0", "--data_path", str(missing))
    name, line = _only_blocker(lines)
    assert code == 2 and name == "data_path" and "does not exist" in line


def test_with_the_preset_a_data_path_the_run_never_reads_is_not_a_blocker(tmp_path):
    """slurm/vit_h.sbatch sets DATA_PATH for every preset; tiny_image trains on digits and never opens it."""
    missing = str(tmp_path / "imagenet" / "train")
    code, lines, _ = _doctor("--run_dir", str(tmp_path), "--data_path", missing, "--preset", "tiny_image",
                             "parallel.tp=1", f"data.path={missing}")
    checks = _parsed(lines)
    assert code == 0 and list(checks) == ALWAYS[:-2] + ["preset", "run_dir", "data_path", "verdict"], lines
    assert checks["data_path"][0] == OK and "not read" in checks["data_path"][1]
    assert "tiny_image checkpoint" in checks["run_dir"][1]  # the space one checkpoint of this model needs
    code, lines, _ = _doctor("--run_dir", str(tmp_path), "--data_path", missing, "--preset", "tiny_image",
                             "data.kind=images")
    name, line = _only_blocker(lines)
    assert code == 2 and name == "data_path" and "does not exist" in line


def test_a_configuration_the_launcher_refuses_is_a_blocker(tmp_path):
    code, lines, _ = _doctor("--run_dir", str(tmp_path), "--preset", "tiny_image", "train.no_such_key=1")
    name, line = _only_blocker(lines)
    assert code == 2 and name == "preset" and "train.no_such_key" in line


# ------------------------------------------------------------------------------ the decisions, directly
def test_space_a_run_directory_needs():
    from d2v2scale.config import load_config

    vit_h = load_config("vit_h")
    assert 10.0 < doctor.checkpoint_gb(vit_h) < 10.4  # 637M x 12 B + 631M x 4 B
    need, why = doctor.space_needed(None, vit_h)
    assert need == pytest.approx(1.05 * doctor.checkpoint_gb(vit_h)) and "vit_h checkpoint" in why
    assert doctor.space_needed(None, load_config("tiny_image"))[0] == doctor.MIN_FREE_GB_FLOOR
    assert doctor.space_needed(None, None)[0] == doctor.MIN_FREE_GB >= 1.05 * doctor.checkpoint_gb(vit_h)
    assert doctor.space_needed(3.0, vit_h) == (3.0, "--min_free_gb")


def test_dali_cuda13_wheel_on_a_cuda12_driver_fails():
    status, fact = doctor.dali_verdict(["nvidia-dali-cuda130"], 12040, cuda=True)
    assert status == FAIL and "CUDA 13" in fact and "12.4" in fact and "nvidia-dali-cuda120" in fact
    assert doctor.dali_verdict(["nvidia-dali-cuda130"], 12040, cuda=False)[0] == FAIL  # the driver says it all
    assert doctor.dali_verdict(["nvidia-dali-cuda120"], 12040, cuda=True)[0] == OK
    assert doctor.dali_verdict(["nvidia-dali-cuda120"], 13000, cuda=True)[0] == OK  # newer drivers run older builds
    assert doctor.dali_verdict(["nvidia-dali-cuda130"], 13000, cuda=True)[0] == OK
    status, fact = doctor.dali_verdict(["nvidia-dali-cuda130"], None, cuda=False)
    assert status == WARN and "CPU pipelines only" in fact
    assert doctor.dali_verdict(["nvidia-dali-cuda120"], None, cuda=True)[0] == WARN  # no pynvml: cannot tell
    assert doctor.dali_verdict([], None, cuda=False)[0] == OK  # optional
    assert doctor.dali_verdict(["nvidia-dali-cuda120", "nvidia-dali-cuda130"], 13000, cuda=True)[0] == FAIL


def test_dali_flavour_comes_from_the_distribution_name():
    assert doctor.wheel_cuda_major("nvidia-dali-cuda130") == 13
    assert doctor.wheel_cuda_major("nvidia_dali_cuda120") == 12
    assert doctor.wheel_cuda_major("nvidia-dali-nightly-cuda110") == 11
    assert doctor.wheel_cuda_major("nvidia-dali-tf-plugin-cuda120") is None  # a plugin, not a flavour
    assert doctor.wheel_cuda_major("nvidia-nvjpeg-cu13") is None


def test_torch_cuda_build_against_the_driver():
    assert "CUDA 12.4" in doctor.cuda_build_problem("13.0", 12040)
    assert doctor.cuda_build_problem("12.8", 12040) is None  # minor-version compatibility
    assert doctor.cuda_build_problem(None, 12040) is None and doctor.cuda_build_problem("13.0", None) is None


def _node(cuda_build: str | None = None, gpus: list[Gpu] | None = None, driver: Driver | None = None,
          ds: dict | None = None) -> Node:
    fake_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda_build), __version__="2.13.0")
    return Node(fake_torch, None, driver or Driver(why="test"), bool(gpus), gpus or [], ds)


H100 = Gpu(0, "NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0), used=2**29)
V100 = Gpu(0, "Tesla V100-SXM2-32GB", 32 * 2**30, (7, 0))


def test_gpu_line():
    broken = _node("12.8", [H100])
    broken.gpu_error = "RuntimeError: CUDA error: uncorrectable ECC error encountered"
    assert doctor.check_gpus(broken, env={}).status == FAIL
    assert doctor.check_gpus(_node("13.0", driver=Driver("550.1", 12040)), env={}).status == FAIL
    given = doctor.check_gpus(_node("12.8"), env={"SLURM_GPUS_ON_NODE": "8"})
    assert given.status == FAIL and "8 GPU" in given.fact  # GPUs given to the job but none seen: not a CPU run
    assert doctor.check_gpus(_node(None), env={}).status == WARN
    eight = [Gpu(i, H100.name, H100.total, H100.capability, used=2**29) for i in range(8)]
    line = doctor.check_gpus(_node("12.8", eight, Driver("570.1", 12080)), env={"SLURM_GPUS_ON_NODE": "8"})
    assert line.status == OK and line.fact.startswith("8: #0-7 NVIDIA H100 80GB HBM3 (sm_90, 80.0 GiB each)")
    eight[3] = Gpu(3, H100.name, H100.total, H100.capability, used=20 * 2**30)
    busy = doctor.check_gpus(_node("12.8", eight), env={})
    assert busy.status == WARN and "#3 20.0 GiB" in busy.fact
    assert doctor.check_gpus(_node("12.8", eight[:4]), env={"SLURM_GPUS_ON_NODE": "8"}).status == WARN


def test_shipped_json_rule():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        keys = [k for k, _ in doctor.gpu_only_keys(json.loads(path.read_text()))]
        assert keys == (["zero_optimization.overlap_comm=true"] if "a100" in path.name else []), path.name


def test_hand_written_gpu_keys():
    ds = {"fp16": {"enabled": True}, "amp": {"enabled": True},
          "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                "offload_param": {"device": "nvme", "pin_memory": False},
                                "zero_quantized_weights": True}}
    keys = [k for k, _ in doctor.gpu_only_keys(ds)]
    assert keys == ["fp16.enabled=true", "amp.enabled=true",
                    "zero_optimization.offload_optimizer.pin_memory=true (DeepSpeed's default)",
                    "zero_optimization.zero_quantized_weights=true"]
    assert doctor.gpu_only_keys({"bf16": {"enabled": True}, "optimizer": {"params": {"torch_adam": True, "fused": True}},
                                 "fp16": {"enabled": False}, "zero_optimization": {"stage": 2}}) == []
    assert doctor.gpu_only_keys({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
                                pin_memory_default=False) == []


def test_ds_config_line_with_and_without_cuda():
    a100 = json.loads((ROOT / "ds_configs" / "vit_h_a100_40gb.json").read_text())
    assert doctor.check_ds_config(_node(None, ds=a100), "a100.json").status == FAIL
    assert doctor.check_ds_config(_node("12.8", [H100], ds=a100), "a100.json").status == OK
    old = doctor.check_ds_config(_node("12.8", [V100], ds=a100), "a100.json")
    assert old.status == FAIL and "bf16.enabled=true" in old.fact and "sm_70" in old.fact


def test_ops_a_json_makes_deepspeed_build():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        assert doctor.ops_needed(json.loads(path.read_text())) == [], path.name  # all use torch's AdamW
    assert [op for op, _ in doctor.ops_needed({"optimizer": {"params": {}}})] == ["fused_adam"]
    offloaded = {"optimizer": {"params": {"torch_adam": False}},
                 "zero_optimization": {"offload_optimizer": {"device": "nvme"}}}
    assert doctor.ops_needed(offloaded) == [("cpu_adam", "optimizer.params.torch_adam=false"),
                                            ("async_io", "zero_optimization.offload_optimizer.device=nvme")]


def test_a_deepspeed_op_that_cannot_be_built_is_a_blocker_naming_the_key(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("CXX", "no-such-compiler-d2v2scale")
    fused = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    line = doctor.check_deepspeed(_node(None, ds=fused))
    assert line.status == FAIL and "optimizer.params.torch_adam (absent) needs DeepSpeed op fused_adam" in line.fact
    assert "no-such-compiler-d2v2scale" in line.fact
    fsdp2 = _node(None, ds=fused)
    fsdp2.backend = "fsdp2"
    assert doctor.check_deepspeed(fsdp2).status == OK  # FSDP2 trains with torch's AdamW
    shipped = json.loads((ROOT / "ds_configs" / "vit_h.json").read_text())
    assert doctor.check_deepspeed(_node(None, ds=shipped)).status == OK  # torch_adam: nothing to build


def test_run_dir_space_and_shape(tmp_path):
    assert doctor.check_run_dir(str(tmp_path), 0).status == OK
    short = doctor.check_run_dir(str(tmp_path), 1e12)
    assert short.status == FAIL and "--min_free_gb" in short.fact and "first save would be refused" in short.fact
    (tmp_path / "file").write_text("x")
    assert doctor.check_run_dir(str(tmp_path / "file"), 0).status == FAIL
    assert doctor.check_run_dir(str(tmp_path / "file" / "below"), 0).status == FAIL


def test_data_path_shapes(tmp_path, data_dir):
    assert doctor.check_data_path(str(data_dir)).status == OK
    assert doctor.check_data_path(str(data_dir / "a.jpg")).status == OK
    (tmp_path / "empty").mkdir()
    assert "empty folder" in doctor.check_data_path(str(tmp_path / "empty")).fact
    (tmp_path / "zero.tsv").write_text("")
    assert doctor.check_data_path(str(tmp_path / "zero.tsv")).status == FAIL
    (tmp_path / "tokens.bin").write_bytes(b"\x01\x00")
    (tmp_path / "tokens.json").write_text("{}")
    prefix = doctor.check_data_path(str(tmp_path / "tokens"))
    assert prefix.status == OK and "token prefix" in prefix.fact


def test_infiniband_ports(tmp_path):
    port = tmp_path / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "link_layer").write_text("InfiniBand\n")
    up = doctor.check_infiniband(_node(), root=tmp_path, env={})
    assert up.status == OK and "mlx5_0/1 ACTIVE (InfiniBand)" in up.fact
    assert doctor.check_infiniband(_node(), root=tmp_path, env={"NCCL_IB_DISABLE": "1"}).status == WARN
    (port / "state").write_text("1: DOWN\n")
    assert doctor.check_infiniband(_node(), root=tmp_path, env={}).status == WARN
    assert doctor.check_infiniband(_node(), root=tmp_path / "none", env={}).status == WARN


def test_nccl_socket_interface():
    assert doctor.socket_ifname_problem("ib", ["lo", "ib0"]) is None
    assert doctor.socket_ifname_problem("=ib", ["lo", "ib0"]) is not None  # exact names after '='
    assert doctor.socket_ifname_problem("^docker,lo", ["lo"]) is None
    assert "matches no network interface" in doctor.socket_ifname_problem("ib0", ["lo", "eth0"])
    assert doctor.allocated_gpus({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert doctor.allocated_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert doctor.allocated_gpus({"CUDA_VISIBLE_DEVICES": ""}) is None and doctor.allocated_gpus({}) is None


def test_a_check_that_breaks_is_a_warning_not_a_traceback():
    def broken():
        raise RuntimeError("probe exploded\nsecond line")

    line = doctor._guarded("dali", broken).line()
    assert line == "warn dali: could not check (RuntimeError: probe exploded second line)"
