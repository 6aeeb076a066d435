"""Analytic model FLOPs of one data2vec 2.0 training step, and MFU.

Counted like ``torch.utils.flop_counter`` counts them (2 FLOPs per multiply-accumulate of every
matmul and convolution, attention as its two batched matmuls; norms, activations and softmax are
not counted), so the formula can be checked against ``FlopCounterMode`` on tiny models:

- teacher, forward only, once per sample on the full sequence: its local encoder (images),
  conv positions (audio), prenet and shared blocks;
- student, forward and backward (×3), on B·M masked views: the local encoder once per sample,
  conv positions on the full-length view (audio), prenet and shared blocks on the K kept tokens
  (+ extra tokens), the conv decoder on every position.

A block on ``t`` tokens costs ``2·t·(4h² + 2h·f) + 4·t²·h`` forward (qkv, proj, fc1, fc2;
QKᵀ and AV). Layerdrop is ignored (it lowers the real count by its rate). This is *model* FLOPs:
activation recomputation would not be counted (MFU, not HFU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import modality_registry
from ..config import Config

# Dense bf16 peak per device (FLOP/s), for MFU.
PEAK_FLOPS = {
    "a100": 312e12,
    "a100-40gb": 312e12,
    "a100-80gb": 312e12,
    "h100": 989e12,
    "h100-sxm": 989e12,
    "h100-80gb": 989e12,
    "h200": 989e12,
    "v100": 125e12,
    "v100-32gb": 125e12,
}


@dataclass(frozen=True)
class StepShape:
    """What one step processes: samples, positions per sample (T, excluding extra tokens), kept tokens."""

    samples: int
    positions: int
    kept: int


def _block(cfg, tokens: int) -> float:
    h, f = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    return 2.0 * tokens * (4 * h * h + 2 * h * f) + 4.0 * tokens * tokens * h


def _decoder(cfg: Config, tokens: int) -> float:
    d, m = cfg.decoder, cfg.model
    dims = modality_registry.get(m.modality).decoder_dims
    flops, c_in = 0.0, m.embed_dim
    for _ in range(d.layers):
        flops += 2.0 * tokens * d.dim * (c_in // d.groups) * d.kernel**dims
        c_in = d.dim
    if d.projection_layers == 1:
        return flops + 2.0 * tokens * d.dim * m.embed_dim
    cur = d.dim
    for i in range(d.projection_layers - 1):
        nxt = int(cur * d.projection_ratio) if i == 0 else cur
        flops += 2.0 * tokens * cur * nxt
        cur = nxt
    return flops + 2.0 * tokens * cur * m.embed_dim


def forward_flops(cfg: Config, shape: StepShape, input_len: int = 0) -> dict[str, float]:
    """Forward FLOPs of one step by part (what FlopCounterMode sees for one model forward)."""
    m = cfg.model
    t_full = shape.positions + m.num_extra_tokens
    t_kept = shape.kept + m.num_extra_tokens
    blocks = m.depth + m.prenet_depth
    views = shape.samples * m.clone_batch
    modality = modality_registry.get(m.modality)
    local = modality.local_encoder_flops(m, input_len, shape.positions)
    conv_pos = modality.context_flops(m, shape.positions)
    teacher_local = local if (cfg.teacher.ema_local_encoder and not cfg.teacher.ema_encoder_only) else 0.0
    teacher_blocks = m.depth if cfg.teacher.ema_encoder_only else blocks
    return {
        "teacher": shape.samples * (teacher_local + conv_pos + teacher_blocks * _block(m, t_full)),
        "local_encoder": shape.samples * local,
        "student": views * (conv_pos + blocks * _block(m, t_kept)),
        "decoder": views * _decoder(cfg, shape.positions),
    }


def step_flops(cfg: Config, shape: StepShape, input_len: int = 0) -> float:
    """Model FLOPs of one training step: teacher forward + 3 × (everything the student trains)."""
    f = forward_flops(cfg, shape, input_len)
    return f["teacher"] + 3.0 * (f["local_encoder"] + f["student"] + f["decoder"])


def mfu(flops_per_step: float, step_time_s: float, devices: int, peak: float) -> tuple[float, float]:
    """(TFLOP/s per device, model FLOPs utilisation)."""
    per_device = flops_per_step / step_time_s / devices
    return per_device / 1e12, per_device / peak


def measured_cpu_peak(n: int = 1024, repeats: int = 3) -> float:
    """A CPU "peak": the best fp32 matmul rate of this process (MFU on CPU is relative to it)."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops(device, dtype) -> float | None:
    """Dense peak of this device for MFU: the table for known GPUs (bf16), a measured fp32 matmul
    rate on CPU, None for an unknown GPU (MFU is then not reported rather than guessed)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100", "v100"):
            if key in name:
                return PEAK_FLOPS[key]
        return None
    return measured_cpu_peak()
