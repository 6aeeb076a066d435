"""Batch-math resolution of DeepSpeed JSON against the preset's pinned global batch."""
import pytest

from d2v2scale.config import ConfigError, load_config
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config
from d2v2scale.train.optim import param_groups


@pytest.mark.parametrize("dp,micro,gas", [(1, 32, 1), (2, 16, 1), (4, 8, 1), (8, 4, 1)])
def test_auto_micro_batch_splits_the_global_batch(dp, micro, gas):
    cfg = load_config("tiny_image")
    ds = load_ds_config("ds_configs/cpu_tiny.json")
    plan = plan_batch(ds, cfg, dp)
    assert (plan.micro_batch, plan.grad_accum) == (micro, gas)
    out = resolve_ds_config(ds, cfg, plan)
    assert out["train_batch_size"] == 32 == out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"] * dp
    assert out["scheduler"]["params"]["total_num_steps"] == cfg.train.max_updates
    assert "auto" not in str(out)


def test_fixed_micro_batch_derives_accumulation():
    cfg = load_config("vit_h")  # global 256, micro 8
    ds = load_ds_config("ds_configs/vit_h.json")
    assert plan_batch(ds, cfg, 32).grad_accum == 1
    assert plan_batch(ds, cfg, 8).grad_accum == 4  # the paper's 64 GPUs would be dp=64 → 256/(8·64) is not an integer
    with pytest.raises(ConfigError, match="batch math"):
        plan_batch(ds, cfg, 64)


def test_audio_counts_samples():
    cfg = load_config("audio_base")  # 16M samples, 1M per micro-batch
    ds = load_ds_config("ds_configs/audio_base.json")
    plan = plan_batch(ds, cfg, 16)
    assert (plan.micro_batch, plan.grad_accum, plan.unit) == (1_000_000, 1, "audio samples")
    assert plan_batch(ds, cfg, 8).grad_accum == 2
    out = resolve_ds_config(ds, cfg, plan)
    assert out["train_micro_batch_size_per_gpu"] == 1 and out["train_batch_size"] == 16


def test_weight_decay_groups():
    from d2v2scale.model import Data2Vec2

    for preset in ("tiny_image", "tiny_audio"):
        model = Data2Vec2(load_config(preset).model_spec())
        decay, no_decay = param_groups(model, 0.05)
        names = {id(p): n for n, p in model.named_parameters()}
        nd = {names[id(p)] for p in no_decay["params"]}
        d = {names[id(p)] for p in decay["params"]}
        assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 or n.endswith("alibi_scale") for n in nd)
        assert all(model.get_parameter(n).ndim > 1 and not n.endswith("alibi_scale") for n in d)
        assert not any("positions" in n for n in d | nd)  # frozen: not optimised at all
        if preset == "tiny_audio":
            assert "encoder.alibi_scale" in nd
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
