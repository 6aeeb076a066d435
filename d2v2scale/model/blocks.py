"""Post-LN Transformer blocks of data2vec 2.0 (fairseq ``AltBlock``), on torch SDPA.

Each block returns its output *and* its raw FFN output, which is what the teacher's targets are
built from. Parameter names match fairseq (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``,
``norm1``, ``norm2``) so checkpoint interop is a rename of prefixes only.

The head count is read from the qkv projection's width at run time, so tensor parallelism can
swap ``qkv``/``proj`` for sharded linears and the same code runs on the local heads.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    # Dropout on sharded heads needs a per-TP-rank RNG stream; tensor parallelism swaps this in.
    region_rng = nullcontext

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_bias``: additive float bias broadcastable to (B, heads, T, T); -inf hides a key."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        drop = self.attn_drop if self.training else 0.0
        with self.region_rng():
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, t, -1)))


class Mlp(nn.Module):
    """timm's Mlp as fairseq uses it: fc1 → GELU → dropout → fc2 → dropout."""

    region_rng = nullcontext  # see Attention.region_rng

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        with self.region_rng():
            h = self.drop1(h)
        return self.drop2(self.fc2(h))


def _no_contexts() -> tuple[nullcontext, nullcontext]:
    return nullcontext(), nullcontext()


class Block(nn.Module):
    """Post-LN block: ``r = LN1(x + attn(x)); t = MLP(r); out = LN2(r + drop(t))``; returns (out, t)."""

    # (forward, recompute) context managers for activation checkpointing; tensor parallelism swaps
    # in ones that replay its dropout RNG stream during the recompute.
    checkpoint_contexts = staticmethod(_no_contexts)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        encoder_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        post_mlp_dropout: float = 0.0,
    ):
        super().__init__()
        self.attn = Attention(dim, num_heads, attention_dropout, encoder_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation_dropout)
        self.post_mlp_dropout = nn.Dropout(post_mlp_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.norm1(x + self.attn(x, attn_bias))
        t = self.mlp(r)
        return self.norm2(r + self.post_mlp_dropout(t)), t


def run_block(block: Block, x: torch.Tensor, attn_bias: torch.Tensor | None, checkpointed: bool):
    """``block(x, attn_bias)``, keeping only its input for backward when ``checkpointed`` (the
    forward is recomputed then); under no_grad (the teacher) there is nothing to save anyway."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, attn_bias, use_reentrant=False, context_fn=block.checkpoint_contexts)
    return block(x, attn_bias)


def checkpointed(index: int, every: int) -> bool:
    """Whether block ``index`` is checkpointed under ``model.activation_checkpointing=every``
    (0: none, 1: every block, k: blocks 0, k, 2k, ...)."""
    return every > 0 and index % every == 0


def checkpointed_count(cfg, every: int) -> int:
    """How many of the prenet and shared blocks :func:`checkpointed` selects (each stack counts from 0)."""
    return sum(checkpointed(i, every) for n in (cfg.prenet_depth, cfg.depth) for i in range(n))


class BlockEncoder(nn.Module):
    """The modality "prenet" (fairseq ``BlockEncoder``, post-LN): input LayerNorm, dropout, blocks."""

    def __init__(self, blocks: nn.ModuleList, norm: nn.Module | None, dropout: float, checkpoint_every: int = 0):
        super().__init__()
        self.blocks = blocks
        self.norm = norm
        self.dropout = nn.Dropout(dropout)
        self.checkpoint_every = checkpoint_every

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        x = self.dropout(x)
        for i, blk in enumerate(self.blocks):
            x, _ = run_block(blk, x, attn_bias, checkpointed(i, self.checkpoint_every))
        return x


def make_blocks(cfg, count: int) -> nn.ModuleList:
    """``count`` blocks configured from a :class:`~d2v2scale.config.ModelConfig`."""
    return nn.ModuleList(
        Block(
            cfg.embed_dim,
            cfg.num_heads,
            cfg.mlp_ratio,
            cfg.norm_eps,
            cfg.encoder_dropout,
            cfg.attention_dropout,
            cfg.activation_dropout,
            cfg.post_mlp_dropout,
        )
        for _ in range(count)
    )
