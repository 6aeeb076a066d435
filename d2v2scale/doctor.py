"""Will a d2v2scale job start on this node? One line per check, ``ok``/``warn``/``FAIL`` then the fact.

Like ``ds_report`` or ``python -m torch.utils.collect_env``, but it answers one question: can the
training step start here, with this DeepSpeed JSON, this run directory and this data? A blocker
(``FAIL``) is something that stops the job or makes it fail at its first step or first checkpoint;
a warning (``warn``) is something a person should know (a CPU-only node, an op compiled at start)
but that does not stop it. Exit code 0 with warnings, 2 (:data:`~d2v2scale.exit_codes.EXIT_BAD_INPUT`)
with any blocker, so that the sbatch scripts can run it once per node before anything launches
(``srun --ntasks-per-node=1``) and fail the job with its lines instead of a traceback on every rank.

With ``--preset`` and the launcher's overrides it judges the job, not only the node: the data path is
checked only when the preset's ``data.kind`` reads one (``slurm/vit_h.sbatch`` sets ``DATA_PATH`` for
presets that train on ``digits`` too), the run directory must hold one checkpoint of that model, and a
configuration the launcher would refuse is a blocker here as well.

It is cheap on purpose (a few seconds, mostly importing torch and DeepSpeed): nothing is compiled
(DeepSpeed's op report would build probe programs), nothing is allocated on a GPU, and nothing is
written but one temporary file in the run directory, removed at once.

What "asks for a GPU" means for a DeepSpeed JSON (:func:`~d2v2scale.run_spec.gpu_only_keys`) is decided by what d2v2scale
runs on a CPU: bf16, ZeRO 0-3 and torch's fused AdamW (``torch_adam``/``fused``) all train there
(the CPU tests train ``ds_configs/cpu_tiny.json``, bf16 and fused AdamW), so they are not GPU requests. A key whose only effect
is a GPU's is: ``fp16`` (loss-scaled half precision for tensor cores; FSDP2 refuses it everywhere and
DeepSpeed's CPU accelerator wherever oneDNN lacks fp16), ``amp`` (apex AMP, CUDA only),
``zero_optimization.overlap_comm`` (a second CUDA stream for the gradient reduction; the shipped
``*_a100_40gb.json`` set it, and DeepSpeed's CPU accelerator has no streams), offloading with pinned
(page-locked) host buffers (``offload_*.pin_memory``, DeepSpeed's default; pinning exists for copies to
and from a GPU) and the ZeRO++ quantizers (CUDA kernels DeepSpeed's CPU accelerator lacks).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .atomic import cannot_write, nearest_existing
from .cli import OneLineParser
from .exit_codes import EXIT_BAD_INPUT, EXIT_OK
from .run_spec import bf16_enabled, gpu_only_keys, ops_needed

OK, WARN, FAIL = "ok", "warn", "FAIL"
# One ViT-H checkpoint: 637M student parameters x (4 B fp32 weight + 8 B AdamW moments) + 631M EMA
# teacher parameters x 4 B = 10.2 GB (d2v2scale.planning.memory.param_counts), plus the 5 % margin
# d2v2scale.train.checkpoint.check_free_space asks for: less than this and the first save of the
# largest preset is refused after hours of training, so the doctor refuses the node before it starts.
MIN_FREE_GB = 11.0
MIN_FREE_GB_FLOOR = 1.0  # a preset's own need, at least: the logs, metrics.jsonl and data indexes need room too
TESTED_DEEPSPEED = "0.19."  # d2v2scale reads DeepSpeed internals (train/backend/deepspeed.py): tested 0.19.8
PYTHON_MIN = (3, 10)  # setup.py python_requires
GPU_BUSY_BYTES = 2 << 30  # more than this in use on a GPU before the job starts: another process holds it
DALI_WHEEL = re.compile(r"^nvidia-dali(?:-nightly|-weekly)?-cuda(\d{3})$")  # the flavours, not the plugins
CUDA_OPS = ("fused_adam", "cpu_adam")  # the DeepSpeed ops ops_needed names that nvcc builds under DS_ACCELERATOR=cuda


@dataclass(frozen=True)
class Check:
    """One line of the report: a check's name, its status and the fact behind it."""

    name: str
    status: str  # OK, WARN or FAIL
    fact: str

    def line(self) -> str:
        """The printed line: always one line, whatever the fact held (error messages can span several)."""
        return f"{self.status:<4} {self.name}: {' '.join(self.fact.split())}"


