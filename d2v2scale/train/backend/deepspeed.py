"""The DeepSpeed backend: ``deepspeed.initialize`` with the ds_config, and every DeepSpeed name
d2v2scale reads (private ones included) in this one file.

The EMA teacher is sharded over the data-parallel group in DeepSpeed's own partition layout:
each rank's EMA slice sits next to the student's fp32 slice it averages, the update is one local
``lerp`` per group, and only the refresh of the compute-dtype teacher weights communicates
(all-gathers over DP, groups coalesced into buckets). Per ZeRO stage:

- stage 1/2: one flat group per optimizer param group, exactly DeepSpeed's ``bit16_groups_flat``
  layout; the student's slice is ``single_partition_of_fp32_groups[i]``. The param groups that
  hold only untracked parameters (decoder, audio CNN) are skipped: see
  :func:`d2v2scale.train.optim.param_groups`.
- stage 3: one group per parameter, partitioned as DeepSpeed partitions it; the student's slice
  is ``safe_get_local_fp32_param(p)``.
- stage 0: every rank has the full fp32 masters; the teacher takes an even slice of one flat
  vector of its parameters and copies its part of the masters.

The layout-free checkpoint state is read through the same partitions: at ZeRO-1/2 each
parameter's ``_hp_mapping`` says which elements of it this rank's fp32 partition holds; at ZeRO-3
a parameter's partition is ``[rank·n, (rank+1)·n)`` of its flat vector; at stage 0 the fp32
masters are replicated and each DP rank saves an even slice of every one.

These read DeepSpeed internals that are stable in 0.19.x (see ``reference/deepspeed_tp_ema.md``).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ...config import ConfigError
from ...distributed.dims import ParallelDims
from ...distributed.slices import even_piece, piece
from ...logs import adopt
from ...run_spec import MONITORS, RunSpec
from ..faults import all_finite
from ..optim import param_groups
from ..teacher import BUCKET_NUMEL, AllGather, EMASchedule, FlatGroup, FlatGroupEMA, default_groups
from .adam_state import adam_state, optimizer_steps, set_optimizer_steps
from .protocol import MOMENTS, Read, StateRange

# Every DeepSpeed internal the teacher, the checkpoints and the dp=1 step read or set, by what
# holds it. A DeepSpeed without one of them fails at start-up naming its version (never a silent
# fallback).
DEEPSPEED_INTERNALS = {
    "ZeRO-1/2 optimizer": ("bit16_groups", "bit16_groups_flat", "single_partition_of_fp32_groups", "optimizer",
                           "cpu_offload", "device", "get_grad_norm_direct", "dp_process_group",
                           "model_parallel_rank", "_model_parallel_all_reduce"),
    "bf16 optimizer (ZeRO-0)": ("fp16_groups", "fp32_groups", "optimizer"),
    "ZeRO-1/2 parameter": ("_hp_mapping",),
    "ZeRO-3 optimizer": ("fp32_partitioned_groups_flat", "optimizer"),
    "ZeRO-3 parameter": ("ds_tensor", "ds_numel", "partition_numel"),
    "engine": ("enable_backward_allreduce",),
}


def require_internals(obj, holder: str) -> None:
    """Raise naming the DeepSpeed version if ``obj`` lacks an attribute d2v2scale reads."""
    missing = [name for name in DEEPSPEED_INTERNALS[holder] if not hasattr(obj, name)]
    if missing:
        import deepspeed

        raise RuntimeError(f"DeepSpeed {deepspeed.__version__}: the {holder} ({type(obj).__name__}) has no "
                           f"{', '.join(missing)}, which d2v2scale relies on; use DeepSpeed "
                           "0.19.x (tested: 0.19.8)")


def _all_gather_fn(group) -> AllGather:
    # torch 2.13 renamed all_gather_into_tensor (now a deprecated alias that warns on every rank)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def gather(out: torch.Tensor, shard: torch.Tensor) -> None:
        all_gather(out, shard.contiguous(), group=group)

    return gather


def _names_by_id(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def _zero12_groups(engine, tracked: set[str]) -> tuple[list[FlatGroup], list[int]]:
    opt, names = engine.optimizer, _names_by_id(engine.module)
    require_internals(opt, "ZeRO-1/2 optimizer")
    groups, indices = [], []
    for i, (params, flat) in enumerate(zip(opt.bit16_groups, opt.bit16_groups_flat)):
        group_names = [names[id(p)] for p in params]
        if not any(n in tracked for n in group_names):
            continue
        if not all(n in tracked for n in group_names):
            raise ValueError(f"optimizer param group {i} mixes teacher-tracked and untracked parameters")
        base, size = flat.data_ptr(), flat.element_size()
        offsets = [(p.data_ptr() - base) // size for p in params]
        groups.append(FlatGroup(tuple(group_names), tuple(offsets), flat.numel()))
        indices.append(i)
    return groups, indices


def _stage0_masters(engine) -> dict[str, torch.Tensor]:
    """name → full fp32 master: the module parameter itself (fp32) or the optimizer's copy (bf16)."""
    names = _names_by_id(engine.module)
    opt = engine.optimizer
    if engine.bfloat16_enabled():
        require_internals(opt, "bf16 optimizer (ZeRO-0)")
        return {names[id(lp)]: hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    return {n: p for n, p in engine.module.named_parameters() if p.requires_grad}


def build_sharded_teacher(
    engine, teacher_module: nn.Module, schedule: EMASchedule, dims: ParallelDims, compute_dtype: torch.dtype,
    bucket_numel: int = BUCKET_NUMEL,
) -> FlatGroupEMA:
    """The EMA teacher of ``engine``'s student, sharded over ``dims``' DP group.

    ``teacher_module`` must be the student's teacher copy taken *before* ``deepspeed.initialize``
    (ZeRO-3 empties the module's parameters) and after tensor parallelism was applied.
    ``bucket_numel`` bounds the elements one refresh all-gather moves (the JSON's
    ``zero_optimization.allgather_bucket_size``, DeepSpeed's default 5e8)."""
    tracked = {n for n, p in teacher_module.named_parameters() if p.requires_grad}
    stage = engine.zero_optimization_stage()
    all_gather = _all_gather_fn(dims.dp_group) if dims.dp > 1 else None

    def sharded(groups: list[FlatGroup]) -> FlatGroupEMA:
        return FlatGroupEMA(teacher_module, schedule, compute_dtype=compute_dtype, groups=groups,
                            shard_rank=dims.dp_rank, shard_count=dims.dp, all_gather=all_gather,
                            bucket_numel=bucket_numel)

    if stage in (1, 2):
        groups, indices = _zero12_groups(engine, tracked)
        teacher = sharded(groups)
        opt = engine.optimizer
        teacher.bind_sources(lambda: [opt.single_partition_of_fp32_groups[i] for i in indices])
        return teacher
    if stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        params = [(n, p) for n, p in engine.module.named_parameters() if n in tracked]
        for _, p in params[:1]:
            require_internals(p, "ZeRO-3 parameter")
        groups = [FlatGroup((n,), (0,), p.partition_numel() * dims.dp) for n, p in params]
        teacher = sharded(groups)
        teacher.bind_sources(lambda: [safe_get_local_fp32_param(p) for _, p in params])
        return teacher
    names = [n for n, p in teacher_module.named_parameters() if p.requires_grad]
    teacher = sharded(default_groups(teacher_module, names, dims.dp))
    masters = _stage0_masters(engine)
    teacher.bind_student(masters)
    return teacher


def check_spec(spec: RunSpec, tp: int) -> None:
    """Layouts DeepSpeed cannot train, refused before any process group starts."""
    stage = spec.zero.stage
    if tp > 1 and stage == 3:
        raise ConfigError(f"parallel.tp={tp} with zero_optimization.stage=3 is not supported (DeepSpeed refuses "
                          "tensor parallelism with ZeRO-3 in training); allowed: stage 1 or 2 with tp > 1, tp=1, "
                          "or parallel.backend=fsdp2")
    if tp > 1 and stage == 0 and spec.precision.bf16:
        raise ConfigError(f"parallel.tp={tp} with zero_optimization.stage=0 and bf16 is not supported (DeepSpeed's "
                          "stage-0 bf16 optimizer computes a wrong gradient norm with TP); allowed: stage 1 or 2")


def deepspeed_json(spec: RunSpec) -> dict:
    """The dict ``deepspeed.initialize`` gets: the resolved JSON less the monitor sections, which
    d2v2scale's own sinks serve (the engine would log its handful of values and start W&B online)."""
    return {key: value for key, value in spec.json_copy().items() if key not in MONITORS}


def init_comm(device: torch.device) -> None:
    """Let DeepSpeed's communication layer wrap the process group :mod:`d2v2scale.distributed.runtime` started."""
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # named: DeepSpeed warns on every rank when it guesses
    import deepspeed

    if device.type == "cpu":
        # The CPU accelerator JIT-compiles a shared-memory all-reduce op (~85 s) that only inference
        # uses; DeepSpeed reads this dict before building it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger

    adopt(logger)  # DeepSpeed's INFO lines (config dumps, per rank) would drown the run's log
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


class DeepSpeedMPU:
    """The ``mpu`` interface ``deepspeed.initialize`` reads, so ZeRO partitions over the DP group only
    and gradient norms are summed over the TP group. It deliberately has no
    ``initialize_sequence_parallel`` attribute: DeepSpeed would then treat it as a sequence-parallel
    unit and silently drop the DP group."""

    def __init__(self, dims: ParallelDims):
        self._d = dims

    def get_data_parallel_group(self):
        return self._d.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self._d.dp

    def get_data_parallel_rank(self) -> int:
        return self._d.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self._d.dp_ranks(self._d.tp_rank)

    def get_model_parallel_group(self):
        return self._d.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self._d.tp

    def get_model_parallel_rank(self) -> int:
        return self._d.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._d.dp_rank * self._d.tp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


class SkipNonFinite:
    """DeepSpeed's ZeRO-0 fp32 path has no overflow check: a non-finite gradient from any
    micro-batch but the first (which the loop checks before backward) would be applied. This
    wrapper steps only when every gradient is finite on every rank, and reports ``overflow`` the way
    DeepSpeed's own optimizers do, so the engine counts the step as skipped and holds the schedule."""

    def __init__(self, optimizer, device: torch.device):
        self.optimizer, self.device, self.overflow = optimizer, device, False

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms = torch.stack(torch._foreach_norm(grads)) if grads else torch.zeros(1, device=self.device)
        self.overflow = not all_finite(norms.sum(), None)  # one reduction, one collective, one host read
        if self.overflow:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        return self.optimizer.step(closure)


def foreach_grad_norm(opt) -> None:
    """Replace DeepSpeed ZeRO-1/2's ``get_grad_norm_direct`` on ``opt`` (the L2 norm of one param
    group's gradient partitions, summed over DP and TP ranks, inf/NaN → -1) with the same sum
    computed by one ``_foreach_norm``: DeepSpeed takes a ``vector_norm`` and two ``.to`` per
    parameter (hundreds of kernel launches a step at ViT-H) and all-reduces even over a one-rank
    DP group — 2 ms of a 65 ms tiny_image CPU step, half of what ZeRO-1 adds there. Equal to
    DeepSpeed's own to fp32 rounding (``tests/dist/ds_internals.py`` runs both on the same
    gradients); p-norms other than 2 keep DeepSpeed's."""
    original = opt.get_grad_norm_direct
    reduce_dp = dist.get_world_size(opt.dp_process_group) > 1  # the group is fixed: decided once

    def grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original(gradients, params, norm_type)
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]  # DeepSpeed's pairing
        grads = [g for g, p in zip(grads, params)
                 if not getattr(p, "ds_pipe_replicated", False)
                 and (getattr(p, "model_parallel", False) or getattr(p, "tensor_model_parallel", False)
                      or opt.model_parallel_rank == 0)]
        total = (torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum() if grads
                 else torch.zeros((), dtype=torch.float32, device=opt.device))
        if reduce_dp:
            dist.all_reduce(total, group=opt.dp_process_group)
        opt._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        return total.masked_fill_(~total.isfinite(), -1.0)

    opt.get_grad_norm_direct = grad_norm_direct


