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
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.blocks import Block


def apply_compile(model: nn.Module) -> int:
    """Compile every :class:`~d2v2scale.model.blocks.Block`, the decoder and the
    ``TENSOR_MATH`` methods of ``model`` (student or teacher copy) in place; returns how many
    modules and methods were compiled."""
    targets = [m for m in model.modules() if isinstance(m, Block)]
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        targets.append(decoder)
    for module in targets:
        module.compile()
    methods = getattr(model, "TENSOR_MATH", ())
    for name in methods:
        setattr(model, name, torch.compile(getattr(model, name)))
    return len(targets) + len(methods)
