"""The run's DeepSpeed JSON as typed, frozen values (:class:`RunSpec`).

The JSON is DeepSpeed's format (users keep writing it), but d2v2scale also drives FSDP2, the
planner, the metric sinks and the reports from it. Each of them reads a :class:`RunSpec` — the
batch split, precision, optimizer, schedule, clipping, ZeRO options and monitors, with DeepSpeed's
defaults filled in — instead of its own ``.get`` chain with its own default. Only the DeepSpeed
backend sees a dict again: :attr:`RunSpec.json`, the resolved JSON (every ``"auto"`` filled in),
which is also what a run directory and its checkpoints record.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from ..config import Config
from .batch import BatchPlan, plan_batch, resolve_ds_config

MONITORS = ("tensorboard", "csv_monitor", "wandb")  # the sections d2v2scale's metric sinks serve (train/sinks.py)
MONITOR_JOB_NAME = "DeepSpeedJobName"  # DeepSpeed's default job_name


@dataclass(frozen=True)
class Precision:
    bf16: bool = False
    fp16: bool = False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in (fp16 only runs inside DeepSpeed's own loss scaling)."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW as both backends build it (DeepSpeed's defaults where the JSON is silent)."""

    type: str = "AdamW"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    adam_w_mode: bool = True
    torch_adam: bool = False
    fused: bool | None = None
    foreach: bool | None = None

    @property
    def decoupled_weight_decay(self) -> bool:
        """AdamW's decay (``Adam`` with ``adam_w_mode=false`` is L2 regularisation instead)."""
        return self.type.lower() == "adamw" or self.adam_w_mode


@dataclass(frozen=True)
class SchedulerSpec:
    """A DeepSpeed learning-rate schedule by name, with its parameters as the JSON gives them."""

    type: str
    params: Mapping[str, Any]

    @property
    def warmup_num_steps(self) -> int:
        return int(self.params.get("warmup_num_steps", 0))

    def describe(self) -> str:
        return f"{self.type}, warmup {self.warmup_num_steps}"


@dataclass(frozen=True)
class OffloadSpec:
    device: str = "none"  # none | cpu | nvme
    pin_memory: bool | None = None  # None: DeepSpeed's default


@dataclass(frozen=True)
class ZeroSpec:
    stage: int = 0
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: float = 5e8  # elements (DeepSpeed's default)
    allgather_bucket_size: int | None = None  # elements; None: unset (the EMA teacher picks its own bucket)
    stage3_param_persistence_threshold: float = 1e5
    stage3_max_reuse_distance: float = 1e9
    stage3_max_live_parameters: float = 1e9
    offload_optimizer: OffloadSpec = OffloadSpec()
    offload_param: OffloadSpec = OffloadSpec()


@dataclass(frozen=True)
class MonitorSpec:
    """One enabled metric sink section (DeepSpeed's keys): where its files go, or the W&B run."""

    name: str  # tensorboard | csv_monitor | wandb
    output_path: str = ""  # "": the run directory
    job_name: str = MONITOR_JOB_NAME
    project: str = "d2v2scale"
    group: str | None = None
    team: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """Everything the DeepSpeed JSON decides for one launch, resolved against the preset and the
    data-parallel size."""

    batch: BatchPlan
    precision: Precision
    optimizer: OptimizerSpec
    scheduler: SchedulerSpec | None
    gradient_clipping: float  # 0: off
    zero: ZeroSpec
    monitors: tuple[MonitorSpec, ...]
    json: Mapping[str, Any]  # the resolved JSON, read-only: what DeepSpeed gets and checkpoints record

    def json_copy(self) -> dict:
        """A plain, writable deep copy of :attr:`json` (to save it, or to hand it to DeepSpeed)."""
        return _thaw(self.json)

    def describe(self, cfg: Config) -> str:
        """One line for the start of a run: the effective batch and the learning-rate schedule."""
        sched = self.scheduler
        kind, warmup = (sched.type, sched.warmup_num_steps) if sched else ("constant", 0)
        return (f"{self.batch.describe()}; peak lr {self.optimizer.lr} ({kind}, warmup {warmup} of "
                f"{cfg.train.max_updates} updates); masks per sample M={cfg.model.clone_batch}")


def run_spec(ds: dict, cfg: Config, dp: int) -> RunSpec:
    """Split ``train.global_batch`` over ``dp`` ranks as the (validated) JSON ``ds`` asks, fill its
    ``"auto"`` values, and type it; ConfigError when the batch does not split."""
    plan = plan_batch(ds, cfg, dp)
    return read_spec(resolve_ds_config(ds, cfg, plan), plan)


