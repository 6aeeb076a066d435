"""A test helper that records every operation that would make the host wait for a GPU, with the
Python call site of each, on the thread it is entered on.

Two layers, because neither sees everything:

- a ``TorchDispatchMode`` sees the aten ops: ``_local_scalar_dense`` (``item``, ``bool(t)``,
  ``int(t)``, ``float(t)``, a device number passed where an op takes a host one), the ops whose
  output size depends on the values (``nonzero``, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``, indexing and ``index_put`` with a boolean index,
  ``bincount``), the ones that answer on the host (``equal``, ``is_nonzero``, ``allclose``), and
  blocking copies from a device tensor to a host one (``_to_copy``, ``copy_``);
- a ``TorchFunctionMode`` sees what never reaches the dispatcher when the device *is* the host:
  ``Tensor.cpu`` and blocking ``.to`` towards the host, ``tolist``, ``numpy``, and a tensor made on the device
  from host data (``torch.tensor(x, device=d)``, ``torch.as_tensor(x, device=d)``: a blocking
  host-to-device copy, which torch's ``set_sync_debug_mode`` reports as a sync: pytorch/pytorch
  issues 120996 and 190217; ``torch.full((), x, device=d)`` is not one).

On a CPU-only machine the step's device is the host, so a transfer cannot be told from a no-op by
where the data lands: ``device`` (the step's device) stands in for the GPU, and a request to move
data between it and the host is what is recorded, whether or not it copies here. Ops that run
*inside* another op (a CPU kernel reading its own scalar argument) are not seen: a mode is off
while its handler runs, as a GPU kernel would not read back either.
"""
from __future__ import annotations

import threading
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops that read a device value on the host or size their output by one (every overload).
SYNC_OPS = {getattr(aten, name) for name in ("_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero",
                                              "allclose", "_unique", "_unique2", "unique_consecutive", "unique_dim",
                                              "unique_dim_consecutive", "bincount") if hasattr(aten, name)}
BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
HOST_READS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}
FROM_HOST_DATA = {torch.tensor: "tensor", torch.as_tensor: "as_tensor", torch.asarray: "asarray"}
# Frames that only carry a call to the modes: left out of every stack.
_PLUMBING = (str(Path(__file__).resolve()), "torch/utils/_python_dispatch.py", "torch/overrides.py", "torch/_ops.py",
             "torch/_dynamo/eval_frame.py", "torch/_compile.py", "torch/_jit_internal.py", "/warnings.py")
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"


@dataclass
class Sync:
    op: str  # e.g. "aten.nonzero.default", "Tensor.to(cpu)", "torch.tensor(host data, device=cpu)"
    stack: list[str]  # "path:line in function: source", outermost first, the modes' own plumbing left out
    tag: object = None  # what the caller was doing (a step number), from Detector.tag

    @property
    def site(self) -> str:
        """The innermost frame: where the sync is made."""
        return self.stack[-1] if self.stack else "?"

    def describe(self, frames: int = 8) -> str:
        return f"{self.op} at {self.site}\n" + "".join(f"      {f}\n" for f in self.stack[-frames:])


def _call_stack() -> list[str]:
    frames = []
    for f in traceback.extract_stack()[:-2]:
        if f.filename.endswith(_PLUMBING):
            continue
        frames.append(f"{_short(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}")
    return frames


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    if path.startswith(_ROOT):
        return path[len(_ROOT):]
    parts = Path(path).parts
    return str(Path(*parts[-3:])) if len(parts) > 3 else path


