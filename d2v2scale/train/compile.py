"""Regional ``torch.compile``: every Transformer block and the decoder, compiled one by one.

Compiling the repeated block instead of the whole model keeps compile time to one graph per
distinct shape (the student's kept tokens, the teacher's full sequence) and leaves the parts
that change shape or talk to other ranks — masking, the token gather, the loss, the backend's
hooks — eager (torchtitan's ``apply_compile``). It is applied after tensor parallelism and the
teacher copy and before the backend wraps the model, in place (``nn.Module.compile``), so
parameter names, checkpoints and FSDP2's per-block units are unchanged; activation checkpointing
wraps the compiled block. Shapes that vary (audio lengths) are compiled dynamic after the first
change instead of once per length.
"""
from __future__ import annotations

from torch import nn

from ..model.blocks import Block


def apply_compile(model: nn.Module) -> int:
    """Compile every :class:`~d2v2scale.model.blocks.Block` and the decoder of ``model`` (student or
    teacher copy) in place; returns how many modules were compiled."""
    targets = [m for m in model.modules() if isinstance(m, Block)]
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        targets.append(decoder)
    for module in targets:
        module.compile()
    return len(targets)