def read_spec(resolved: dict, plan: BatchPlan) -> RunSpec:
    """The typed view of an already resolved JSON (e.g. the one a checkpoint recorded)."""
    section = json_sections(resolved)
    opt = section("optimizer").get("params", {})
    sched = section("scheduler")
    zero = section("zero_optimization")
    return RunSpec(
        batch=plan,
        precision=_precision(section),
        optimizer=OptimizerSpec(
            type=str(section("optimizer").get("type", OptimizerSpec.type)),
            lr=float(opt.get("lr", OptimizerSpec.lr)),
            betas=_pair(opt.get("betas", OptimizerSpec.betas)),
            eps=float(opt.get("eps", OptimizerSpec.eps)),
            weight_decay=float(opt.get("weight_decay", OptimizerSpec.weight_decay)),
            adam_w_mode=bool(opt.get("adam_w_mode", True)),
            torch_adam=opt.get("torch_adam") is True,
            fused=opt.get("fused"),
            foreach=opt.get("foreach"),
        ),
        scheduler=SchedulerSpec(str(sched["type"]), MappingProxyType(dict(sched.get("params", {})))) if sched else None,
        gradient_clipping=float(resolved.get("gradient_clipping", 0.0)),
        zero=ZeroSpec(
            stage=int(zero.get("stage", 0)),
            overlap_comm=zero.get("overlap_comm") is True,
            contiguous_gradients=zero.get("contiguous_gradients", True) is True,
            reduce_bucket_size=float(zero.get("reduce_bucket_size", ZeroSpec.reduce_bucket_size)),
            allgather_bucket_size=int(zero["allgather_bucket_size"]) if "allgather_bucket_size" in zero else None,
            stage3_param_persistence_threshold=float(zero.get("stage3_param_persistence_threshold",
                                                              ZeroSpec.stage3_param_persistence_threshold)),
            stage3_max_reuse_distance=float(zero.get("stage3_max_reuse_distance", ZeroSpec.stage3_max_reuse_distance)),
            stage3_max_live_parameters=float(zero.get("stage3_max_live_parameters", ZeroSpec.stage3_max_live_parameters)),
            offload_optimizer=read_offload(zero.get("offload_optimizer")),
            offload_param=read_offload(zero.get("offload_param")),
        ),
        monitors=tuple(_monitor(name, section(name)) for name in MONITORS if section(name).get("enabled") is True),
        json=_freeze(resolved),
    )


def recorded_micro_batch(resolved: Mapping[str, Any]) -> int | None:
    """The per-rank micro-batch a resolved JSON (a checkpoint's record) ran with."""
    micro = resolved.get("train_micro_batch_size_per_gpu")
    return micro if isinstance(micro, int) else None


def peak_lr(ds: dict) -> float | None:
    """The JSON's ``optimizer.params.lr`` (None when absent): the planner's batch-scaling line."""
    lr = json_sections(ds)("optimizer").get("params", {}).get("lr")
    return float(lr) if lr is not None else None


def reference_row(ds: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the configuration reference tabulates of a shipped (unresolved) JSON: precision, ZeRO
    stage, micro-batch, lr, betas, weight decay, warm-up, clipping, the other ZeRO keys."""
    section = json_sections(ds)
    opt, sched, zero = section("optimizer").get("params", {}), section("scheduler").get("params", {}), \
        section("zero_optimization")
    return (_precision(section).name, zero.get("stage", 0), ds.get("train_micro_batch_size_per_gpu", "auto"), opt.get("lr"),
            opt.get("betas"), opt.get("weight_decay"), sched.get("warmup_num_steps"), ds.get("gradient_clipping", 0),
            {k: v for k, v in zero.items() if k != "stage"})


def set_micro_batch(ds: dict, micro: int | str) -> None:
    """Write ``train_micro_batch_size_per_gpu`` (the planner tries its candidates this way)."""
    ds["train_micro_batch_size_per_gpu"] = micro


def set_zero_stage(ds: dict, stage: int) -> None:
    """Write ``zero_optimization.stage``, the accumulation steps left to the batch split."""
    ds.setdefault("zero_optimization", {})["stage"] = stage
    ds["gradient_accumulation_steps"] = "auto"


def _precision(section: Callable[[str], Mapping[str, Any]]) -> Precision:
    return Precision(bf16=section("bf16").get("enabled") is True, fp16=section("fp16").get("enabled") is True)


def _pair(values: Any) -> tuple[float, float]:
    first, second = values  # two numbers (the validator checked them)
    return float(first), float(second)


def json_sections(ds: Mapping[str, Any]) -> Callable[[str], Mapping[str, Any]]:
    """``name`` → the JSON object under it, ``{}`` when absent or not an object (a doctor may ask
    of a JSON nobody validated yet)."""
    def section(name: str) -> Mapping[str, Any]:
        value = ds.get(name)
        return value if isinstance(value, Mapping) else {}

    return section


def read_offload(section: Any) -> OffloadSpec:
    """A ``zero_optimization.offload_*`` section (anything else: no offload)."""
    if not isinstance(section, Mapping):
        return OffloadSpec()
    pinned = section.get("pin_memory")
    return OffloadSpec(str(section.get("device", "none")), pinned if isinstance(pinned, bool) else None)


def _monitor(name: str, section: Mapping[str, Any]) -> MonitorSpec:
    return MonitorSpec(name, output_path=str(section.get("output_path") or ""),
                       job_name=str(section.get("job_name", MONITOR_JOB_NAME)),
                       project=str(section.get("project", MonitorSpec.project)),
                       group=section.get("group"), team=section.get("team"))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return copy.deepcopy(value)
