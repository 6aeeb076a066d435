"""The data2vec 2.0 model's tensor-parallel plan, applied to a built model from outside it.

qkv and fc1 are sharded column-wise, proj and fc2 row-wise in every block (two all-reduces
forward, two backward per block), and the ALiBi per-head scale by head. The layers and mappings
come from :mod:`d2v2scale.distributed.tensor_parallel`; this file only chooses them, as
torchtitan keeps a model's ``parallelize`` beside the model.
"""
from __future__ import annotations

from torch import nn

from ..distributed.dims import ParallelDims
from ..distributed.tensor_parallel import TPRegionRNG, column_from, row_from, tag_tp
from .blocks import Attention, Block, Mlp


def _parallelize_block(block: Block, dims: ParallelDims, rng: TPRegionRNG) -> None:
    attn: Attention = block.attn
    heads = attn.qkv.out_features // (3 * attn.head_dim)
    if heads % dims.tp:
        raise ValueError(f"parallel.tp={dims.tp} must divide the attention heads ({heads})")
    block.checkpoint_contexts = rng.checkpoint_contexts
    attn.qkv = column_from(attn.qkv, dims, groups=3)
    attn.proj = row_from(attn.proj, dims)
    attn.region_rng = rng.fork
    mlp: Mlp = block.mlp
    mlp.fc1 = column_from(mlp.fc1, dims)
    mlp.fc2 = row_from(mlp.fc2, dims)
    mlp.region_rng = rng.fork


def parallelize(model: nn.Module, dims: ParallelDims, rng: TPRegionRNG | None = None) -> nn.Module:
    """Shard every Transformer block of ``model`` (student or teacher copy alike) over ``dims.tp_group``."""
    if dims.tp == 1:
        return model
    rng = rng or TPRegionRNG(0, next(model.parameters()).device)
    for module in list(model.modules()):
        if isinstance(module, Block):
            _parallelize_block(module, dims, rng)
    encoder = getattr(model, "encoder", None)
    if getattr(encoder, "alibi_scale", None) is not None:
        heads = encoder.alibi_scale.shape[2]
        share = heads // dims.tp
        lo = dims.tp_rank * share
        encoder.alibi_scale = tag_tp(nn.Parameter(encoder.alibi_scale.detach()[:, :, lo : lo + share].clone()), 2)
        encoder.slopes = encoder.slopes[lo : lo + share].clone()
    return model