@dataclass(frozen=True)
class Gpu:
    """A GPU as the job will see it (torch's numbering, after CUDA_VISIBLE_DEVICES)."""

    index: int
    name: str
    total: int  # bytes
    capability: tuple[int, int]
    used: int | None = None  # bytes in use before the job starts (NVML), None where unknown


@dataclass(frozen=True)
class Driver:
    """What NVML says about the NVIDIA driver; ``why`` says why nothing is known."""

    version: str | None = None
    cuda: int | None = None  # as NVML encodes it: 12040 is CUDA 12.4
    used: Mapping[str, int] = field(default_factory=dict)  # GPU UUID (without "GPU-") -> bytes in use
    why: str | None = None


@dataclass
class Node:
    """The facts gathered once and shared by several checks."""

    torch: ModuleType | None
    torch_error: str | None
    driver: Driver
    cuda: bool  # torch can use CUDA here
    gpus: list[Gpu]
    ds: dict | None = None  # the --ds_config JSON, when it loaded
    ds_error: str | None = None
    backend: str | None = None  # parallel.backend of the --preset configuration, when known
    gpu_error: str | None = None  # why the GPUs could not be listed, though CUDA is available


# ------------------------------------------------------------------------------ pure decisions
def cuda_text(encoded: int) -> str:
    """NVML's and CUDA's integer version (12040) as people write it (12.4)."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def wheel_cuda_major(dist_name: str) -> int | None:
    """The CUDA major a DALI wheel is built for, from its distribution name (``nvidia-dali-cuda130`` -> 13)."""
    m = DALI_WHEEL.match(dist_name.lower().replace("_", "-"))
    return int(m.group(1)) // 10 if m else None


def cuda_build_problem(build: str | None, driver_cuda: int | None) -> str | None:
    """Why a library built for CUDA ``build`` ("12.8") cannot run on a driver that supports
    ``driver_cuda`` (NVML's 12040), or None. CUDA's minor-version compatibility lets any 12.x build
    run on any CUDA 12 driver, so only the majors are compared."""
    if not build or driver_cuda is None:
        return None
    major = int(build.split(".")[0])
    if major > driver_cuda // 1000:
        return f"built for CUDA {build}, but the driver supports CUDA {cuda_text(driver_cuda)} (a CUDA {major} " \
               f"build needs a CUDA {major} driver)"
    return None


def dali_verdict(dists: list[str], driver_cuda: int | None, cuda: bool) -> tuple[str, str]:
    """Status and fact for the DALI wheels installed (``dists``: distribution names such as
    ``nvidia-dali-cuda120``), the driver's CUDA version (NVML's encoding, None when unknown) and whether
    CUDA works here. A wheel built for a newer CUDA major than the driver's cannot start its GPU
    pipelines, and two flavours overwrite each other's ``nvidia.dali`` package."""
    if not dists:
        return OK, ("not installed: images decode with pillow and audio with soundfile (pip install .[dali] or "
                    ".[dali-cuda13] for DALI)")
    if len(dists) > 1:
        return FAIL, (f"{' and '.join(sorted(dists))} are installed together: they write the same nvidia.dali "
                      "package over each other; keep the one for this driver's CUDA")
    name = dists[0]
    major = wheel_cuda_major(name)
    if major is None:
        return WARN, f"{name}: CUDA flavour not recognised from the name; cannot compare it with the driver"
    if driver_cuda is not None:
        if major > driver_cuda // 1000:
            other = "nvidia-dali-cuda120 (pip install .[dali])" if driver_cuda // 1000 == 12 else \
                f"the nvidia-dali-cuda{driver_cuda // 1000}0 wheel"
            return FAIL, (f"{name} is built for CUDA {major}, but this driver supports CUDA {cuda_text(driver_cuda)}: "
                          f"its GPU pipelines cannot start; install {other} or a newer driver")
        if cuda:
            return OK, f"{name} (CUDA {major}) on a CUDA {cuda_text(driver_cuda)} driver: GPU ('mixed') decoding"
    if not cuda:
        return WARN, f"{name} on a node without CUDA: DALI runs CPU pipelines only (decode on the CPU)"
    return WARN, (f"{name} (CUDA {major}): the driver's CUDA version is unknown (pynvml missing), so whether "
                  "this wheel fits it is unknown")


