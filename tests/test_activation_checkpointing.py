"""model.activation_checkpointing recomputes blocks in backward without changing anything they compute."""
import pytest
import torch

from d2v2scale.config import load_config
from d2v2scale.data.synthetic import synthetic_batch
from d2v2scale.model import Data2Vec2, normalize_loss
from d2v2scale.train.teacher import build_teacher

DROPOUT = ["model.encoder_dropout=0.1", "model.attention_dropout=0.1", "model.activation_dropout=0.1",
           "model.post_mlp_dropout=0.1"]


def _loss_and_grads(preset: str, every: int, extra: list[str]):
    cfg = load_config(preset, [f"model.activation_checkpointing={every}", *extra])
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).train()
    teacher = build_teacher(model, cfg)
    source = synthetic_batch(cfg, 4, torch.Generator().manual_seed(1))
    mask = model.make_mask(0, 0, torch.arange(4), source)
    torch.manual_seed(2)  # dropout and mask noise draw from here; checkpointing must replay them exactly
    saved = []
    pack = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t)
    with pack:
        loss = normalize_loss(model(source, model.teacher_fn(teacher.module), mask))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
@pytest.mark.parametrize("every", [1, 2])
def test_same_loss_and_gradients_with_dropout_on(preset, every):
    """fp32, 1e-6: the recompute runs the same kernels on the same inputs, so only summation order
    in backward could differ (observed: identical)."""
    loss, grads, saved = _loss_and_grads(preset, 0, DROPOUT)
    loss_ck, grads_ck, saved_ck = _loss_and_grads(preset, every, DROPOUT)
    torch.testing.assert_close(loss_ck, loss, atol=1e-6, rtol=0)
    assert grads_ck.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ck[name], g, atol=1e-6, rtol=1e-6, msg=name)
    assert saved_ck < saved  # the forward really kept fewer tensors for backward


def test_refused_below_zero():
    from d2v2scale.config import ConfigError

    with pytest.raises(ConfigError, match="model.activation_checkpointing=-1"):
        load_config("tiny_image", ["model.activation_checkpointing=-1"])