def _is_bool(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "Detector"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            self.owner.record(str(func))
        elif packet in BOOL_INDEXED and any(_is_bool(i) for i in (args[1] if len(args) > 1 else ()) or ()):
            self.owner.record(f"{func} with a boolean index")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.owner.record(f"{func} without output_size")
        elif (packet is aten._to_copy and _host(kwargs.get("device")) and not _host(args[0].device)
              and not kwargs.get("non_blocking")):
            self.owner.record(f"{func} to the host")
        elif (packet is aten.copy_ and _host(args[0].device) and not _host(args[1].device)
              and not (args[2] if len(args) > 2 else kwargs.get("non_blocking"))):
            self.owner.record(f"{func} to the host")
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, owner: "Detector"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        if func in HOST_READS and owner.on_device(args[0]):
            owner.record(f"Tensor.{HOST_READS[func]}")
        elif func is torch.Tensor.to and owner.on_device(args[0]):
            target, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if _host(target) and not non_blocking:  # a non-blocking copy waits for nothing (its reader will)
                owner.record(f"Tensor.to({target})")
        elif func in FROM_HOST_DATA and not isinstance(args[0] if args else kwargs.get("data"), torch.Tensor):
            device = kwargs.get("device")
            if device is not None and owner.is_device(torch.device(device)):
                owner.record(f"torch.{FROM_HOST_DATA[func]}(host data, device={device})")
        return func(*args, **kwargs)


def _host(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


class CudaSyncWarnings:
    """The GPU's own view: ``torch.cuda.set_sync_debug_mode("warn")`` while entered, and each
    "called a synchronizing CUDA operation" warning kept as a :class:`Sync` (op ``cuda sync``, the
    thread's name when not the entering one) with the Python stack that raised it, stamped with
    ``tag`` (None: not kept). "warn" rather than "error": an error stops at the first sync, inside
    whatever DeepSpeed or FSDP2 was doing; warnings list them all, and a test fails on them just
    the same. A backward's syncs are warned in the thread that called it once it ends (the autograd
    engine replays its workers' warnings), so their stack ends at the ``backward`` call.
    ``debug_mode=False`` only listens (to check the listening without a GPU)."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self, debug_mode: bool = True):
        self.debug_mode = debug_mode
        self.syncs: list[Sync] = []
        self.tag: object = 0
        self._thread = threading.current_thread()

    def _seen(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self.MESSAGE not in str(message):
            self._show(message, category, filename, lineno, file, line)
        elif self.tag is not None:
            thread = threading.current_thread()
            op = "cuda sync" if thread is self._thread else f"cuda sync (thread {thread.name})"
            self.syncs.append(Sync(op, _call_stack(), self.tag))

    def __enter__(self) -> "CudaSyncWarnings":
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("always", message=self.MESSAGE)
        self._show, warnings.showwarning = warnings.showwarning, self._seen
        if self.debug_mode:
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.debug_mode:
            torch.cuda.set_sync_debug_mode(self._mode)
        self._catch.__exit__(*exc)


class Detector:
    """``with Detector(device) as d:`` records in ``d.syncs`` every operation on this thread that would
    make the host wait for ``device`` (the step's device; the host itself on a CPU-only machine,
    where it stands in for a GPU). ``d.tag`` is stamped on each record (e.g. the step in progress);
    records are kept only while it is not None."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.syncs: list[Sync] = []
        self.tag: object = 0
        self._thread = threading.current_thread()
        self._modes = (_Function(self), _Dispatch(self))

    def is_device(self, device: torch.device) -> bool:
        return device.type == self.device.type

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self.is_device(t.device)

    def record(self, op: str) -> None:
        if self.tag is not None and threading.current_thread() is self._thread:
            self.syncs.append(Sync(op, _call_stack(), self.tag))

    def __enter__(self) -> "Detector":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self, syncs: list[Sync] | None = None) -> str:
        syncs = self.syncs if syncs is None else syncs
        return "\n".join(f"[{s.tag}] {s.describe()}" for s in syncs)


class StepTags:
    """The training loop's profiler hooks (``train(..., profiler=)``), used only to stamp a
    :class:`Detector`'s or :class:`CudaSyncWarnings`' records with the step in progress."""

    def __init__(self, device: torch.device, recorder: "Detector | CudaSyncWarnings"):
        from d2v2scale.profiling.timers import StepTimer

        self.timer, self.shape, self.recorder = StepTimer(device, enabled=False), None, recorder

    def start(self) -> None:
        pass

    def step_begin(self, step: int) -> None:
        self.recorder.tag = step + 1

    def step_end(self, step: int) -> None:
        pass

    def finish(self, tr) -> None:
        self.recorder.tag = None


@dataclass(frozen=True)
class Known:
    """A sync a test accepts, and why: matched on the innermost frame of its stack (the file's path
    ends with ``path``, the function is ``function``, its source line contains ``code``) and on
    the start of its op ("" matches any: the GPU's sync warnings do not name one)."""

    path: str
    function: str
    code: str
    why: str
    op: str = ""

    def matches(self, sync: Sync) -> bool:
        where, _, rest = sync.site.partition(" in ")
        function, _, code = rest.partition(": ")
        return (sync.op.startswith(self.op) and where.rsplit(":", 1)[0].endswith(self.path)
                and function == self.function and self.code in code)