def socket_ifname_problem(value: str, interfaces: list[str]) -> str | None:
    """Why ``NCCL_SOCKET_IFNAME=value`` selects no interface among ``interfaces``, or None. NCCL reads
    a comma list of prefixes, exact names after ``=``, and exclusions after ``^`` (never wrong here)."""
    if not value or value.startswith("^"):
        return None
    exact = value.startswith("=")
    wanted = [w for w in value.lstrip("=").split(",") if w]
    if any(i == w if exact else i.startswith(w) for i in interfaces for w in wanted):
        return None
    return f"NCCL_SOCKET_IFNAME={value} matches no network interface here ({', '.join(sorted(interfaces)) or 'none'})"


def allocated_gpus(env: Mapping[str, str]) -> int | None:
    """How many GPUs this job was given on this node (Slurm's ``SLURM_GPUS_ON_NODE``, else the
    entries of a non-empty ``CUDA_VISIBLE_DEVICES``), None when it does not say."""
    slurm = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if slurm.isdigit():
        return int(slurm)
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and not visible.startswith("-1"):
        return len([v for v in visible.split(",") if v.strip()])
    return None


# ------------------------------------------------------------------------------ probes
def _probe_driver() -> Driver:
    """The driver's version, its CUDA version and each GPU's memory in use, through NVML (no CUDA context)."""
    try:
        import pynvml
    except ImportError:
        return Driver(why="pynvml (package nvidia-ml-py) is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 -- pynvml raises one NVMLError subclass per cause; all mean "no driver"
        return Driver(why=f"no NVIDIA driver answers ({e})")

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    try:
        version = text(pynvml.nvmlSystemGetDriverVersion())
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
        used = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            used[text(pynvml.nvmlDeviceGetUUID(handle)).removeprefix("GPU-")] = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        return Driver(version, cuda, used)
    except Exception as e:  # noqa: BLE001 -- a partial NVML (old driver) answers some calls and not others
        return Driver(why=f"NVML answered, but not fully ({e})")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 -- nothing to do about a failed shutdown
            pass


def _probe_gpus(torch: ModuleType, driver: Driver) -> list[Gpu]:
    """Every GPU torch sees; reading device properties allocates nothing on them."""
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", "")).removeprefix("GPU-")
        gpus.append(Gpu(i, props.name, props.total_memory, (props.major, props.minor), driver.used.get(uuid)))
    return gpus


def probe_node(ds_config: str | None) -> Node:
    """Gather what several checks share: torch, CUDA, the GPUs, the driver and the JSON."""
    driver = _probe_driver()
    try:
        import torch
    except Exception as e:  # noqa: BLE001 -- a broken torch install raises anything at import
        torch, error = None, f"{type(e).__name__}: {e}"
    else:
        error = None
    cuda = bool(torch is not None and torch.cuda.is_available())
    node = Node(torch, error, driver, cuda, [])
    if cuda:
        try:
            node.gpus = _probe_gpus(torch, driver)
        except Exception as e:  # noqa: BLE001 -- a GPU that fails its properties query fails in the job as well
            node.gpu_error = f"{type(e).__name__}: {e}"
    if ds_config is not None:
        from .config import ConfigError
        from .run_spec import load_ds_config

        try:
            node.ds = load_ds_config(ds_config)
        except (ConfigError, OSError, UnicodeDecodeError) as e:
            node.ds_error = str(e) if isinstance(e, ConfigError) else f"--ds_config '{ds_config}' cannot be read ({e})"
    return node


# ------------------------------------------------------------------------------ checks
def check_python(_: Node) -> Check:
    version = platform.python_version()
    if sys.version_info < PYTHON_MIN:
        return Check("python", FAIL, f"{version} ({sys.executable}); d2v2scale needs >= {'.'.join(map(str, PYTHON_MIN))}")
    return Check("python", OK, f"{version} ({sys.executable})")


def check_torch(node: Node) -> Check:
    if node.torch is None:
        return Check("torch", FAIL, f"cannot be imported ({node.torch_error}); install it first (see setup.py)")
    build = node.torch.version.cuda
    where = f"CUDA build {build}" if build else "CPU-only build (no CUDA)"
    return Check("torch", OK, f"{node.torch.__version__}, {where}")


def check_driver(node: Node) -> Check:
    d = node.driver
    if d.why:
        return Check("driver", WARN, f"{d.why}: the driver's CUDA version is unknown" +
                     ("" if node.cuda else "; a CPU-only node"))
    return Check("driver", OK, f"NVIDIA {d.version}, supports CUDA {cuda_text(d.cuda)} (NVML)")


def check_gpus(node: Node, env: Mapping[str, str] = os.environ) -> Check:
    build = node.torch.version.cuda if node.torch is not None else None
    problem = cuda_build_problem(build, node.driver.cuda)
    if problem:
        return Check("gpus", FAIL, f"torch {problem}: CUDA cannot start; install the torch build for this driver's "
                     "CUDA or a newer driver")
    if node.gpu_error:
        return Check("gpus", FAIL, f"CUDA is available, but listing the GPUs failed ({node.gpu_error})")
    given = allocated_gpus(env)
    if not node.gpus:
        why = "torch is a CPU-only build" if not build else "torch finds no usable GPU"
        if given:
            return Check("gpus", FAIL, f"this job was given {given} GPU(s), but {why}: it would train on the CPU")
        return Check("gpus", WARN, f"none ({why}): training runs on the CPU (gloo, fp32 or bf16)")
    groups: list[list[Gpu]] = []
    for gpu in node.gpus:  # consecutive GPUs of one kind are written once
        if groups and (groups[-1][-1].name, groups[-1][-1].total) == (gpu.name, gpu.total):
            groups[-1].append(gpu)
        else:
            groups.append([gpu])
    listed = "; ".join(f"#{g[0].index}{f'-{g[-1].index}' if len(g) > 1 else ''} {g[0].name} "
                       f"(sm_{g[0].capability[0]}{g[0].capability[1]}, {g[0].total / 2**30:.1f} GiB"
                       f"{' each' if len(g) > 1 else ''})" for g in groups)
    fact = f"{len(node.gpus)}: {listed}"
    busy = [g for g in node.gpus if g.used is not None and g.used > GPU_BUSY_BYTES]
    if busy:
        held = ", ".join(f"#{g.index} {g.used / 2**30:.1f} GiB" for g in busy)
        return Check("gpus", WARN, f"{fact}; already in use before the job: {held} (another process?)")
    if given and len(node.gpus) < given:
        return Check("gpus", WARN, f"{fact}; this job was given {given}")
    return Check("gpus", OK, fact)


def check_nccl(node: Node) -> Check:
    if node.torch is None or not node.torch.version.cuda:
        return Check("nccl", WARN, "none in this torch (CPU-only build): collectives use gloo")
    try:
        version = node.torch.cuda.nccl.version()
    except Exception as e:  # noqa: BLE001 -- a torch without its NCCL library raises RuntimeError or AttributeError
        return Check("nccl", FAIL if node.cuda else WARN, f"torch's NCCL does not answer ({e})")
    return Check("nccl", OK, ".".join(map(str, version)) if isinstance(version, tuple) else str(version))


def _missing_jit_tools(cuda_accel: bool) -> list[str]:
    """The tools a JIT build of a DeepSpeed op needs that are missing here (nothing is run but
    ``ninja --version``)."""
    from torch.utils import cpp_extension

    tools = {"ninja": cpp_extension.is_ninja_available(),
             os.environ.get("CXX", "c++"): shutil.which(os.environ.get("CXX", "c++")) is not None}
    if cuda_accel:
        tools["nvcc (CUDA_HOME)"] = cpp_extension.CUDA_HOME is not None
    return [tool for tool, present in tools.items() if not present]


def check_deepspeed(node: Node) -> Check:
    if importlib.util.find_spec("deepspeed") is None:
        return Check("deepspeed", FAIL, "not installed: d2v2scale validates every ds_config with it and trains with it "
                     "(DS_BUILD_OPS=0 pip install deepspeed==0.19.8)")
    try:
        from deepspeed import git_version_info as info
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()._name
    except Exception as e:  # noqa: BLE001 -- a DeepSpeed built for another torch raises anything at import
        return Check("deepspeed", FAIL, f"cannot be imported ({type(e).__name__}: {e})")
    prebuilt = [op for op, built in info.installed_ops.items() if built] if info.accelerator_name == accel else []
    missing = _missing_jit_tools(accel == "cuda")
    fact = (f"{info.version}, accelerator {accel}; prebuilt ops: {', '.join(prebuilt) or 'none'}; "
            f"JIT builds: {'possible' if not missing else 'impossible, no ' + ', '.join(missing)}")
    status, notes = OK, []
    if not info.version.startswith(TESTED_DEEPSPEED):
        status = WARN
        notes.append(f"d2v2scale reads DeepSpeed internals tested on {TESTED_DEEPSPEED}x")
    if node.ds is None:
        if accel == "cpu":
            notes.append("on the CPU accelerator a JSON with torch_adam=true (all shipped ones) builds no op, and "
                         "d2v2scale switches off the shm all-reduce op that only inference uses")
        return Check("deepspeed", status, "; ".join([fact, *notes]))
    if node.backend == "fsdp2":
        notes.append("parallel.backend=fsdp2 trains with torch's AdamW: no DeepSpeed op is built")
        return Check("deepspeed", status, "; ".join([fact, *notes]))
    for op, key in ops_needed(node.ds):
        blocking = [t for t in missing if op in CUDA_OPS or not t.startswith("nvcc")]
        if op == "async_io":
            import ctypes.util

            if ctypes.util.find_library("aio") is None:
                blocking.append("libaio")
        if op in prebuilt:
            notes.append(f"{key} needs op {op}: prebuilt")
        elif blocking:
            fix = "offload to cpu, or install libaio-dev" if op == "async_io" else \
                "set optimizer.params.torch_adam=true (torch's AdamW), or install what is missing"
            return Check("deepspeed", FAIL, f"{key} needs DeepSpeed op {op}, which is not prebuilt and cannot be "
                         f"JIT-built here (no {', '.join(blocking)}); {fix}; {fact}")
        else:
            status = WARN
            notes.append(f"{key} needs op {op}: JIT-compiled when the engine starts (minutes, on every node)")
    if not ops_needed(node.ds):
        notes.append("the ds_config needs no DeepSpeed op (torch's AdamW)")
    return Check("deepspeed", status, "; ".join([fact, *notes]))


def check_apex(node: Node) -> Check:
    if importlib.util.find_spec("apex") is None:
        return Check("apex", OK, "not installed (optional): torch's LayerNorm; with apex on a GPU, model.kernels=auto "
                     "uses its fused LayerNorm")
    extension = importlib.util.find_spec("fused_layer_norm_cuda") is not None
    if not node.cuda:
        return Check("apex", OK, "installed, but its kernels are CUDA-only: torch's LayerNorm on this node")
    if not extension:
        return Check("apex", WARN, "installed without its CUDA extension (fused_layer_norm_cuda; built without "
                     "--cuda_ext): model.kernels=auto picks apex.normalization.FusedLayerNorm and the first step "
                     "fails; rebuild apex with --cuda_ext or pass model.kernels=torch")
    return Check("apex", OK, "installed with its CUDA extension: model.kernels=auto swaps every affine LayerNorm for "
                 "apex.normalization.FusedLayerNorm (one fused CUDA kernel forward and backward)")


def _dali_dists() -> list[str]:
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in importlib.metadata.distributions()}
    return sorted(n for n in names if wheel_cuda_major(n) is not None)


