"""A roofline of the real training step, measured without a GPU.

Every aten op the step dispatches is recorded under a ``TorchDispatchMode`` - the same ops a GPU
run launches as kernels, one per op in eager mode - with its FLOPs and the bytes it reads and
writes, and labelled with the step's phase (the ones :mod:`.timers` times: local_encoder,
teacher, student, decoder_loss, backward, optimizer, ema; "other" for the glue between them). On
a :class:`Device`, a kernel takes ``max(FLOPs / peak, bytes / bandwidth) + launch``: the time a
perfect kernel would need, so the prediction is a lower bound per kernel, and what bounds it
(compute, memory or launch) says where the step loses time.

Ops that only change a tensor's metadata (views, detach) launch nothing; a copy of a scalar to
the host (``.item()``, a bool of a device tensor) is a synchronisation, counted apart. The host
dispatches every op, views included, and in eager mode spends tens of microseconds on each
(Python, dispatcher, autograd): ``host_ops`` counts them, because a step whose kernels are short
waits for the host, not the GPU.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from .flops import PEAK_FLOPS


@dataclass(frozen=True)
class Device:
    """What a kernel's time is predicted from: dense bf16 peak, HBM bandwidth, a fixed cost per
    kernel (launch and the ramp of a small grid; a few microseconds on every recent NVIDIA part)."""

    name: str
    peak_flops: float
    bandwidth: float  # bytes/s
    launch_s: float = 5e-6


DEVICES = {
    "a100-40gb": Device("A100-SXM4-40GB", PEAK_FLOPS["a100-40gb"], 1.555e12),
    "h100-80gb": Device("H100-SXM5-80GB", PEAK_FLOPS["h100-80gb"], 3.35e12),
    "h200": Device("H200-SXM-141GB", PEAK_FLOPS["h200"], 4.8e12),
}
SYNC = "host sync"  # the op group of device→host copies of a scalar
SYNC_OP = "_local_scalar_dense"  # the aten op of one (``.item()``, a tensor's bool)
NO_KERNEL = {"detach", "alias", "_unsafe_view", "lift_fresh", "empty", "empty_strided", "empty_like", "set_",
             "resize_", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "is_same_size", "record_stream",
             "detach_", "_record_function_enter_new", "_record_function_exit"}  # metadata, allocation, annotation


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _attention_flops(q: torch.Tensor, k: torch.Tensor) -> float:
    """Two matmuls, QKᵀ and PV: 4·B·H·Tq·Tk·D (the fused CPU kernel, which torch's registry lacks)."""
    *batch, tq, d = q.shape
    return 4.0 * math.prod(batch) * tq * k.shape[-2] * d


def _conv_backward_flops(grad_out: torch.Tensor, weight: torch.Tensor, mask: list[bool]) -> float:
    """Input and weight gradients, each the forward's 2·|out|·|w|/C_out (groups included: torch's
    registry counts a grouped convolution's backward as dense)."""
    forward = 2.0 * grad_out.numel() * math.prod(weight.shape[1:])
    return forward * (int(mask[0]) + int(mask[1]))


def op_flops(func, args: tuple, kwargs: dict, out) -> float:
    """FLOPs of one aten op: torch's registry (matmuls, convolutions, fused attention), with the
    fused CPU attention and the grouped-convolution backward counted here."""
    name = func.__name__.split(".")[0]
    if name == "_scaled_dot_product_flash_attention_for_cpu":
        return _attention_flops(args[0], args[1])
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward":
        return 2.0 * _attention_flops(args[1], args[2])  # grad_out, query, key, ...
    if name == "convolution_backward":
        return _conv_backward_flops(args[0], args[2], args[-1])
    count = flop_registry.get(func.overloadpacket)
    return float(count(*args, **kwargs, out_val=out)) if count is not None else 0.0


def _bytes(values) -> tuple[int, int]:
    """(all bytes, the fp32 ones) of the distinct tensors in ``values``."""
    seen, total, fp32 = set(), 0, 0
    for t in tree_leaves(values):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            n = t.numel() * t.element_size()
            total += n
            fp32 += n if t.dtype == torch.float32 else 0
    return total, fp32


@dataclass
class OpGroup:
    """The calls of one op in one phase: how many kernels, their FLOPs and bytes, and the
    predicted time per bound (filled by :meth:`Roofline.predict`)."""

    phase: str
    op: str
    calls: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    per_call: list[tuple[float, float, float]] = field(default_factory=list)  # (flops, bytes, fp32 bytes) per call


class OpCounter(TorchDispatchMode):
    """Records every op dispatched while active; ``phase(name)`` labels what runs inside it (the
    interface of :class:`~.timers.StepTimer`, so the engine and the model label their own phases)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = "other"
        self.groups: dict[tuple[str, str], OpGroup] = {}
        self.syncs = 0
        self.host_ops: dict[str, int] = defaultdict(int)  # every op the host dispatches, views included

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer, self.current = self.current, name
        try:
            yield
        finally:
            self.current = outer

    def end_step(self) -> None:
        pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        self.host_ops[self.current] += 1
        if name == SYNC_OP:
            self.syncs += 1
            self._add(SYNC, 0.0, 0, 0)
        elif not (func.is_view or name in NO_KERNEL or func.namespace in ("c10d", "_c10d_functional")):
            (read, read32), (written, written32) = _bytes((args, kwargs)), _bytes(out)
            self._add(name, op_flops(func, args, kwargs, out), read + written, read32 + written32)
        return out

    def _add(self, op: str, flops: float, nbytes: int, fp32_bytes: int) -> None:
        group = self.groups.setdefault((self.current, op), OpGroup(self.current, op))
        group.calls += 1
        group.flops += flops
        group.bytes += nbytes
        group.per_call.append((flops, float(nbytes), float(fp32_bytes)))


@dataclass(frozen=True)
class Prediction:
    """Predicted time of an op group or a phase on a device, split by what bounds each kernel."""

    kernels: int
    flops: float
    bytes: float
    compute_s: float  # kernels whose FLOPs bound them
    memory_s: float
    launch_s: float  # kernels too small for either: the launch is their time

    @property
    def time_s(self) -> float:
        return self.compute_s + self.memory_s + self.launch_s

    def mfu(self, device: Device) -> float:
        """The MFU this part could reach at best: its FLOPs over its predicted time at peak."""
        return self.flops / (self.time_s * device.peak_flops) if self.time_s else 0.0

    @property
    def bound(self) -> str:
        parts = {"compute": self.compute_s, "memory": self.memory_s, "launch": self.launch_s}
        return max(parts, key=parts.get)

    def __add__(self, other: "Prediction") -> "Prediction":
        return Prediction(*(a + b for a, b in zip(self._fields(), other._fields())))

    def extrapolate(self, deeper: "Prediction", steps: float) -> "Prediction":
        """This part at depth d, ``deeper`` at d + 1 block: the part at d + ``steps`` (every cost
        of the step is affine in the depth: per-block work, parameters, optimizer and EMA state)."""
        return Prediction(*(a + steps * (b - a) for a, b in zip(self._fields(), deeper._fields())))

    def _fields(self) -> tuple:
        return (self.kernels, self.flops, self.bytes, self.compute_s, self.memory_s, self.launch_s)


ZERO = Prediction(0, 0.0, 0.0, 0.0, 0.0, 0.0)


def predict(group: OpGroup, device: Device, fp32_scale: float = 1.0) -> Prediction:
    """Each kernel: max(FLOPs / peak, bytes / bandwidth) + launch; its time goes to its bound.
    ``fp32_scale``: what an fp32 byte of a CPU run counts for (0.5: the GPU run holds it in bf16)."""
    if group.op == SYNC:
        return Prediction(0, 0.0, 0.0, 0.0, 0.0, group.calls * device.launch_s)
    compute = memory = launch = total_bytes = 0.0
    for flops, nbytes, fp32 in group.per_call:
        nbytes -= fp32 * (1.0 - fp32_scale)
        total_bytes += nbytes
        c, m = flops / device.peak_flops, nbytes / device.bandwidth
        launch += device.launch_s
        if c >= m and c > device.launch_s:
            compute += c
        elif m > device.launch_s:
            memory += m
        else:
            launch += max(c, m)
    return Prediction(group.calls, group.flops, total_bytes, compute, memory, launch)


def by_phase(counter: OpCounter, device: Device) -> dict[str, Prediction]:
    """Phase → the sum of its op groups' predictions (bytes as the run held them)."""
    out: dict[str, Prediction] = defaultdict(lambda: ZERO)
    for group in counter.groups.values():
        out[group.phase] = out[group.phase] + predict(group, device)
    return dict(out)


FP32_PHASES = ("optimizer", "ema")  # fp32 masters and AdamW moments stay fp32 in a bf16 run


def bf16_scale(phase: str) -> float:
    """How an fp32 byte of an fp32 CPU run counts when predicting the bf16 GPU run: activations,
    weights and gradients are bf16 (half); the optimizer's and the teacher's fp32 state is not."""
    return 1.0 if phase in FP32_PHASES else 0.5
