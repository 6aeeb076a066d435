"""apex is optional: the kernel choice made in one place, tested on CPU with a stand-in apex module."""
import types

import torch
from torch import nn

from d2v2scale.config import load_config
from d2v2scale.data.synthetic import synthetic_batch
from d2v2scale.model import Data2Vec2
from d2v2scale.train.kernels import apply_kernels, select_kernels

CUDA = torch.device("cuda")  # a device object only: nothing runs on it


class FakeFusedLayerNorm(nn.LayerNorm):
    """Stands in for apex.normalization.FusedLayerNorm (same constructor, same maths)."""


def _fake_apex() -> types.ModuleType:
    module = types.ModuleType("apex.normalization")
    module.FusedLayerNorm = FakeFusedLayerNorm
    return module


def test_apex_is_chosen_only_on_a_gpu_where_it_is_installed_and_not_refused():
    assert select_kernels("auto", CUDA, _fake_apex()).layer_norm is FakeFusedLayerNorm
    assert "cpu" in select_kernels("auto", torch.device("cpu"), _fake_apex()).why
    assert select_kernels("auto", torch.device("cpu"), _fake_apex()).layer_norm is None
    missing = select_kernels("auto", CUDA, types.ModuleType("apex.normalization"))
    assert missing.layer_norm is None and "not installed" in missing.describe()
    assert select_kernels("torch", CUDA, _fake_apex()).layer_norm is None


def test_the_swap_keeps_every_parameter_and_the_output():
    cfg = load_config("tiny_image")
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).eval()
    before = dict(model.named_parameters())
    norms = sum(type(m) is nn.LayerNorm and m.elementwise_affine for m in model.modules())
    source = synthetic_batch(cfg, 2, torch.Generator().manual_seed(1))
    local, valid = model.encoder.local_features(source)
    want = model.teacher_targets(model, source, local, valid, None)
    kernels = select_kernels("auto", CUDA, _fake_apex())
    assert apply_kernels(model, kernels) == norms > 0
    assert sum(isinstance(m, FakeFusedLayerNorm) for m in model.modules()) == norms
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert torch.equal(model.teacher_targets(model, source, local, valid, None), want)
    assert "FakeFusedLayerNorm" in kernels.describe()