def check_dali(node: Node) -> Check:
    status, fact = dali_verdict(_dali_dists(), node.driver.cuda, node.cuda)
    return Check("dali", status, fact)


def check_infiniband(node: Node, root: Path = Path("/sys/class/infiniband"),
                     env: Mapping[str, str] = os.environ) -> Check:
    devices = sorted(root.iterdir()) if root.is_dir() else []
    if not devices:
        return Check("infiniband", WARN, f"no devices under {root}: NCCL between nodes uses TCP sockets "
                     "(NCCL_SOCKET_IFNAME), far slower than InfiniBand/RoCE for multi-node runs")
    ports, active = [], 0
    for dev in devices:
        for port in sorted((dev / "ports").iterdir()) if (dev / "ports").is_dir() else []:
            state = _read(port / "state").split(":")[-1].strip() or "?"
            layer = _read(port / "link_layer") or "?"
            active += state == "ACTIVE"
            ports.append(f"{dev.name}/{port.name} {state} ({layer})")
    fact = ", ".join(ports) or ", ".join(d.name for d in devices)
    if env.get("NCCL_IB_DISABLE", "0") not in ("", "0"):
        return Check("infiniband", WARN, f"{fact}; NCCL_IB_DISABLE={env['NCCL_IB_DISABLE']}: NCCL ignores them")
    if not active:
        return Check("infiniband", WARN, f"{fact}; no port is ACTIVE: NCCL falls back to TCP sockets")
    return Check("infiniband", OK, fact)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def check_nccl_env(node: Node, env: Mapping[str, str] = os.environ, net: Path = Path("/sys/class/net")) -> Check:
    names = sorted(k for k in env if k.startswith(("NCCL_", "TORCH_NCCL_")))
    fact = ", ".join(f"{k}={env[k]}" for k in names) or "none set (NCCL's defaults)"
    interfaces = [p.name for p in net.iterdir()] if net.is_dir() else []
    problem = socket_ifname_problem(env.get("NCCL_SOCKET_IFNAME", ""), interfaces) if interfaces else None
    if problem:
        # NCCL's bootstrap needs the interface; without CUDA the job uses gloo and never reads it
        return Check("nccl_env", FAIL if node.cuda else WARN, f"{problem}: NCCL cannot bootstrap; {fact}")
    return Check("nccl_env", OK, fact)


