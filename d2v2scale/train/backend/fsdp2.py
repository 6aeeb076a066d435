"""The PyTorch FSDP2 backend: ``fully_shard`` per Transformer block and the root, driven by the
same ds_config as DeepSpeed (``optimizer``, ``scheduler``, ``gradient_clipping``, ``bf16``,
``zero_optimization.stage``, the batch keys).

ZeRO stage 3 maps to ``reshard_after_forward=True`` (weights gathered again for the backward),
stages 0-2 to ``False`` (kept from forward to backward, like ZeRO-2); parameters, gradients and
AdamW states are sharded over the data-parallel ranks at every stage. Tensor parallelism comes
from :mod:`d2v2scale.distributed` as for DeepSpeed; FSDP2 shards the TP-local weights over the
``dp`` dimension of a (dp, tp) device mesh built on the groups ``ParallelDims`` created.

The EMA teacher is an FSDP2 module of its own, sharded exactly as the student (dim 0 of every
TP-local weight over ``dp``): its fp32 shards are the EMA masters, updated with one local
``lerp`` towards the student's shards, and its forward gathers one block at a time (reshard after
forward), so a GPU holds 1/dp of the teacher between forwards instead of a full compute copy.

With fused AdamW (``"fused": true``) a step reads nothing back from the device: the gradient norm
decides on the device (``found_inf`` skips the update, the LR schedule's counter and the lr are
tensors), and "was the step applied" is handed to the trainer as a device flag.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn

from ...config import ConfigError
from ...distributed.dims import ParallelDims
from ...distributed.runtime import all_reduce
from ...distributed.slices import even_piece
from ...model.blocks import Block
from ...run_spec import RunSpec
from ..lr_schedule import SUPPORTED, schedule_from
from ..optim import param_groups
from ..teacher import EMASchedule, ShardedModuleEMA
from .adam_state import adam_state, optimizer_steps, set_optimizer_steps
from .protocol import MOMENTS, Read, StateRange

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def check_spec(spec: RunSpec, tp: int) -> None:
    """Refuse, before any process starts, what this backend would not honour in a well-formed
    ds_config (:mod:`d2v2scale.run_spec.validate` has checked the sections and their types; any ZeRO stage
    composes with tensor parallelism here)."""
    if not spec.optimizer.decoupled_weight_decay:
        raise ConfigError("ds_config optimizer.type=Adam with adam_w_mode=false (L2 weight decay) is not supported by "
                          "parallel.backend=fsdp2; allowed values: AdamW (or Adam with adam_w_mode)")
    if spec.precision.fp16:
        raise ConfigError("ds_config fp16.enabled=true is not supported by parallel.backend=fsdp2; allowed: bf16 or fp32")


def dp_mesh(dims: ParallelDims, device: torch.device):
    """The ``dp`` dimension of a (dp, tp) mesh over the process groups ``dims`` built (TP-fastest ranks)."""
    from torch.distributed.device_mesh import DeviceMesh

    if dims.tp == 1:
        return DeviceMesh.from_group(_built(dims.dp_group or dist.group.WORLD), device.type, mesh_dim_names=("dp",))
    mesh = DeviceMesh.from_group([_built(dims.dp_group), _built(dims.tp_group)], device.type,
                                 mesh=torch.arange(dims.world_size).view(dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
    return mesh["dp"]


def _built(group: object) -> dist.ProcessGroup:
    """A process group ``ParallelDims`` built (it types its groups as ``object``): a mesh needs real ones."""
    assert isinstance(group, dist.ProcessGroup), f"not a process group: {group!r}"
    return group


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2-sharded parameter, gradient or AdamW state: a DTensor, which
    torch's stubs type as a plain Tensor (``Module.named_parameters``, ``.grad``)."""
    return cast("DTensor", t).to_local()


