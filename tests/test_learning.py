"""Learning works before DeepSpeed: plain AdamW + EMA on a fixed batch lowers the loss."""
import pytest
import torch

from d2v2scale.config import load_config
from d2v2scale.data.synthetic import synthetic_batch
from d2v2scale.model import Data2Vec2, normalize_loss
from d2v2scale.train.teacher import build_teacher


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_200_adamw_steps_lower_the_loss(preset):
    torch.manual_seed(0)
    cfg = load_config(preset)
    model = Data2Vec2(cfg.model_spec()).train()
    teacher = build_teacher(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    batch = 8
    source = synthetic_batch(cfg, batch, torch.Generator().manual_seed(0))
    ids = torch.arange(batch)
    losses = []
    for step in range(200):
        mask = model.make_mask(cfg.seed, step, ids, source)
        loss = normalize_loss(model(source, model.teacher_fn(teacher.module), mask, layerdrop_key=step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        teacher.update(step + 1, model)
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert all(map(lambda v: v == v, losses)), "NaN loss"
    assert last < first, (first, last)
