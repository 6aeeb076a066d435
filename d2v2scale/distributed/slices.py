"""Which elements of a flat tensor a rank holds: the one slicing rule the sharded state shares.

FSDP2 (dim 0, ``torch.chunk``'s rule), DeepSpeed's ZeRO-3 partitions, the stage-0 checkpoint slices
and the EMA teacher's flat groups all cut ``n`` elements into consecutive pieces of a fixed size,
the last ones shorter or empty. Layout-free checkpoints store ``[start, stop)`` ranges of each
tensor, so every writer must agree on where a rank's piece begins.
"""
from __future__ import annotations


def ceil_div(n: int, parts: int) -> int:
    return -(-n // parts)


def piece(n: int, size: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of piece ``index`` when ``n`` elements are cut into pieces of ``size``."""
    start = min(index * size, n)
    return start, min(start + size, n)


def even_piece(n: int, parts: int, index: int) -> tuple[int, int]:
    """Piece ``index`` of ``n`` elements cut into ``parts`` pieces of ``ceil(n / parts)`` (``torch.chunk``)."""
    return piece(n, ceil_div(n, parts), index)


def padded_numel(n: int, parts: int) -> int:
    """``n`` rounded up to a multiple of ``parts`` (at least ``parts``): a flat group every rank holds
    an equal piece of."""
    return ceil_div(max(n, 1), parts) * parts