def _row_range(p, dims: ParallelDims) -> tuple[int, int]:
    """Elements ``[start, stop)`` of the flattened TP-local weight that this rank's dim-0 shard holds
    (FSDP2 cuts dim 0 as ``torch.chunk`` does: ``ceil(n / dp)`` rows a rank, the last ones fewer)."""
    rows = p.shape[0]
    first, stop = even_piece(rows, dims.dp, dims.dp_rank)
    local = p.to_local()
    if local.shape[0] != stop - first:
        raise RuntimeError(f"FSDP2 shard of {tuple(p.shape)} on dp rank {dims.dp_rank} has {local.shape[0]} rows, "
                           f"expected {stop - first}")
    per_row = p.numel() // rows
    return first * per_row, first * per_row + local.numel()


def _blocks(module: nn.Module) -> list[nn.Module]:
    """Every Transformer block, the encoder's prenet ones included: each is an FSDP2 unit."""
    return [m for m in module.modules() if isinstance(m, Block)]


class FSDP2Backend:
    name = "fsdp2"

    def __init__(self, model: nn.Module, teacher_module: nn.Module, spec: RunSpec, dims: ParallelDims,
                 schedule: EMASchedule, device: torch.device, tracked: set[str]):
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        check_spec(spec, dims.tp)
        # A Block returns (out, ffn); ffn, the FFN output targets are built from, is a view of its
        # linear's 2-D result, and fully_shard warns that an in-place op on a returned view would
        # drop its pre-backward hook. Nothing changes ffn in place (the student discards it, the
        # teacher runs without grad), and the FSDP2 ≡ ZeRO-3 tests compare every step's gradients.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
        self.dims, self.device = dims, device
        compute = spec.precision.compute_dtype
        self.reshard = spec.zero.stage == 3
        self.tp_sharded = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
        mesh = dp_mesh(dims, device)
        student_mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for block in _blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard, mp_policy=student_mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=student_mp)
        self.model = model

        teacher_mp = MixedPrecisionPolicy(param_dtype=compute)
        for block in _blocks(teacher_module):
            fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=teacher_mp)
        encoder = getattr(teacher_module, "encoder", None)
        if isinstance(encoder, nn.Module):
            fully_shard(encoder, mesh=mesh, reshard_after_forward=True, mp_policy=teacher_mp)
            register_fsdp_forward_method(encoder, "local_features")
        from torch.distributed.tensor import DTensor

        loose = [n for n, p in teacher_module.named_parameters() if not isinstance(p, DTensor)]
        if loose:
            raise RuntimeError(f"teacher parameters outside its blocks and encoder cannot be sharded: {loose[:3]}")
        student = dict(model.named_parameters())
        names = [n for n, p in teacher_module.named_parameters() if n in tracked]
        ranges = [(n, *_row_range(p, dims), _local(p).view(-1)) for n, p in teacher_module.named_parameters() if n in tracked]
        self.teacher = ShardedModuleEMA(teacher_module, schedule, ranges)
        # Views taken once: FSDP2 keeps a sharded parameter's local storage for the run (it re-registers
        # one only on Module._apply or load_state_dict; checkpoints load in place), and deriving them
        # each update cost three host ops a parameter.
        with torch.no_grad():
            sources = [_local(student[n]).view(-1) for n in names]
        self.teacher.bind_sources(lambda: sources)

        opt = spec.optimizer
        # Fused AdamW skips a step on a device flag (found_inf) and takes a tensor lr: then a step
        # reads nothing back from the device. The unfused path decides on the host.
        self.sync_free = bool(opt.fused)
        groups = param_groups(model, opt.weight_decay, tracked)
        if self.sync_free:
            # On CPU torch reads a tensor lr as a scalar: float64 keeps it the Python float DeepSpeed's
            # schedule would give; the CUDA fused kernel reads a float32 lr from device memory.
            dtype = torch.float64 if device.type == "cpu" else torch.float32
            for group in groups:
                group["lr"] = torch.tensor(opt.lr, dtype=dtype, device=device)
        self.optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                                           fused=opt.fused, foreach=opt.foreach)
        self.scheduler = schedule_from(spec.scheduler, self.optimizer)
        self.clip = spec.gradient_clipping
        self.grad_accum = spec.batch.grad_accum
        self.micro_steps = self.global_steps = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._applied: torch.Tensor | bool = False
        self._norm: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------------------ the step
    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()  # FSDP2's reduce-scatter averages over dp

    def _local_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's gradient shards: (replicated over tp, sharded over tp). Under no_grad
        ``to_local`` is the DTensor's own tensor, so this dispatches nothing."""
        local: tuple[list, list] = ([], [])
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                local[name in self.tp_sharded].append(_local(p.grad))
        return local

    def _global_grad_norm(self, local: tuple[list, list]) -> torch.Tensor:
        """fp32 L2 norm of the whole model's gradient: shards summed over dp, TP-sharded weights over tp
        too, TP-replicated ones counted once. One foreach norm per kind, not a kernel per tensor."""
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        sums = torch.stack([torch.stack(torch._foreach_norm(grads)).float().pow(2).sum() if grads else zero
                            for grads in local])
        all_reduce(sums, self.dims.dp_group)
        if self.dims.tp > 1:
            all_reduce(sums[1:], self.dims.tp_group)
        return sums.sum().sqrt()

    @torch.no_grad()
    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        self.global_steps += 1
        local = self._local_grads()
        norm = self._norm = self._global_grad_norm(local)
        finite = torch.isfinite(norm)
        self._skipped += ~finite
        grads = local[0] + local[1]  # clipped in place through the shards: no DTensor dispatch per tensor
        if self.sync_free:
            if self.clip > 0:
                torch._foreach_mul_(grads, (self.clip / (norm + 1e-6)).clamp(max=1.0))
            # fused AdamW leaves everything as it was; torch reads this attribute with
            # getattr(optimizer, "found_inf", None) (GradScaler sets it too), so it is not in the stubs
            setattr(self.optimizer, "found_inf", (~finite).float())
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.advance(finite)
            self._applied = finite
        else:
            self._applied = bool(finite)
            if self._applied:
                coef = self.clip / (float(norm) + 1e-6) if self.clip > 0 else 1.0
                if coef < 1.0:
                    torch._foreach_mul_(grads, coef)
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_applied(self) -> torch.Tensor | bool:
        """A device bool with fused AdamW (nothing read back), else a Python bool."""
        return self._applied

    def grad_norm(self) -> float | None:
        return None if self._norm is None else float(self._norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def local_weights(self) -> list[torch.Tensor]:
        return [_local(p) for p in self.model.parameters()]

    def describe(self) -> dict:
        return {"backend": self.name, "torch": torch.__version__, "reshard_after_forward": self.reshard}

    # ----------------------------------------------------------------------- checkpoint state
    def state_ranges(self) -> list[StateRange]:
        out = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad or _local(p).numel() == 0:
                continue
            state = adam_state(self.optimizer, p)
            values = {"model": _local(p).view(-1)}
            values.update({k: state[k].to_local().view(-1) for k in MOMENTS})
            out.append((name, *_row_range(p, self.dims), values))
        return out

    def counters(self) -> dict:
        return {"optimizer_steps": optimizer_steps(self.optimizer),
                "lr_iteration": None if self.scheduler is None else self.scheduler.position(),
                "skipped_steps": int(self._skipped), "global_steps": self.global_steps}

    @torch.no_grad()
    def load_state(self, read: Read, counters: dict) -> None:
        for name, start, stop, values in self.state_ranges():
            for kind, tensor in values.items():
                tensor.copy_(read(kind, name, start, stop))
        set_optimizer_steps(self.optimizer, [p for p in self.model.parameters() if p.requires_grad],
                            counters["optimizer_steps"])
        if self.scheduler is not None and counters.get("lr_iteration") is not None:
            self.scheduler.step(counters["lr_iteration"])
        self._skipped.fill_(counters["skipped_steps"])
        self.global_steps = counters["global_steps"]
        self.micro_steps = self.global_steps * self.grad_accum


BACKEND = FSDP2Backend
SCHEDULES: tuple[str, ...] | None = SUPPORTED  # the schedule formula this backend runs (lr_schedule.py)
