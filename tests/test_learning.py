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


def test_the_digits_are_scikit_learns_own():
    """The digits are read from scikit-learn's bundled file without importing scikit-learn (a second
    of every start-up): the same pixels and labels as ``sklearn.datasets.load_digits``, held-out
    split and normalisation included."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from d2v2scale.data.digits import HELD_OUT_EVERY, load_digits_tensors

    ref = load_digits()
    pixels = torch.tensor(ref.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = (pixels - pixels.mean()) / pixels.std()
    labels = torch.tensor(ref.target)
    held = torch.arange(len(labels)) % HELD_OUT_EVERY == 0
    for split, keep in (("train", ~held), ("heldout", held)):
        images, got = load_digits_tensors(16, 3, split)
        want = F.interpolate(pixels[keep], size=(16, 16), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        assert torch.equal(images, want) and torch.equal(got, labels[keep]), split
