"""Regional ``torch.compile``: every Transformer block, the decoder and the model's tensor math,
compiled one by one.

Compiling the repeated block instead of the whole model keeps compile time to one graph per
distinct shape (the student's kept tokens, the teacher's full sequence) and leaves the parts that
change shape or talk to other ranks — masking, the token gather, the backend's hooks — eager
(torchtitan's ``apply_compile``). The model's parameter-free tensor math (target construction,
losses, diagnostics: ``Data2Vec2.TENSOR_MATH``) is compiled too: long chains of small
element-wise ops and reductions are what fusion removes. It is applied after tensor parallelism
and the teacher copy and before the backend wraps the model, in place (``nn.Module.compile``, an
instance attribute for a method), so parameter names, checkpoints and FSDP2's per-block units are
unchanged; activation checkpointing wraps the compiled block. Shapes that vary (audio lengths)
are compiled dynamic after the first change instead of once per length.

With ``model.cuda_graphs`` the regions compile in ``mode="reduce-overhead"``: inductor records each
region's kernels once as a CUDA graph and replays it, so the host pays one call per region instead
of one launch per kernel (CUDA graph trees: the teacher's, the student's forward and backward
regions of a micro-batch form one tree, begun anew each micro-batch by the engine). Only fixed
shapes pay (a graph per shape), so the config allows it for fixed-shape batches only; on the CPU
the mode compiles the same regions without graphs.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.blocks import Block


def apply_compile(model: nn.Module, cuda_graphs: bool = False) -> int:
    """Compile every :class:`~d2v2scale.model.blocks.Block`, the decoder and the
    ``TENSOR_MATH`` methods of ``model`` (student or teacher copy) in place, replayed as CUDA
    graphs with ``cuda_graphs``; returns how many modules and methods were compiled."""
    mode = "reduce-overhead" if cuda_graphs else None
    targets = [m for m in model.modules() if isinstance(m, Block)]
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        targets.append(decoder)
    for module in targets:
        module.compile(mode=mode)
    methods = getattr(model, "TENSOR_MATH", ())
    for name in methods:
        setattr(model, name, torch.compile(getattr(model, name), mode=mode))
    return len(targets) + len(methods)