def check_ds_config(node: Node, path: str) -> Check:
    if node.ds_error:
        return Check("ds_config", FAIL, node.ds_error)
    assert node.ds is not None
    if not node.cuda:
        asks = gpu_only_keys(node.ds, _pin_memory_default())
        if asks:
            (key, why), more = asks[0], len(asks) - 1
            return Check("ds_config", FAIL, f"{path}: {key} asks for a GPU ({why}) and this node has no CUDA"
                         f"{f' (and {more} more GPU-only key(s))' if more else ''}")
        return Check("ds_config", OK, f"{path}: asks for nothing GPU-only (bf16, ZeRO and torch's fused AdamW run "
                     "on a CPU too)")
    bf16 = bf16_enabled(node.ds)
    old = [g for g in node.gpus if g.capability < (8, 0)]
    if bf16 and old:
        g = old[0]
        return Check("ds_config", FAIL, f"{path}: bf16.enabled=true, but GPU #{g.index} ({g.name}, "
                     f"sm_{g.capability[0]}{g.capability[1]}) has no bf16; allowed: GPUs of sm_80 or newer, or "
                     "bf16.enabled=false")
    used = [key for key, _ in gpu_only_keys(node.ds, _pin_memory_default())]
    return Check("ds_config", OK, f"{path}: loads; GPU features it uses: {', '.join(used) or 'none'}"
                 f"{', bf16' if bf16 else ''}")


