"""Megatron-style tensor parallelism: the mappings and layers a model's TP plan is made of.

Four autograd mappings carry all the communication; the linear layers only pick one:

==========================  =====================  =====================
mapping                     forward                backward
==========================  =====================  =====================
copy_to_tp                  identity               all-reduce
reduce_from_tp              all-reduce             identity
scatter_to_tp (last dim)    keep own chunk         all-gather
gather_from_tp (last dim)   all-gather             keep own chunk
==========================  =====================  =====================

:func:`column_from` / :func:`row_from` turn a built ``nn.Linear`` into its shard: a *slice of the
full weight* the unsharded model was initialised with, so a TP run starts from exactly the TP=1
model. Sharded parameters carry ``tensor_model_parallel``/``partition_dim`` so DeepSpeed's
gradient-norm code counts replicated parameters once. Which layers are sharded is the model's own
plan (:mod:`d2v2scale.model.parallelize`); nothing here knows a model.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .dims import ParallelDims


# ------------------------------------------------------------------------------------ mappings
def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group)


# ---------------------------------------------------------------------------------- linears
class _Shared:
    """Deep copies (e.g. the EMA teacher's copy of a TP model) share this object: process groups
    cannot be copied, and teacher and student must talk over the same groups anyway."""

    def __deepcopy__(self, memo):
        return self


class _GroupRef(_Shared):
    def __init__(self, group):
        self.group = group


def tag_tp(param: nn.Parameter, partition_dim: int, stride: int = 1) -> nn.Parameter:
    """The attributes DeepSpeed (``is_model_parallel_parameter``) and checkpoint tools read."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride
    return param


@dataclass(frozen=True)
class TPSlice:
    """Where a TP-local tensor sits in the full one: the full tensor viewed as ``view`` (its
    partitioned dim split into ``(stride, tp, local // stride)``) holds it at ``index`` of ``dim``.
    The row-major order of that box is the local tensor's own, so a flat range of the local
    tensor is a flat range of the box (what layout-free checkpoints store)."""

    view: tuple[int, ...]
    dim: int
    index: int

    def full_shape(self) -> tuple[int, ...]:
        d = self.dim - 1
        return (*self.view[:d], self.view[d] * self.view[d + 1] * self.view[d + 2], *self.view[d + 3:])


def tp_slice(param: torch.Tensor, dims: ParallelDims) -> TPSlice | None:
    """The :class:`TPSlice` of a parameter :func:`tag_tp` marked; None for a replicated one."""
    if dims.tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return None
    d, stride, shape = param.partition_dim, param.partition_stride, tuple(param.shape)
    return TPSlice((*shape[:d], stride, dims.tp, shape[d] // stride, *shape[d + 1:]), d + 1, dims.tp_rank)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_localᵀ + b_local: output features split over TP; input replicated (copy_to_tp)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, stride: int = 1):
        super().__init__()
        self._group = _GroupRef(group)
        self.weight = tag_tp(nn.Parameter(weight), 0, stride)
        self.bias = tag_tp(nn.Parameter(bias), 0, stride) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self._group.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = reduce(x_local W_localᵀ) + b: input features split over TP; the bias is added once, after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self._group = _GroupRef(group)
        self.weight = tag_tp(nn.Parameter(weight), 1)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self._group.group)
        return y + self.bias if self.bias is not None else y


def _rows(t: torch.Tensor, rank: int, tp: int, groups: int = 1) -> torch.Tensor:
    """Rank's share of dim 0, taken from each of ``groups`` equal blocks (qkv: q, k and v)."""
    blocks = t.detach().reshape(groups, tp, -1, *t.shape[1:])
    return blocks[:, rank].reshape(-1, *t.shape[1:]).clone()


def column_from(linear: nn.Linear, dims: ParallelDims, groups: int = 1) -> ColumnParallelLinear:
    r, n = dims.tp_rank, dims.tp
    bias = _rows(linear.bias, r, n, groups) if linear.bias is not None else None
    return ColumnParallelLinear(_rows(linear.weight, r, n, groups), bias, dims.tp_group, stride=groups)


def row_from(linear: nn.Linear, dims: ParallelDims) -> RowParallelLinear:
    r, n = dims.tp_rank, dims.tp
    weight = linear.weight.detach().chunk(n, dim=1)[r].clone()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return RowParallelLinear(weight, bias, dims.tp_group)


# -------------------------------------------------------------------------------------- RNG
class TPRegionRNG(_Shared):
    """A second RNG stream for dropout inside TP-sharded regions (attention probabilities, the
    fc1 activation): it differs between TP ranks, because each rank holds different heads/features,
    while the default stream — seeded identically within a TP group — drives everything replicated."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        saved = self._get()
        torch.manual_seed(seed)
        self.state = self._get()
        self._set(saved)

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextmanager
    def fork(self):
        saved = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(saved)


    def checkpoint_contexts(self) -> tuple[ContextManager, ContextManager]:
        """Activation checkpointing's (forward, recompute) contexts: the recompute replays this
        stream from where the block's forward found it, so dropout masks in TP regions match."""
        at_forward = self.state.clone()

        @contextmanager
        def replay():
            current, self.state = self.state, at_forward.clone()
            try:
                yield
            finally:
                self.state = current

        return nullcontext(), replay()