class DeepSpeedBackend:
    """``deepspeed.initialize`` on the student; the teacher sharded in ZeRO's layout."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, teacher_module: nn.Module, spec: RunSpec, dims: ParallelDims,
                 schedule: EMASchedule, device: torch.device, tracked: set[str]):
        init_comm(device)  # first: it names the accelerator before DeepSpeed's import guesses it
        import deepspeed

        self.dims, self.device = dims, device
        bf16 = spec.precision.bf16
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, spec.optimizer.weight_decay, tracked),
            config=deepspeed_json(spec),
            mpu=DeepSpeedMPU(dims) if dims.world_size > 1 else None,
        )
        self.stage = self.engine.zero_optimization_stage()
        self._require_internals(bf16)
        if self.stage == 0 and not bf16:
            self.engine.optimizer = SkipNonFinite(self.engine.optimizer, device)
            if dims.dp == 1:  # the gradient all-reduce over one rank: a flatten, a no-op and a copy back
                self.engine.enable_backward_allreduce = False
        if self.stage in (1, 2) and not self.engine.optimizer.cpu_offload:
            foreach_grad_norm(self.engine.optimizer)
        bucket = spec.zero.allgather_bucket_size or BUCKET_NUMEL
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.teacher = build_sharded_teacher(self.engine, teacher_module, schedule, dims, dtype, bucket)
        self.version = deepspeed.__version__

    def _require_internals(self, bf16: bool) -> None:
        opt, first = self.engine.optimizer, next(p for p in self.engine.module.parameters() if p.requires_grad)
        require_internals(self.engine, "engine")
        if self.stage == 3:
            require_internals(opt, "ZeRO-3 optimizer")
            require_internals(first, "ZeRO-3 parameter")
        elif self.stage:
            require_internals(opt, "ZeRO-1/2 optimizer")
            require_internals(first, "ZeRO-1/2 parameter")
        elif bf16:
            require_internals(opt, "bf16 optimizer (ZeRO-0)")

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)  # the engine's forward, not the module's: it keeps ZeRO's bookkeeping

    # ------------------------------------------------------------------------------ the step
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def step_applied(self) -> bool:
        return self.engine.was_step_applied()

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()  # None at ZeRO-0 fp32: DeepSpeed does not compute it
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def local_weights(self) -> list[torch.Tensor]:
        return [p.ds_tensor if self.stage == 3 else p for p in self.engine.module.parameters()]

    def describe(self) -> dict:
        return {"backend": self.name, "deepspeed": self.version, "zero_stage": self.stage}

    # ----------------------------------------------------------------------- checkpoint state
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer  # every DeepSpeed optimizer (and SkipNonFinite) wraps torch's

    def _flats(self) -> list[torch.Tensor]:
        """The fp32 tensors the torch optimizer steps (DeepSpeed's flat partitions, or the parameters at stage 0 fp32)."""
        opt = self.engine.optimizer
        if self.stage == 3:
            return list(opt.fp32_partitioned_groups_flat)
        if self.stage in (1, 2):
            return list(opt.single_partition_of_fp32_groups)
        return list(_stage0_masters(self.engine).values())

    def state_ranges(self) -> list[StateRange]:
        opt = self._torch_optimizer()
        flats = self._flats()
        states = [adam_state(opt, f) for f in flats]
        module = self.engine.module
        out = []
        if self.stage == 3:
            from deepspeed.utils import (
                safe_get_local_fp32_param,
                safe_get_local_optimizer_state,
            )

            for name, p in module.named_parameters():
                lo, hi = self._z3_range(p)
                if p.requires_grad and lo < hi:
                    n = hi - lo
                    values = {"model": safe_get_local_fp32_param(p)[:n]}
                    values.update({k: safe_get_local_optimizer_state(p, k)[:n] for k in MOMENTS})
                    out.append((name, lo, hi, values))
        elif self.stage:
            for name, p in module.named_parameters():
                m = getattr(p, "_hp_mapping", None)  # None: no element of p in this rank's partition
                if m is None:
                    continue
                start, n, h = m.lp_fragment_address.start, m.lp_fragment_address.numel, m.hp_fragment_address.start
                i = m.param_group_index
                values = {"model": flats[i].narrow(0, h, n)}
                values.update({k: states[i][k].narrow(0, h, n) for k in MOMENTS})
                out.append((name, start, start + n, values))
        else:  # stage 0: replicated fp32 masters; each DP rank saves an even slice
            for name, master in _stage0_masters(self.engine).items():
                lo, hi = even_piece(master.numel(), self.dims.dp, self.dims.dp_rank)
                if lo < hi:
                    state = adam_state(opt, master)
                    values = {"model": master.detach().view(-1)[lo:hi]}
                    values.update({k: state[k].view(-1)[lo:hi] for k in MOMENTS})
                    out.append((name, lo, hi, values))
        return out

    def _z3_range(self, p) -> tuple[int, int]:
        return piece(p.ds_numel, p.partition_numel(), self.dims.dp_rank)

    def save_native(self, ckpt_dir, tag: str, step: int) -> None:
        """DeepSpeed's own checkpoint layout (``train.checkpoint_format=deepspeed``)."""
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)

    def load_native(self, tag_dir) -> int:
        path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {tag_dir}")
        return int(client["step"])

    def _z3_padded(self, read: Read, kind: str, name: str, p) -> torch.Tensor:
        """This rank's ZeRO-3 partition of ``kind`` for ``p``, zero-padded to the partition size."""
        lo, hi = self._z3_range(p)
        out = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=self.device)
        if lo < hi:
            out[: hi - lo] = read(kind, name, lo, hi)
        return out

    def counters(self) -> dict:
        return {"optimizer_steps": optimizer_steps(self._torch_optimizer()),
                "lr_iteration": getattr(self.engine.lr_scheduler, "last_batch_iteration", None),
                "skipped_steps": self.engine.skipped_steps, "global_steps": self.engine.global_steps}

    @torch.no_grad()
    def load_state(self, read: Read, counters: dict) -> None:
        module = self.engine.module
        opt = self._torch_optimizer()
        flats = self._flats()
        set_optimizer_steps(opt, flats, counters["optimizer_steps"])
        if self.stage == 3:
            from deepspeed.utils import (
                safe_set_local_fp32_param,
                safe_set_local_optimizer_state,
            )

            for name, p in module.named_parameters():
                if p.requires_grad:
                    master = self._z3_padded(read, "model", name, p)
                    safe_set_local_fp32_param(p, master)
                    p.ds_tensor.copy_(master.to(p.ds_tensor.dtype))
                    for k in MOMENTS:
                        safe_set_local_optimizer_state(p, self._z3_padded(read, k, name, p), k)
        elif self.stage:
            partition = {name: (start, stop, values) for name, start, stop, values in self.state_ranges()}
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                full = read("model", name, 0, p.numel())
                p.copy_(full.view_as(p))  # the bit16 module weight, whole on every rank
                if name in partition:  # this rank's fp32 fragment of it, and its moments
                    start, stop, values = partition[name]
                    values["model"].copy_(full[start:stop])
                    for k in MOMENTS:
                        values[k].copy_(read(k, name, start, stop))
        else:  # stage 0: every rank holds every master, its moments and (bf16) its module weight whole
            params = dict(module.named_parameters())
            for name, master in _stage0_masters(self.engine).items():
                state = adam_state(opt, master)
                for kind, tensor in (("model", master), ("model", params[name]), *((k, state[k]) for k in MOMENTS)):
                    tensor.copy_(read(kind, name, 0, master.numel()).view_as(tensor))
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step(counters["lr_iteration"])  # sets last_batch_iteration and the groups' lr
        self.engine.skipped_steps = counters["skipped_steps"]
        self.engine.global_steps = counters["global_steps"]
        self.engine.global_samples = counters["global_steps"] * self.engine.train_batch_size()


BACKEND = DeepSpeedBackend
SCHEDULES: tuple[str, ...] | None = None  # every one of DeepSpeed's own
