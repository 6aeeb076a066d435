"""Per-GPU memory of a training layout: model states per ZeRO stage, the sharded teacher,
activations (with and without activation checkpointing), DeepSpeed's reduction bucket.

In bytes, for Ψ student parameters held by this TP rank (sharded block matrices / tp +
replicated rest) and Ψ_T teacher-tracked ones:

- model states, mixed precision with Adam: weights 2Ψ, gradients 2Ψ (ZeRO-2/3: /dp), fp32
  master + two moments 12Ψ (ZeRO-1/2/3: /dp); fp32 training: 4Ψ + 4Ψ + 8Ψ (+ a 4Ψ/dp fp32 copy
  at ZeRO-1/2/3: DeepSpeed's optimizer keeps its own fp32 partition);
- teacher: fp32 EMA masters 4Ψ_T/dp (sharded) + compute copy 2Ψ_T (bf16); with
  ``parallel.backend=fsdp2`` the masters (4Ψ_T/dp) + two gathered units (one block and the
  prefetched next), see :func:`_fsdp2_state_bytes`;
- activations of one micro-batch (B items × M clones): per student block
  ``t·r·h·(10 + 24/tp)`` bytes (Korthikanti et al. with memory-efficient attention; ``r`` = B·M
  rows of ``t`` kept tokens), or only the block inputs ``2·t·r·h`` for blocks under activation
  checkpointing (``model.activation_checkpointing``) plus one block's recompute;
  plus the decoder, the loss tensors (fp32 targets and predictions of all B·M·T positions), the
  teacher's K stored layer outputs and, for audio, the CNN and the full-length conv positions;
- DeepSpeed's gradient-reduction bucket (``reduce_bucket_size``, default 5e8 elements).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

from .. import modality_registry
from ..config import BACKENDS, HOW_THE_MODEL_RUNS, Config
from ..model.blocks import Block, checkpointed_count
from .comm import ParamCounts

GPU_MEMORY_GB = {"a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80, "h200": 141, "v100-32gb": 32}


@dataclass
class Layout:
    tp: int
    dp: int
    zero: int
    bf16: bool
    micro_items: int  # samples (images, text blocks, audio crops) per micro-batch per rank
    positions: int  # T per item (patches / frames / tokens)
    input_len: int  # audio samples per item (0 otherwise)
    backend: str = BACKENDS[0]  # parallel.backend

    @property
    def reduce_bucket(self) -> bool:
        """DeepSpeed's ZeRO-1/2 gradient-reduction bucket is allocated (FSDP2 reduces per block)."""
        return self.backend == BACKENDS[0] and self.zero in (1, 2)


def param_counts(cfg: Config, tp: int) -> ParamCounts:
    """Element counts one TP rank holds (block matrices / tp, the rest replicated), from a meta model."""
    model = {k: v for k, v in cfg.model.flat().items() if k not in HOW_THE_MODEL_RUNS}
    key = json.dumps([model, dataclasses.asdict(cfg.decoder), dataclasses.asdict(cfg.teacher)])
    return _param_counts(key, tp)


