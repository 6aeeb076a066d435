"""The gradient the trainer backpropagates is the gradient of the paper's objective, the CLS
term's weight included.

The objective of one update over a global batch of B samples, each seen in M masked views, with
S masked positions in all (fairseq's data2vec 2.0, its CLS weight fixed at the split fairseq ran:
``r`` samples per micro-batch, ``model.cls_loss_reference_micro_batch``)::

    L = Σ_masked ‖pred − y‖² / √D / S  +  cls_loss · (r / B) · Σ_views ‖cls_pred − mean_t y‖² / √D

The trainer builds the loss it backpropagates and the loss it logs separately, so a weight
dropped from the first leaves the logs (and every test that compares logged losses, or compares
splits that all share the one weight) unchanged. Here step 1 runs through the real trainer and
DeepSpeed backend, one process, with the CLS loss on, M = 4 views, r = 8 of B = 32, at a split
(2 micro-batches of 16) that is neither r nor B, and AdamW's first moment after that step,
(1 − β1)·∇L, is compared with autograd of L written out above on an independent copy of the
model: the same weights, batches and masks; the model's forward gives the predictions and the
teacher's targets, the loss is this file's.

Tolerance (fp32): both sides run the same per-micro-batch forward and backward; they may differ
in how the two micro-batches' gradients are summed (DeepSpeed accumulates gradients scaled by
powers of two in its flat buffer, the reference in ``.grad``) and in AdamW's ``lerp`` for
(1 − β1)·g: a few fp32 roundings (~1e-7 relative) per element; measured: bit-identical. 1e-5
relative (whole-gradient and per-tensor norms) allows that and is four orders under what the CLS
weight moves: at weight 1 instead of r / B = 1/4 the whole gradient is off by 0.42 (the CLS token
``encoder.extra_tokens`` by 3.0). The logged loss (fp64 sums of fp32 terms) is held to 1e-6.
"""
import math
import sys

import pytest
import torch

from d2v2scale.config import load_config
from d2v2scale.model import Data2Vec2
from d2v2scale.model.masking import MaskInfo

from test_deepspeed_training import _launch

GLOBAL, REFERENCE_MICRO, MICRO, ACCUM = 32, 8, 16, 2
OVERRIDES = [f"train.global_batch={GLOBAL}", f"model.cls_loss_reference_micro_batch={REFERENCE_MICRO}",
             "model.mask_noise_std=0", "train.allow_long_warmup=true"]
TOL = 1e-5


def objective(pred: torch.Tensor, cls_pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
              masked_total: float, cfg) -> torch.Tensor:
    """This micro-batch's share of L (module docstring), from the student's predictions (rows in
    repeat_interleave order: the M views of a sample are consecutive) and the teacher's targets."""
    m = cfg.model
    scale = 1.0 / math.sqrt(m.embed_dim)
    y = targets.repeat_interleave(m.clone_batch, dim=0)
    reg = ((pred.float() - y) ** 2).sum(-1)[mask].sum() * scale
    cls_target = targets.mean(dim=1).repeat_interleave(m.clone_batch, dim=0)
    cls = ((cls_pred.float() - cls_target) ** 2).sum() * scale
    return reg / masked_total + m.cls_loss * (REFERENCE_MICRO / GLOBAL) * cls


def reference_gradient(cfg, dump: dict) -> tuple[dict[str, torch.Tensor], float]:
    """∇L and L on a fresh model holding the trainer's initial weights, over the dumped batches."""
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).train()
    trainable = dict(model.named_parameters())
    assert set(dump["init"]) == {n for n, p in trainable.items() if p.requires_grad}
    with torch.no_grad():
        for name, value in dump["init"].items():
            trainable[name].copy_(value.view_as(trainable[name]))
    teacher = model.teacher_copy()  # step 1's teacher is the student as initialised
    seen: list = []
    forward_losses = model.losses

    def capture(pred, cls_pred, targets, mask):
        seen.append((pred, cls_pred, targets))
        return forward_losses(pred, cls_pred, targets, mask)

    model.losses = capture
    masked_total = float(sum(b["mask"].sum() for b in dump["batches"]))
    total = 0.0
    for b in dump["batches"]:
        seen.clear()
        model(b["source"], model.teacher_fn(teacher), MaskInfo(b["mask"], b["keep_idx"]))
        (pred, cls_pred, targets), = seen
        loss = objective(pred, cls_pred, targets, b["mask"], masked_total, cfg)
        loss.backward()
        total += loss.item()
    return {n: p.grad for n, p in trainable.items() if n in dump["init"]}, total


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def step_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls_weight") / "step.pt"
    _launch([sys.executable], "tests/dist/first_step.py", str(out), str(MICRO), str(ACCUM), "tiny_image", *OVERRIDES,
            timeout=300)
    dump = torch.load(out, weights_only=True)
    cfg = load_config("tiny_image", OVERRIDES)
    grads, loss = reference_gradient(cfg, dump)
    return cfg, dump, grads, loss


@pytest.mark.slow
def test_the_backpropagated_gradient_is_the_objectives(step_one):
    """AdamW's exp_avg after step 1 is (1 − β1)·∇L, for the whole gradient and every tensor."""
    cfg, dump, grads, _ = step_one
    assert cfg.model.cls_loss > 0 and cfg.model.clone_batch > 1 and len(dump["batches"]) == ACCUM
    assert all(b["source"].shape[0] == MICRO for b in dump["batches"])
    names = sorted(grads)
    got = torch.cat([dump["exp_avg"][n].flatten() for n in names])
    want = torch.cat([grads[n].flatten() for n in names]) * (1 - dump["beta1"])
    assert _rel(got, want) < TOL, _rel(got, want)
    worst = max(names, key=lambda n: _rel(dump["exp_avg"][n].flatten(), (1 - dump["beta1"]) * grads[n].flatten()))
    assert _rel(dump["exp_avg"][worst].flatten(), (1 - dump["beta1"]) * grads[worst].flatten()) < TOL, worst


@pytest.mark.slow
def test_the_logged_loss_is_the_objective(step_one):
    """The metrics row's loss is L at the initial weights; its CLS part weighs in (≥ 5 %), so the
    gradient comparison above sees the CLS weight."""
    _, dump, _, loss = step_one
    row = dump["row"]
    assert abs(row["loss"] - loss) <= 1e-6 * abs(loss), (row, loss)
    assert row["loss_cls"] >= 0.05 * row["loss"], row
