"""Kernels per phase from a ``torch.profiler`` trace: the count that also sees compiled code.

A dispatch mode (:class:`.roofline.OpCounter`) sees every aten op the host dispatches, but under
one TorchDynamo runs compiled regions eagerly, so it cannot count what inductor leaves as separate
kernels. A CPU profiler trace can: with ``torch._inductor.config.cpp.enable_kernel_profile`` each
generated kernel is a ``graph_<n>_cpp_fused_*`` range, and the ops compiled code still calls
(matmuls, attention, convolutions) are aten ranges like eager ones. An aten range is a kernel when
its op does work (not a view, not metadata, not a composite that only calls other ops, not a
scalar-only overload) and no enclosing range already is one (a CPU kernel that calls aten
internally, as addmm calls copy_, is one kernel, as it is on a GPU). Phases come from
:class:`PhaseMarks`, ranges the engine and the model open through their timer interface. On an
eager step the two counts agree phase by phase (``tests/test_roofline.py``).

CPU inductor's fusion is the count, which is close to, not equal to, what Triton would launch on
a GPU (the same scheduler decides what fuses; the code generators split some reductions differently).

The same trace says what the host still does in a compiled step (:func:`host_work`): the aten ops
it dispatches outside the compiled regions (the optimizer, the backend's hooks, the autograd
engine's eager nodes, masking and gathers) and the calls of compiled regions - the host's work
once CUDA graphs replay the regions' kernels.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import torch

from .roofline import NO_KERNEL, SYNC_OP
from .timers import PHASES

MARK = "d2v2scale.phase:"
FUSED = "inductor fused"  # the op group of every kernel inductor generated


def kernel_ranges():
    """While active, inductor's CPU code marks each generated kernel as a profiler range (compile inside it)."""
    return torch._inductor.config.patch({"cpp.enable_kernel_profile": True})


LOADER = PHASES[0]  # "data": host-side work of the loader, not of the step's dispatching
REGION = "Torch-Compiled Region"  # a compiled forward region's call (guards, then its graph)
REGION_BACKWARD = "CompiledFunctionBackward"  # a compiled region's backward graph, called by autograd


@dataclass(frozen=True)
class HostWork:
    """What the host does in one step of compiled code: eager ops, region calls, launches from regions."""

    eager_ops: int  # aten ops called outside compiled regions and any other aten op, not by the loader
    region_calls: int  # compiled regions entered, forward and backward
    region_kernels: int  # kernels launched from inside compiled regions


def step_kernels(run_step) -> tuple[Counter, HostWork]:
    """(phase, op) → kernels of ``run_step(marks)``, which runs one step timing its phases with
    ``marks``; and the host's work in it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_step(PhaseMarks())
    events = prof.events()
    return traced_kernels(events), host_work(events)


def _is_region(name: str) -> bool:
    return name.startswith(REGION) or name == REGION_BACKWARD


def _any_parent(event, test) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if test(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def host_work(events: Iterable) -> HostWork:
    """Counts of a CPU profiler's ``events()``: see :class:`HostWork`. On an eager step
    ``eager_ops`` is every op the step's code calls (composites once, not their parts), less the
    loader's: a GPU run makes its batches and masks in the read-ahead thread, off the step's path."""
    eager = calls = kernels = 0
    for event in events:
        if _is_region(event.name):
            calls += 1
        elif _any_parent(event, _is_region):
            kernels += _is_fused(event.name) or (launches_kernel(event.name) and not _inside_a_kernel(event))
        elif (event.name.startswith("aten::") and not _any_parent(event, lambda name: name.startswith("aten::"))
              and _phase(event) != LOADER):
            eager += 1
    return HostWork(eager, calls, kernels)


class PhaseMarks:
    """The timer interface (``phase``/``end_step``, as :class:`.timers.StepTimer`) as profiler ranges."""

    def phase(self, name: str):
        return torch.profiler.record_function(MARK + name)

    def end_step(self) -> None:
        pass


def _composite(overload) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(overload.name(), "CompositeImplicitAutograd")
    except RuntimeError:  # a Python-only overload (aten::__and__.bool): nothing the dispatcher runs
        return True


@lru_cache(maxsize=None)
def launches_kernel(event_name: str) -> bool:
    """Whether an aten range of this name does work itself. The trace does not name the overload,
    so an op counts as composite only when every tensor overload of it is (``linear``, ``to``)."""
    if not event_name.startswith("aten::"):
        return False
    op = event_name[len("aten::"):]
    packet = getattr(torch.ops.aten, op, None)
    if op in NO_KERNEL or op == SYNC_OP or packet is None:
        return False
    overloads = [getattr(packet, n) for n in packet.overloads() if "out" not in n]
    tensor_ops = [o for o in overloads if "Tensor" in str(o._schema).partition("(")[2]]
    return bool(tensor_ops) and not all(_composite(o) for o in tensor_ops) and not any(o.is_view for o in tensor_ops)


def _is_fused(name: str) -> bool:
    return "cpp_fused_" in name or name.startswith("triton_")


def _phase(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(MARK):
            return parent.name[len(MARK):]
        parent = parent.cpu_parent
    return "other"


def _inside_a_kernel(event) -> bool:
    return _any_parent(event, lambda name: launches_kernel(name) or _is_fused(name))


def traced_kernels(events: Iterable) -> Counter:
    """(phase, op) → kernels, from a CPU profiler's ``events()``."""
    counts: Counter = Counter()
    for event in events:
        if _is_fused(event.name):
            op = FUSED
        elif launches_kernel(event.name) and not _inside_a_kernel(event):
            op = event.name[len("aten::"):]
        else:
            continue
        counts[(_phase(event), op)] += 1
    return counts
