"""The one slicing rule of sharded state, against ``torch.chunk`` (what FSDP2 cuts dim 0 with)."""
import torch

from d2v2scale.distributed.slices import even_piece, padded_numel, piece


def test_even_pieces_are_torch_chunks_and_tile_the_tensor():
    for n in (0, 1, 5, 7, 8, 64, 1001):
        for parts in (1, 2, 3, 4, 8, 64):
            x = torch.arange(n)
            chunks = list(torch.chunk(x, parts)) if n else []
            pieces = [even_piece(n, parts, i) for i in range(parts)]
            assert [x[a:b].tolist() for a, b in pieces if b > a] == [c.tolist() for c in chunks]
            assert pieces[0][0] == 0 and pieces[-1][1] == n  # consecutive, nothing lost
            assert all(a == b_prev for (_, b_prev), (a, _) in zip(pieces, pieces[1:]))


def test_fixed_size_pieces_and_padding():
    assert [piece(10, 4, i) for i in range(4)] == [(0, 4), (4, 8), (8, 10), (10, 10)]  # ZeRO-3: partition_numel 4
    assert [padded_numel(n, 4) for n in (0, 1, 4, 5)] == [4, 4, 4, 8]
