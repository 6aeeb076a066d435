"""Plan a cluster run without a GPU: per-GPU memory, whether it fits, projected step and run time.

    python -m d2v2scale.plan --preset vit_h --ds_config ds_configs/vit_h.json --nodes 32 \\
        --gpus_per_node 8 --gpu a100-40gb [--tp 1] [--mfu 0.35] [--micro_batch N]

Memory per GPU (bytes), for Ψ student parameters held by this TP rank (sharded block matrices
/ tp + replicated rest) and Ψ_T teacher-tracked ones:

- model states, mixed precision with Adam: weights 2Ψ, gradients 2Ψ (ZeRO-2/3: /dp), fp32
  master + two moments 12Ψ (ZeRO-1/2/3: /dp); fp32 training: 4Ψ + 4Ψ + 8Ψ (+ a 4Ψ/dp fp32 copy
  at ZeRO-1/2);
- teacher: fp32 EMA masters 4Ψ_T/dp (sharded) + compute copy 2Ψ_T (bf16);
- activations of one micro-batch (B items × M clones): per student block
  ``t·r·h·(10 + 24/tp)`` bytes (Korthikanti et al. with memory-efficient attention; ``r`` = B·M
  rows of ``t`` kept tokens), or only the block inputs ``2·t·r·h`` for blocks under activation
  checkpointing (``model.activation_checkpointing``) plus one block's recompute;
  plus the decoder, the loss tensors (fp32 targets and predictions of all B·M·T positions), the
  teacher's K stored layer outputs and, for audio, the CNN and the full-length conv positions;
- DeepSpeed's gradient-reduction bucket (``reduce_bucket_size``, default 5e8 elements).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .config import Config, ConfigError, load_config
from .planning.comm import ParamCounts, StepShape as CommShape, step_collectives
from .profiling.flops import PEAK_FLOPS, StepShape, step_flops
from .train.ds_config import load_ds_config, plan_batch, scale_batch_for_world

GPU_MEMORY_GB = {"a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80, "h200": 141, "v100-32gb": 32}
GIB = 1024**3


@dataclass
class Layout:
    tp: int
    dp: int
    zero: int
    bf16: bool
    micro_items: int  # samples (images, text blocks, audio crops) per micro-batch per rank
    positions: int  # T per item (patches / frames / tokens)
    input_len: int  # audio samples per item (0 otherwise)


def param_counts(cfg: Config, tp: int) -> ParamCounts:
    """Element counts one TP rank holds (block matrices / tp, the rest replicated), from a meta model."""
    import torch

    from .model import Data2Vec2

    with torch.device("meta"):
        model = Data2Vec2(cfg)
        teacher = model.teacher_copy()
    sharded_suffixes = ("attn.qkv.weight", "attn.qkv.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                        "attn.proj.weight", "mlp.fc2.weight")

    def local(name: str, p) -> int:
        return p.numel() // tp if name.endswith(sharded_suffixes) else p.numel()

    sizes = tuple(local(n, p) for n, p in model.named_parameters())
    trainable = sum(local(n, p) for n, p in model.named_parameters() if p.requires_grad)
    tracked = sum(local(n, p) for n, p in teacher.named_parameters() if p.requires_grad)
    return ParamCounts(trainable, sum(sizes), tracked, sizes)


def _param_counts(cfg: Config, tp: int) -> tuple[int, int, int]:
    """(student parameters per TP rank, all student parameters, teacher-tracked parameters per TP rank)."""
    local, full = param_counts(cfg, tp), param_counts(cfg, 1)
    return local.total, full.total, local.teacher


def model_state_bytes(psi: int, psi_t: int, lay: Layout) -> dict[str, float]:
    d = lay.dp
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
            optim = optim / d + (4 * psi / d if lay.zero in (1, 2) else 0)
        if lay.zero == 3:
            weights /= d
        teacher_compute = 4 * psi_t
    return {"weights": weights, "gradients": grads, "optimizer_states": optim,
            "teacher_fp32_masters": 4 * psi_t / d, "teacher_compute_copy": teacher_compute}


def _checkpointed_blocks(count: int, every: int) -> int:
    return 0 if every == 0 else -(-count // every)  # blocks 0, k, 2k, ... (model.blocks.checkpointed)


def activation_bytes(cfg: Config, lay: Layout, checkpoint_every: int) -> dict[str, float]:
    """``checkpoint_every``: ``model.activation_checkpointing`` (0 off, 1 every block, k every k-th)."""
    m, dec = cfg.model, cfg.decoder
    bytes_el = 2 if lay.bf16 else 4
    rows = lay.micro_items * m.clone_batch
    h, t_full = m.embed_dim, lay.positions + m.num_extra_tokens
    kept = int(lay.positions * (1 - cfg.masking.mask_prob)) + m.num_extra_tokens
    blocks = m.depth + m.prenet_depth
    per_block = kept * rows * h * (10 + 24 / lay.tp) * bytes_el / 2
    ck = _checkpointed_blocks(m.depth, checkpoint_every) + _checkpointed_blocks(m.prenet_depth, checkpoint_every)
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
    if m.modality == "audio":
        cnn, length = 0.0, lay.input_len
        for c_out, k, s in m.conv_feature_layers:
            length = (length - k) // s + 1
            cnn += c_out * length * (bytes_el + 4 + 4 + bytes_el)  # conv out, fp32 LN in/out, GELU
        conv_pos = m.conv_pos_depth * 4 * positions * h * bytes_el
        alibi = rows * m.num_heads / lay.tp * kept * kept * 4 if m.use_alibi else 0
        out.update({"audio_cnn": lay.micro_items * cnn, "conv_positions": conv_pos, "alibi_bias": alibi})
    return out


def plan(cfg: Config, ds: dict, nodes: int, gpus_per_node: int, gpu: str, tp: int, mfu: float) -> dict:
    world = nodes * gpus_per_node
    if world % tp:
        raise ConfigError(f"--tp {tp} must divide the {world} GPUs")
    dp = world // tp
    scale_batch_for_world(ds, cfg, dp)
    bp = plan_batch(ds, cfg, dp)
    m = cfg.model
    if m.modality == "audio":
        input_len = cfg.data.max_sample_size
        items = max(1, bp.micro_batch // input_len)
        positions = int(m.conv_feature_layers and _frames(m, input_len))
    else:
        input_len, items = 0, bp.micro_batch
        positions = (m.img_size // m.patch_size) ** 2 if m.modality == "image" else (cfg.data.sample_length or m.max_positions)
    lay = Layout(tp, dp, ds.get("zero_optimization", {}).get("stage", 0), ds.get("bf16", {}).get("enabled", False),
                 items, positions, input_len)
    psi, psi_total, psi_t = _param_counts(cfg, tp)
    states = model_state_bytes(psi, psi_t, lay)
    bucket = float(ds.get("zero_optimization", {}).get("reduce_bucket_size", 5e8)) * (2 if lay.bf16 else 4)
    capacity = GPU_MEMORY_GB[gpu] * 1e9
    totals = {}
    acts = {}
    for ac in (False, True):
        acts[ac] = activation_bytes(cfg, lay, int(ac))
        totals[ac] = sum(states.values()) + sum(acts[ac].values()) + (bucket if lay.zero in (1, 2) else 0)
    kept = int(positions * (1 - cfg.masking.mask_prob))
    flops = step_flops(cfg, StepShape(items, positions, kept), input_len) * bp.grad_accum * dp
    peak = PEAK_FLOPS[gpu.split("-")[0]]
    step_s = flops / (world * peak * mfu)
    return {"world": world, "tp": tp, "dp": dp, "batch": bp, "layout": lay, "params": (psi_total, psi, psi_t),
            "states": states, "activations": acts, "bucket": bucket, "totals": totals, "capacity": capacity,
            "flops_per_step": flops, "step_s": step_s, "run_h": step_s * cfg.train.max_updates / 3600, "mfu": mfu,
            "gpu": gpu}


def _frames(m, samples: int) -> int:
    for _, k, s in m.conv_feature_layers:
        samples = (samples - k) // s + 1
    return samples


def render(cfg: Config, r: dict) -> str:
    gb = 1e9
    lay, (psi_total, psi, psi_t) = r["layout"], r["params"]
    lines = [
        f"{cfg.preset} on {r['world']} × {r['gpu']} (tp={r['tp']}, dp={r['dp']}, ZeRO-{lay.zero}, "
        f"{'bf16' if lay.bf16 else 'fp32'}): {r['batch'].describe()}",
        f"  parameters: {psi_total / 1e6:.1f} M student, {psi / 1e6:.1f} M per TP rank, "
        f"{psi_t / 1e6:.1f} M teacher-tracked per TP rank",
        f"  micro-batch: {lay.micro_items} items × M={cfg.model.clone_batch} masks, T={lay.positions}, "
        f"kept {int(lay.positions * (1 - cfg.masking.mask_prob))}",
        "  per-GPU memory (GB):",
    ]
    for k, v in r["states"].items():
        lines.append(f"    {k:<24}{v / gb:8.2f}")
    if lay.zero in (1, 2):
        lines.append(f"    {'zero_reduce_bucket':<24}{r['bucket'] / gb:8.2f}")
    for ac in (False, True):
        label = "activations (checkpointed)" if ac else "activations"
        acts = r["activations"][ac]
        lines.append(f"    {label:<24}{sum(acts.values()) / gb:8.2f}   "
                     + ", ".join(f"{k} {v / gb:.2f}" for k, v in acts.items()))
    for ac in (False, True):
        total = r["totals"][ac]
        verdict = "fits" if total <= 0.9 * r["capacity"] else "DOES NOT FIT"
        lines.append(f"    total {'with' if ac else 'without'} activation checkpointing: {total / gb:.2f} of "
                     f"{r['capacity'] / gb:.0f} → {verdict} (90 % usable)")
    lines.append(f"  model FLOPs per step {r['flops_per_step']:.3e}; at MFU {r['mfu']:.1%}: {r['step_s']:.2f} s/step, "
                 f"{cfg.train.max_updates:,} steps = {r['run_h']:.1f} h")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--ds_config", required=True)
    p.add_argument("--nodes", type=int, default=32)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--gpu", default="a100-40gb", choices=sorted(GPU_MEMORY_GB))
    p.add_argument("--tp", type=int, default=None, help="default: the preset's parallel.tp")
    p.add_argument("--mfu", type=float, default=0.125,
                   help="assumed model FLOPs utilisation; the default is what the paper's ViT-H/14 run implies "
                        "(100 epochs in 66.1 h on 64 A100s ≈ 12.5 %%); calibrate with a --profile run on the target GPUs")
    p.add_argument("--micro_batch", type=int, default=None,
                   help="override the JSON's train_micro_batch_size_per_gpu (audio: data.max_tokens)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.overrides)
        ds = load_ds_config(args.ds_config)
        if args.micro_batch is not None:
            if cfg.model.modality == "audio":
                cfg.data.max_tokens = args.micro_batch
            else:
                ds["train_micro_batch_size_per_gpu"] = args.micro_batch
        r = plan(cfg, ds, args.nodes, args.gpus_per_node, args.gpu, args.tp or cfg.parallel.tp, args.mfu)
    except ConfigError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(render(cfg, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