def _pin_memory_default() -> bool:
    """DeepSpeed's default for ``offload_*.pin_memory`` (its pydantic model's), True where it cannot be read."""
    try:
        from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig

        return bool(DeepSpeedZeroOffloadOptimizerConfig.model_fields["pin_memory"].default)
    except Exception:  # noqa: BLE001 -- no DeepSpeed (its own check says so) or another layout of its config
        return True


def check_run_dir(path: str, min_free_gb: float, why: str = "--min_free_gb") -> Check:
    """Writable (by a real write: root ignores permission bits, and a read-only mount says so only when
    written to or asked with statvfs) and with room for a checkpoint; a missing run directory is
    judged by the nearest existing folder above it, where the launcher will create it."""
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        return Check("run_dir", FAIL, f"{path} exists and is not a directory")
    probe = nearest_existing(target)
    if not probe.is_dir():
        return Check("run_dir", FAIL, f"{path}: {probe} is not a directory, so the run directory cannot be created")
    where = "" if probe == target else f" (to be created under {probe})"
    try:
        st = os.statvfs(probe)
    except OSError as e:
        return Check("run_dir", FAIL, f"{path}{where}: cannot ask its file system ({e.strerror})")
    if st.f_flag & os.ST_RDONLY:
        return Check("run_dir", FAIL, f"{path}{where}: {probe} is on a read-only file system")
    why_not = cannot_write(probe)
    if why_not:
        return Check("run_dir", FAIL, f"{path}{where}: cannot write in {probe}: {why_not}")
    free = st.f_bavail * st.f_frsize / 1e9
    if free < min_free_gb:
        return Check("run_dir", FAIL, f"{path}{where}: {free:.2f} GB free, less than the {min_free_gb:.3g} GB a "
                     f"checkpoint needs ({why}): the first save would be refused")
    return Check("run_dir", OK, f"{path}{where}: writable, {free:.1f} GB free (needs {min_free_gb:.3g} GB: {why})")


def load_preset(preset: str | None, overrides: list[str], data_path: str | None):
    """(the job's configuration, why it does not load): ``--preset`` with the launcher's overrides and
    ``--data_path`` as data.path; (None, None) without ``--preset``."""
    if preset is None:
        return None, None
    from .config import ConfigError, load_config

    try:
        return load_config(preset, [*overrides, *([f"data.path={data_path}"] if data_path else [])]), None
    except (ConfigError, OSError) as e:
        return None, str(e)


