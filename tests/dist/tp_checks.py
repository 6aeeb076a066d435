"""Tensor-parallel checks against unsharded references, run under ``torchrun --nproc_per_node 2``.

Every rank also builds the TP=1 model locally (same seed), so each comparison is against an
independent unsharded computation. Results (max abs differences) go to OUT.json from rank 0.

    torchrun --nproc_per_node 2 tp_checks.py OUT.json
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.data.synthetic import synthetic_batch  # noqa: E402
from d2v2scale.distributed.dims import ParallelDims  # noqa: E402
from d2v2scale.distributed.tensor_parallel import (  # noqa: E402
    TPRegionRNG, copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp,
)
from d2v2scale.model.parallelize import parallelize  # noqa: E402
from d2v2scale.model import Data2Vec2, normalize_loss  # noqa: E402
from d2v2scale.model.blocks import Block, run_block  # noqa: E402
from d2v2scale.train.teacher import build_teacher  # noqa: E402


def mappings(dims):
    """Rank-valued tensors: forward and backward of each mapping against the arithmetic expectation."""
    r, n, g = dims.tp_rank, dims.tp, dims.tp_group
    out = {}
    x = torch.full((3, 4), float(r + 1), requires_grad=True)
    y = copy_to_tp(x, g)
    (y * (r + 1)).sum().backward()  # upstream grad on rank r is r+1 → all-reduced: Σ (r+1)
    out["copy_fwd"] = (y - x).abs().max().item()
    out["copy_bwd"] = (x.grad - sum(k + 1 for k in range(n))).abs().max().item()

    x = torch.full((3, 4), float(r + 1), requires_grad=True)
    y = reduce_from_tp(x, g)
    (y * (r + 1)).sum().backward()
    out["reduce_fwd"] = (y - sum(k + 1 for k in range(n))).abs().max().item()
    out["reduce_bwd"] = (x.grad - (r + 1)).abs().max().item()

    x = torch.arange(2 * 4 * n, dtype=torch.float32).view(2, 4 * n).requires_grad_()
    y = scatter_to_tp(x, g)
    (y * (r + 1)).sum().backward()
    out["scatter_fwd"] = (y - x.detach()[:, 4 * r : 4 * (r + 1)]).abs().max().item()
    expect = torch.cat([torch.full((2, 4), float(k + 1)) for k in range(n)], dim=1)
    out["scatter_bwd"] = (x.grad - expect).abs().max().item()

    x = torch.full((2, 4), float(r + 1), requires_grad=True)
    y = gather_from_tp(x, g)
    (y * torch.arange(4 * n, dtype=torch.float32)).sum().backward()
    out["gather_fwd"] = (y - torch.cat([torch.full((2, 4), float(k + 1)) for k in range(n)], 1)).abs().max().item()
    out["gather_bwd"] = (x.grad - torch.arange(4 * r, 4 * (r + 1), dtype=torch.float32)).abs().max().item()
    return out


def rng_check(dims):
    """The TP-region stream differs between TP ranks; the default stream stays identical."""
    torch.manual_seed(7)
    tracker = TPRegionRNG(100 + dims.tp_rank, torch.device("cpu"))
    outside_before = torch.rand(4)
    with tracker.fork():
        inside = torch.rand(4)
    outside_after = torch.rand(4)
    torch.manual_seed(8)
    block = parallelize(Block(32, 4, attention_dropout=0.5, activation_dropout=0.5, encoder_dropout=0.2,
                              post_mlp_dropout=0.2), dims, tracker).train()
    torch.manual_seed(9)  # same default stream on every TP rank
    y, _ = block(torch.randn(2, 5, 32))
    return {"outside_before": outside_before.tolist(), "inside": inside.tolist(),
            "outside_after": outside_after.tolist(), "dropout_block_out": y.flatten()[:16].tolist()}


def checkpoint_replay(dims):
    """A TP block with dropout everywhere, under activation checkpointing vs without: the recompute
    must replay both the default and the TP-region dropout streams (max abs differences)."""
    out = []
    for checkpointed in (False, True):
        torch.manual_seed(8)
        tracker = TPRegionRNG(100 + dims.tp_rank, torch.device("cpu"))
        block = parallelize(Block(32, 4, attention_dropout=0.5, activation_dropout=0.5, encoder_dropout=0.2,
                                  post_mlp_dropout=0.2), dims, tracker).train()
        torch.manual_seed(9)
        x = torch.randn(2, 5, 32, requires_grad=True)
        y, _ = run_block(block, x, None, checkpointed)
        y.square().sum().backward()
        out.append((y.detach(), x.grad, block.mlp.fc1.weight.grad))
    return {name: (a - b).abs().max().item() for name, a, b in zip(("out", "dx", "fc1_grad"), out[0], out[1])}


def shard_of(name: str, full: torch.Tensor, local: torch.Tensor, dims) -> torch.Tensor:
    """The slice of a full tensor that TP rank r should hold, written out independently of parallelize()."""
    r, n = dims.tp_rank, dims.tp
    if full.shape == local.shape:
        return full
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        parts = full.reshape(3, n, -1, *full.shape[1:])
        return parts[:, r].reshape(-1, *full.shape[1:])
    if name.endswith("alibi_scale"):
        return full.chunk(n, dim=2)[r]
    if full.shape[0] != local.shape[0]:
        return full.chunk(n, dim=0)[r]
    return full.chunk(n, dim=1)[r]


def max_param_diff(ref: torch.nn.Module, tp: torch.nn.Module, dims, grads: bool) -> float:
    worst = 0.0
    tp_params = dict(tp.named_parameters())
    for name, p in ref.named_parameters():
        q = tp_params[name]
        a = p.grad if grads else p.detach()
        b = q.grad if grads else q.detach()
        if a is None and b is None:
            continue
        worst = max(worst, (shard_of(name, a, b, dims) - b).abs().max().item())
    return worst


def block_check(dims):
    torch.manual_seed(0)
    ref = Block(32, 4, norm_eps=1e-6)
    tp = parallelize(copy.deepcopy(ref), dims, TPRegionRNG(1, torch.device("cpu")))
    x = torch.randn(2, 7, 32)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    (yr, tr), (yt, tt) = ref(xr), tp(xt)
    w = torch.randn_like(yr)
    ((yr * w).sum() + tr.pow(2).sum()).backward()
    ((yt * w).sum() + tt.pow(2).sum()).backward()
    return {
        "block_out": (yr - yt).abs().max().item(),
        "block_ffn": (tr - tt).abs().max().item(),
        "block_dx": (xr.grad - xt.grad).abs().max().item(),
        "block_grads": max_param_diff(ref, tp, dims, grads=True),
    }


def step_check(dims, preset):
    """A full data2vec 2.0 step + 3 AdamW steps: TP=2 vs the same model unsharded."""
    cfg = load_config(preset, ["model.clone_batch=2"])
    torch.manual_seed(0)
    ref = Data2Vec2(cfg.model_spec()).train()
    tp = parallelize(copy.deepcopy(ref), dims, TPRegionRNG(1, torch.device("cpu"))).train()
    t_ref, t_tp = build_teacher(ref, cfg), build_teacher(tp, cfg)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    o_tp = torch.optim.AdamW(tp.parameters(), lr=1e-3)
    source = synthetic_batch(cfg, 2, torch.Generator().manual_seed(5))
    res = {}
    for step in range(3):
        mask = ref.make_mask(cfg.seed, step, torch.arange(2), source)
        losses = []
        for model, teacher, opt in ((ref, t_ref, o_ref), (tp, t_tp, o_tp)):
            torch.manual_seed(100 + step)  # the same decoder noise for both
            opt.zero_grad(set_to_none=True)
            loss = normalize_loss(model(source, model.teacher_fn(teacher.module), mask))
            loss.backward()
            losses.append(loss.item())
        if step == 0:
            res["loss"] = abs(losses[0] - losses[1]) / abs(losses[0])
            res["grads"] = max_param_diff(ref, tp, dims, grads=True)
        o_ref.step()
        o_tp.step()
        t_ref.update(step + 1, ref)
        t_tp.update(step + 1, tp)
    res["params_after_3"] = max_param_diff(ref, tp, dims, grads=False)
    res["teacher_after_3"] = max_param_diff(t_ref.module, t_tp.module, dims, grads=False)
    return res


def main():
    dist.init_process_group("gloo")
    dims = ParallelDims(tp=dist.get_world_size(), world_size=dist.get_world_size(), rank=dist.get_rank())
    dims.build_groups()
    results = {"mappings": mappings(dims), "block": block_check(dims), "rng": rng_check(dims),
               "checkpoint_replay": checkpoint_replay(dims)}
    for preset in ("tiny_image", "tiny_audio"):
        results[preset] = step_check(dims, preset)
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, results)
    if dims.rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