@functools.lru_cache(maxsize=64)
def _param_counts(key: str, tp: int) -> ParamCounts:
    import torch

    from ..config import config_from_dict

    model_cfg, decoder_cfg, teacher_cfg = json.loads(key)
    cfg = config_from_dict({"model": model_cfg, "decoder": decoder_cfg, "teacher": teacher_cfg})

    from ..model import Data2Vec2

    with torch.device("meta"):
        model = Data2Vec2(cfg.model_spec())
        teacher = model.teacher_copy()
    sharded_suffixes = ("attn.qkv.weight", "attn.qkv.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                        "attn.proj.weight", "mlp.fc2.weight")

    def local(name: str, p) -> int:
        return p.numel() // tp if name.endswith(sharded_suffixes) else p.numel()

    def total(module) -> int:
        return sum(local(n, p) for n, p in module.named_parameters()) if module is not None else 0

    def blocks(module) -> list[int]:
        return [total(b) for b in module.modules() if isinstance(b, Block)] if module is not None else []

    sizes = tuple(local(n, p) for n, p in model.named_parameters())
    trainable = sum(local(n, p) for n, p in model.named_parameters() if p.requires_grad)
    tracked = sum(local(n, p) for n, p in teacher.named_parameters() if p.requires_grad)
    encoder = getattr(teacher, "encoder", None)
    return ParamCounts(trainable, sum(sizes), tracked, sizes, sum(blocks(model)), max(blocks(model), default=0),
                       total(teacher), total(encoder) - sum(blocks(encoder)))


def model_state_bytes(params: ParamCounts, lay: Layout) -> dict[str, float]:
    if lay.backend != BACKENDS[0]:
        return _fsdp2_state_bytes(params, lay)
    psi, psi_t, d = params.total, params.teacher, lay.dp
    if lay.bf16:
        weights, grads, optim = 2 * psi, 2 * psi, 12 * psi
        if lay.zero >= 2:
            grads /= d
        if lay.zero >= 1:
            optim /= d
        if lay.zero == 3:
            weights /= d
        teacher_compute = 2 * psi_t
    else:
        weights, grads, optim = 4 * psi, 4 * psi, 8 * psi
        if lay.zero >= 2:
            grads /= d
        if lay.zero >= 1:
            optim = optim / d + 4 * psi / d  # ZeRO keeps its own fp32 partition even for fp32 weights
        if lay.zero == 3:
            weights /= d
        teacher_compute = 4 * psi_t
    return {"weights": weights, "gradients": grads, "optimizer_states": optim,
            "teacher_fp32_masters": 4 * psi_t / d, "teacher_compute_copy": teacher_compute}


def _fsdp2_state_bytes(params: ParamCounts, lay: Layout) -> dict[str, float]:
    """FSDP2 keeps fp32 weight, gradient and AdamW shards (1/dp) at every stage; compute-dtype weights
    are gathered per unit: all of them from forward to backward (stage 0-2), or the root plus the
    running and the prefetched block (stage 3). The teacher's own shards are its masters; its
    forward holds one gathered unit (and the prefetched next) at a time."""
    d, a = lay.dp, 2 if lay.bf16 else 4
    live = params.total if lay.zero < 3 else params.total - params.blocks + 2 * params.block
    teacher_unit = max(params.block, params.teacher_encoder)
    return {"weights": 4 * params.total / d + a * live,
            "gradients": 4 * params.trainable / d + a * params.block,  # + one block's unsharded grads in flight
            "optimizer_states": 8 * params.trainable / d,
            "teacher_fp32_masters": 4 * params.teacher_total / d, "teacher_gathered_blocks": 2 * a * teacher_unit}


def activation_bytes(cfg: Config, lay: Layout, checkpoint_every: int) -> dict[str, float]:
    """``checkpoint_every``: ``model.activation_checkpointing`` (0 off, 1 every block, k every k-th)."""
    m, dec = cfg.model, cfg.decoder
    bytes_el = 2 if lay.bf16 else 4
    rows = lay.micro_items * m.clone_batch
    h, t_full = m.embed_dim, lay.positions + m.num_extra_tokens
    kept = int(lay.positions * (1 - cfg.masking.mask_prob)) + m.num_extra_tokens
    blocks = m.depth + m.prenet_depth
    per_block = kept * rows * h * (10 + 24 / lay.tp) * bytes_el / 2
    ck = checkpointed_count(m, checkpoint_every)
    student = ck * kept * rows * h * bytes_el + (blocks - ck) * per_block  # a checkpointed block keeps its input
    positions = rows * lay.positions
    decoder = dec.layers * 4 * positions * dec.dim * bytes_el + positions * h * bytes_el
    if dec.projection_layers > 1:  # Linear → GELU → ... keeps the hidden pre- and post-activation
        decoder += (dec.projection_layers - 1) * 2 * positions * int(dec.dim * dec.projection_ratio) * bytes_el
    loss = positions * h * (4 + 4 + 4)  # fp32 prediction copy, gathered targets, squared error
    teacher = (m.average_top_k_layers * lay.micro_items * t_full * h * bytes_el
               + 2 * lay.micro_items * t_full * h * 4)  # stored FFN outputs, fp32 targets + one layer in fp32
    out = {"student_blocks": student, "decoder": decoder, "loss_tensors": loss, "teacher_transient": teacher}
    if ck:  # a block's recompute happens in backward, after the decoder and loss tensors are freed
        out["block_recompute"] = max(0.0, per_block - decoder - loss - teacher)
    out.update(modality_registry.get(m.modality).local_activation_bytes(cfg, lay, bytes_el))
    return out