def check_preset(cfg, error: str | None, preset: str, overrides: list[str]) -> Check:
    """The launcher refuses a configuration that does not load (exit 2, never retried): a blocker here too.
    Without it the data path and the space are judged as if the preset were unknown."""
    if error:
        return Check("preset", FAIL, error)
    return Check("preset", OK, f"{preset} with {len(overrides)} override(s) loads: {cfg.model.modality}, "
                 f"data.kind={cfg.data.kind}, parallel.backend={cfg.parallel.backend}")


def data_path_to_check(data_path: str | None, cfg) -> tuple[str | None, str | None]:
    """(the path to check, or None; why it is not checked, or None). With the job's configuration a data
    set is checked only when the run reads one: ``slurm/vit_h.sbatch`` always sets ``DATA_PATH``, which a
    preset training on ``digits`` or ``synthetic`` never opens; without it the path given is checked."""
    if cfg is None:
        return data_path, None
    from .modality_registry import data_kind

    kind = data_kind(cfg)
    if kind is None or not kind.needs_path:
        return None, f"not read: {cfg.preset} trains on data.kind={cfg.data.kind}, which reads no data.path"
    return data_path or (str(cfg.data.path) if cfg.data.path else None), None


def checkpoint_gb(cfg) -> float:
    """One layout-free checkpoint of ``cfg``'s model as :mod:`d2v2scale.train.checkpoint` writes it: fp32
    weights and AdamW's two moments (12 B per trainable parameter) and the fp32 EMA teacher (4 B per
    parameter); the RNG states and metadata are small beside them."""
    from .planning.memory import param_counts

    counts = param_counts(cfg, 1)
    return (12 * counts.trainable + 4 * counts.teacher) / 1e9


def space_needed(min_free_gb: float | None, cfg) -> tuple[float, str]:
    """(GB the run directory needs, why). ``--min_free_gb`` when given; else one checkpoint of the job's
    preset plus the 5 % margin :func:`~d2v2scale.train.checkpoint.check_free_space` asks for, at least
    :data:`MIN_FREE_GB_FLOOR` (logs, metrics and data indexes beside it); else :data:`MIN_FREE_GB`."""
    if min_free_gb is not None:
        return min_free_gb, "--min_free_gb"
    if cfg is not None:
        one = checkpoint_gb(cfg)
        return max(MIN_FREE_GB_FLOOR, 1.05 * one), f"one {cfg.preset} checkpoint ({_size(one * 1e9)}) + 5 %, " \
                                                    f"at least {MIN_FREE_GB_FLOOR:g} GB"
    return MIN_FREE_GB, "one ViT-H checkpoint (10.2 GB) + 5 %; --preset sizes it for the job's model"


def check_data_path(path: str) -> Check:
    """Exists and can be read: a folder lists an entry, a file gives a byte; a token prefix
    (``PREFIX.bin`` + ``PREFIX.json``, data.kind=text) gives a byte of each."""
    p = Path(path)
    try:
        if p.is_dir():
            with os.scandir(p) as entries:
                first = next(entries, None)
            if first is None:
                return Check("data_path", FAIL, f"{path} is an empty folder")
            return Check("data_path", OK, f"{path}: a folder, readable (first entry {first.name})")
        if p.is_file():
            return _readable_files("data_path", path, [p])
        from .data.text import token_files

        files = list(token_files(p))
        if all(f.is_file() for f in files):
            return _readable_files("data_path", f"{path} (token prefix)", files)
        if p.exists():
            return Check("data_path", FAIL, f"{path} is neither a file nor a folder")
        return Check("data_path", FAIL, f"{path} does not exist")
    except OSError as e:
        return Check("data_path", FAIL, f"{path} cannot be read ({e.strerror or e})")


def _readable_files(name: str, label: str, files: list[Path]) -> Check:
    sizes = []
    for f in files:
        with open(f, "rb") as handle:
            if not handle.read(1):
                return Check(name, FAIL, f"{label}: {f} is empty")
        sizes.append(f"{f.name} {_size(f.stat().st_size)}")
    return Check(name, OK, f"{label}: readable ({', '.join(sizes)})")


def _size(n: float) -> str:
    """Bytes as people read them, in the decimal units the checkpoint messages use."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


# ------------------------------------------------------------------------------ the report
def _guarded(name: str, run: Callable[[], Check]) -> Check:
    """A check that breaks is a warning naming why, never a traceback that hides the other lines."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 -- the doctor reports; whatever one probe raises is its fact
        return Check(name, WARN, f"could not check ({type(e).__name__}: {e})")


def run_checks(args: argparse.Namespace) -> Iterator[Check]:
    """Every check for ``args``, in the order printed (the verdict not included), each as soon as it
    is known: when a probe hangs (a stale network mount), the last line printed says where."""
    node = probe_node(args.ds_config)
    cfg, cfg_error = load_preset(args.preset, args.overrides, args.data_path)
    node.backend = cfg.parallel.backend if cfg is not None else None
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("python", lambda: check_python(node)),
        ("torch", lambda: check_torch(node)),
        ("driver", lambda: check_driver(node)),
        ("gpus", lambda: check_gpus(node)),
        ("nccl", lambda: check_nccl(node)),
        ("deepspeed", lambda: check_deepspeed(node)),
        ("apex", lambda: check_apex(node)),
        ("dali", lambda: check_dali(node)),
        ("infiniband", lambda: check_infiniband(node)),
        ("nccl_env", lambda: check_nccl_env(node)),
    ]
    if args.preset is not None:
        checks.append(("preset", lambda: check_preset(cfg, cfg_error, args.preset, args.overrides)))
    if args.ds_config is not None:
        checks.append(("ds_config", lambda: check_ds_config(node, args.ds_config)))
    checks.append(("run_dir", lambda: check_run_dir(args.run_dir, *space_needed(args.min_free_gb, cfg))))
    path, unread = data_path_to_check(args.data_path, cfg)
    if unread:
        checks.append(("data_path", lambda: Check("data_path", OK, unread)))
    elif path is not None:
        checks.append(("data_path", lambda: check_data_path(path)))
    for name, run in checks:
        yield _guarded(name, run)


def verdict(checks: list[Check]) -> Check:
    """The last line: this node's name (lines of many nodes interleave in a job's log) and the answer."""
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    blockers = sum(c.status == FAIL for c in checks)
    warnings = sum(c.status == WARN for c in checks)
    answer = "cannot start the job" if blockers else "can start the job"
    return Check("verdict", FAIL if blockers else OK,
                 f"{host} {answer} ({blockers} blocker(s), {warnings} warning(s))")


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: allowed values: numbers >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="doctor", description=__doc__.splitlines()[0],
                      epilog="example: python -m d2v2scale.doctor --ds_config ds_configs/vit_h_a100_40gb.json "
                             "--run_dir runs/vit_h --data_path /datasets/imagenet/train --preset vit_h\n"
                             "exit codes: 0 this node can start the job (warnings allowed), 2 a blocker (FAIL) "
                             "or a wrong argument")
    p.add_argument("--ds_config", help="the DeepSpeed JSON the job trains with (a path, or a shipped NAME.json)")
    p.add_argument("--run_dir", default="runs", help="where the run writes (default: runs); it may not exist yet")
    p.add_argument("--min_free_gb", type=_non_negative,
                   help="free space the run directory needs (default: one checkpoint of --preset plus the 5 %% margin "
                        f"a save asks for, at least {MIN_FREE_GB_FLOOR:g}; without --preset {MIN_FREE_GB:g}, one ViT-H "
                        "checkpoint, 10.2 GB, plus that margin)")
    p.add_argument("--data_path", help="the data set (data.path): a folder, a file, or a token prefix")
    p.add_argument("--preset", help="the preset the job trains, with the launcher's overrides after it: the data "
                                    "set is checked only when its data.kind reads one (data.path may come from them)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="the launcher's overrides (with --preset)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.overrides and args.preset is None:
        p.error(f"overrides ({args.overrides[0]} ...) are read with --preset only")
    # named as d2v2scale's backends name it (pick_device): DeepSpeed warns on import when it has to guess
    if "DS_ACCELERATOR" not in os.environ:
        try:
            import torch
        except Exception:  # noqa: BLE001 -- the torch check reports it
            pass
        else:
            os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    checks: list[Check] = []
    for check in run_checks(args):
        print(check.line(), flush=True)
        checks.append(check)
    print(verdict(checks).line(), flush=True)
    return EXIT_BAD_INPUT if any(c.status == FAIL for c in checks) else EXIT_OK


def entry() -> None:
    """The ``d2v2scale-doctor`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
