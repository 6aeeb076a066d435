"""Presets, overrides, validation messages and the DeepSpeed JSON files."""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import missing_dependency

from d2v2scale.config import Config, ConfigError, config_from_dict, load_config, preset_names
from d2v2scale.modalities.audio import AudioDataKeys, AudioKeys
from d2v2scale.modalities.image import ImageKeys
from d2v2scale.modalities.text import TextKeys

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "ds_configs"
PUBLISHED = ("vit_b", "vit_l", "vit_h", "audio_base", "audio_large", "text_base")
TINY = ("tiny_image", "tiny_audio", "tiny_text")


def _error(preset: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"ConfigError message must be one line: {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# presets


def test_all_presets_are_shipped():
    assert set(preset_names()) == set(PUBLISHED) | set(TINY)


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads(name):
    cfg = load_config(name)
    assert cfg.preset == name
    assert cfg.train.max_updates >= 1
    # a saved config (run_dir/config.yaml) rebuilds to the same thing
    assert config_from_dict(cfg.to_dict()) == cfg


def test_preset_from_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  depth: 2\n  average_top_k_layers: 2\ntrain:\n  max_updates: 7\n")
    cfg = load_config(str(path))
    assert (cfg.preset, cfg.model.depth, cfg.train.max_updates) == ("mine", 2, 7)


def test_overrides_apply_with_types():
    cfg = load_config("tiny_image", ["train.max_updates=5", "seed=3", "model.cls_loss=0", "data.path=/tmp/x"])
    assert cfg.train.max_updates == 5 and type(cfg.train.max_updates) is int
    assert cfg.seed == 3 and type(cfg.seed) is int
    assert cfg.model.cls_loss == 0.0 and type(cfg.model.cls_loss) is float  # int accepted where float is
    assert cfg.data.path == "/tmp/x"
    cfg = load_config("vit_h", ["parallel.tp=4", "model.clone_batch=2", "model.loss_scale=null"])
    assert (cfg.parallel.tp, cfg.model.clone_batch, cfg.model.loss_scale) == (4, 2, None)


def test_vit_presets_match_reference():
    b = load_config("vit_b")
    m, d, mk, t = b.model, b.decoder, b.masking, b.teacher
    assert (m.modality, m.embed_dim, m.depth, m.prenet_depth, m.num_heads) == ("image", 768, 10, 2, 12)
    assert (m.norm_eps, m.clone_batch, m.average_top_k_layers) == (1e-6, 16, 10)
    assert m.instance_norm_target_layer and m.layer_norm_targets and not m.instance_norm_targets
    assert (m.cls_loss, m.num_extra_tokens, m.loss_scale) == (0.01, 1, None)
    assert (d.dim, d.kernel, d.layers, d.groups, d.residual, d.input_dropout) == (768, 3, 6, 16, True, 0.0)
    assert (mk.mask_prob, mk.mask_prob_adjust, mk.mask_length, mk.inverse_mask) == (0.8, 0.07, 3, True)
    assert (t.ema_decay, t.ema_end_decay, t.ema_anneal_end_step) == (0.9998, 0.99999, 100_000)
    assert t.ema_local_encoder and not t.ema_encoder_only
    assert (b.data.kind, b.train.global_batch, b.train.max_updates, b.mask_kind()) == ("images", 512, 375_300, "block2d")

    l = load_config("vit_l")
    assert (l.model.embed_dim, l.model.depth, l.model.prenet_depth, l.model.num_heads) == (1024, 24, 0, 16)
    assert l.model.average_top_k_layers == 18
    assert (l.masking.mask_prob, l.masking.mask_prob_adjust, l.masking.mask_length) == (0.75, 0.1, 3)
    assert (l.decoder.dim, l.decoder.kernel, l.decoder.layers, l.decoder.groups) == (1024, 5, 3, 16)
    assert (l.teacher.ema_end_decay, l.teacher.ema_anneal_end_step) == (0.99999, 150_000)
    assert l.train.global_batch == 256

    h = load_config("vit_h")
    assert (h.model.embed_dim, h.model.depth, h.model.num_heads, h.model.average_top_k_layers) == (1280, 32, 16, 24)
    assert (h.decoder.dim, h.decoder.kernel, h.decoder.layers) == (1024, 5, 3)
    assert (h.teacher.ema_decay, h.teacher.ema_end_decay, h.teacher.ema_anneal_end_step) == (0.9998, 0.99995, 150_000)
    assert (h.train.global_batch, h.train.max_updates) == (256, 375_300)
    for cfg in (b, l, h):
        for key in ("encoder_dropout", "attention_dropout", "activation_dropout", "post_mlp_dropout", "layerdrop"):
            assert getattr(cfg.model, key) == 0.0


def test_audio_presets_match_reference():
    b = load_config("audio_base")
    m = b.model
    assert (m.modality, m.embed_dim, m.depth, m.prenet_depth, m.num_heads, m.norm_eps) == ("audio", 768, 12, 0, 12, 1e-5)
    assert (m.encoder_dropout, m.attention_dropout, m.post_mlp_dropout, m.activation_dropout) == (0.1, 0.1, 0.1, 0.0)
    assert (m.layerdrop, m.prenet_dropout, m.clone_batch, m.average_top_k_layers) == (0.05, 0.1, 8, 8)
    assert m.instance_norm_target_layer and not m.layer_norm_targets and m.loss_scale is None
    a = m.keys(AudioKeys)
    assert a.use_alibi and (a.conv_pos_width, a.conv_pos_depth, a.conv_pos_groups) == (95, 5, 16)
    assert a.conv_feature_layers == [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    assert (b.decoder.dim, b.decoder.kernel, b.decoder.layers, b.decoder.groups, b.decoder.input_dropout) == (384, 7, 4, 16, 0.1)
    assert (b.masking.mask_prob, b.masking.mask_prob_adjust, b.masking.mask_length, b.masking.inverse_mask) == (0.5, 0.05, 5, False)
    assert b.mask_kind() == "block1d"
    assert (b.teacher.ema_decay, b.teacher.ema_end_decay, b.teacher.ema_anneal_end_step) == (0.999, 0.99999, 75_000)
    assert not b.teacher.ema_local_encoder and not b.teacher.ema_encoder_only
    assert (b.data.kind, b.data.keys(AudioDataKeys).max_tokens, b.train.global_batch, b.train.max_updates) == (
        "audio", 1_000_000, 16_000_000, 400_000)

    g = load_config("audio_large")
    assert (g.model.embed_dim, g.model.depth, g.model.prenet_depth, g.model.num_heads) == (1024, 16, 8, 16)
    assert (g.model.layerdrop, g.model.clone_batch, g.model.average_top_k_layers) == (0.0, 12, 16)
    assert (g.masking.mask_prob, g.masking.mask_prob_adjust, g.masking.mask_length) == (0.55, 0.1, 5)
    assert (g.decoder.dim, g.decoder.kernel, g.decoder.layers, g.decoder.groups, g.decoder.input_dropout) == (768, 7, 4, 16, 0.1)
    assert (g.teacher.ema_decay, g.teacher.ema_end_decay, g.teacher.ema_anneal_end_step) == (0.9997, 1.0, 300_000)
    assert (g.data.keys(AudioDataKeys).max_tokens, g.train.global_batch, g.train.max_updates) == (320_000, 15_360_000, 600_000)


def test_text_preset_matches_reference():
    c = load_config("text_base")
    m, d = c.model, c.decoder
    assert (m.modality, m.embed_dim, m.depth, m.prenet_depth, m.num_heads, m.norm_eps) == ("text", 768, 12, 0, 12, 1e-5)
    t = m.keys(TextKeys)
    assert (t.vocab_size, t.max_positions, t.pad_idx, m.loss_scale) == (50265, 512, 1, 1.0)
    assert (m.clone_batch, m.average_top_k_layers, m.prenet_dropout) == (8, 12, 0.0)
    assert (d.dim, d.kernel, d.layers, d.groups, d.residual) == (768, 9, 5, 1, False)
    assert (d.input_dropout, d.projection_layers, d.projection_ratio) == (0.1, 2, 2.0)
    assert (c.masking.mask_prob, c.masking.mask_prob_adjust, c.masking.mask_length) == (0.48, 0.0, 1)
    assert c.mask_kind() == "random"
    assert (c.teacher.ema_decay, c.teacher.ema_end_decay, c.teacher.ema_anneal_end_step) == (0.9999, 0.99999, 100_000)
    assert c.teacher.ema_encoder_only and not c.teacher.ema_local_encoder
    assert (c.data.kind, c.train.global_batch, c.train.max_updates) == ("text", 32, 1_000_000)


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_are_small(name):
    cfg = load_config(name)
    assert cfg.model.embed_dim <= 64 and cfg.model.depth + cfg.model.prenet_depth <= 4
    assert cfg.train.max_updates <= 200 and cfg.data.kind in ("synthetic", "digits")
    published = {"tiny_image": "vit_b", "tiny_audio": "audio_base", "tiny_text": "text_base"}[name]
    ref = load_config(published)
    # same structure as the published preset they shrink
    assert cfg.model.modality == ref.model.modality and cfg.mask_kind() == ref.mask_kind()
    assert (cfg.teacher.ema_local_encoder, cfg.teacher.ema_encoder_only) == (ref.teacher.ema_local_encoder, ref.teacher.ema_encoder_only)
    assert (cfg.decoder.residual, cfg.model.keys(AudioKeys).use_alibi, cfg.model.num_extra_tokens) == (
        ref.decoder.residual, ref.model.keys(AudioKeys).use_alibi, ref.model.num_extra_tokens)


def test_tiny_image_geometry():
    keys = load_config("tiny_image").model.keys(ImageKeys)
    assert (keys.img_size // keys.patch_size) ** 2 == 64


# ---------------------------------------------------------------------------------------------
# the schema in code: typed modality keys, no attribute outside it


def test_a_modality_s_keys_are_one_typed_live_object():
    cfg = load_config("tiny_image", ["model.img_size=16", "data.max_tokens=5"])
    keys = cfg.model.keys(ImageKeys)
    assert isinstance(keys, ImageKeys) and keys.img_size == 16 and cfg.data.keys(AudioDataKeys).max_tokens == 5
    keys.img_size = 64
    assert cfg.model.keys(ImageKeys).img_size == 64 and cfg.to_dict()["model"]["img_size"] == 64
    assert cfg.value("model.img_size") == 64 and cfg.value("data.max_tokens") == 5 and cfg.value("seed") == 1
    cfg.set_value("model.conv_pos_width", 7)
    assert cfg.model.keys(AudioKeys).conv_pos_width == 7
    with pytest.raises(ConfigError, match="model.conv_pos_width: expected int"):
        cfg.set_value("model.conv_pos_width", "wide")
    with pytest.raises(TypeError, match="AudioDataKeys is not the model keys of a registered modality"):
        cfg.model.keys(AudioDataKeys)


def test_config_yaml_names_the_keys_flat_as_before():
    run = load_config("tiny_image", ["model.img_size=16"]).run_dict()
    assert run["model"]["img_size"] == 16 and "modality_keys" not in run["model"]
    assert "conv_feature_layers" not in run["model"] and "max_tokens" not in run["data"]
    full = Config().to_dict()
    assert full["model"]["conv_feature_layers"][0] == [512, 10, 5] and full["data"]["max_tokens"] is None


@pytest.mark.parametrize("section", ["model", "data", "decoder", "masking", "teacher", "train", "parallel", "profiling"])
def test_a_misspelt_attribute_raises(section):
    cfg = load_config("tiny_image")
    with pytest.raises(AttributeError):
        setattr(getattr(cfg, section), "img_sise", 3)
    with pytest.raises(AttributeError):
        cfg.seeed = 3
    with pytest.raises(AttributeError):
        cfg.model.keys(ImageKeys).img_sise = 3


def test_the_budget_is_read_from_the_modality_s_typed_keys():
    from d2v2scale import modality_registry

    assert modality_registry.batch_budget(load_config("tiny_image", ["data.max_tokens=5"])) is None
    cfg = load_config("audio_base")
    assert modality_registry.batch_budget(cfg) == 1_000_000
    cfg.set_value(f"data.{modality_registry.get('audio').budget_key}", 640_000)
    assert modality_registry.batch_budget(cfg) == 640_000


# ---------------------------------------------------------------------------------------------
# validation messages: one line, naming the key and the allowed values


@pytest.mark.parametrize("override, says", [("profiling.trace_start=-1", "profiling.trace_start=-1"),
                                            ("profiling.trace_steps=0", "profiling.trace_steps=0")])
def test_profiling_keys_are_validated(override, says):
    msg = _error("tiny_image", override)
    assert says in msg and "allowed values" in msg


def test_profiling_enabled_must_be_a_bool():
    cfg = load_config("tiny_image")
    cfg.profiling.enabled = 1  # type: ignore[assignment]
    from d2v2scale.config import validate

    with pytest.raises(ConfigError, match="profiling.enabled=1 is not allowed; allowed values: true, false"):
        validate(cfg)


def test_unknown_key():
    msg = _error("tiny_image", "model.foo=1")
    assert "model.foo" in msg and "allowed keys" in msg and "embed_dim" in msg


def test_unknown_section():
    msg = _error("tiny_image", "modle.depth=3")
    assert "modle" in msg and "allowed sections" in msg and "model" in msg and "train" in msg


def test_unknown_top_level_key():
    msg = _error("tiny_image", "sed=3")
    assert "sed" in msg and "seed" in msg


def test_malformed_override():
    msg = _error("tiny_image", "train.max_updates")
    assert "section.key=value" in msg


def test_wrong_type():
    msg = _error("tiny_image", "model.depth=abc")
    assert "model.depth" in msg and "int" in msg and "abc" in msg
    msg = _error("tiny_image", "model.instance_norm_target_layer=3")
    assert "model.instance_norm_target_layer" in msg and "bool" in msg


def test_tp_must_divide_heads():
    msg = _error("vit_h", "parallel.tp=3")
    assert "parallel.tp=3" in msg and "num_heads=16" in msg
    assert "1, 2, 4, 8, 16" in msg


@pytest.mark.parametrize("value", ["1.2", "0", "1", "-0.1"])
def test_mask_ratio_outside_unit_interval(value):
    msg = _error("tiny_image", f"masking.mask_prob={value}")
    assert "masking.mask_prob" in msg and "0 < mask_prob < 1" in msg


def test_clone_batch_zero():
    msg = _error("tiny_image", "model.clone_batch=0")
    assert "model.clone_batch=0" in msg and ">= 1" in msg


def test_top_k_exceeds_depth():
    msg = _error("tiny_image", "model.average_top_k_layers=4")
    assert "model.average_top_k_layers" in msg and "1..3" in msg


def test_bad_enum_values():
    msg = _error("tiny_image", "data.kind=imagenet")
    assert "data.kind" in msg and "synthetic" in msg and "digits" in msg
    msg = _error("tiny_image", "model.modality=video")
    assert "model.modality" in msg and "image" in msg and "audio" in msg and "text" in msg


def test_missing_preset_name():
    msg = _error("vit_z")
    assert "vit_z" in msg and "vit_b" in msg and "tiny_image" in msg


def test_missing_preset_path(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    msg = _error(missing)
    assert "nope.yaml" in msg and "does not exist" in msg


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    msg = _error(str(path))
    assert "broken.yaml" in msg and "YAML" in msg


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON

EXPECTED_OPT = {  # name: (lr, betas, eps, weight_decay, warmup, clip, micro)
    "vit_b": (1e-3, [0.9, 0.95], 1e-8, 0.05, 50040, 4.0, 16),
    "vit_l": (4e-4, [0.9, 0.95], 1e-8, 0.05, 50040, 4.0, 8),
    "vit_h": (4e-4, [0.9, 0.95], 1e-8, 0.05, 50040, 4.0, 8),
    "audio_base": (7.5e-4, [0.9, 0.98], 1e-6, 0.01, 8000, 0.0, "auto"),
    "audio_large": (4e-4, [0.9, 0.98], 1e-6, 0.01, 10000, 1.0, "auto"),
    "text_base": (2e-4, [0.9, 0.98], 1e-6, 0.01, 4000, 1.0, 2),
}


def _ds(name: str) -> dict:
    return json.loads((DS_DIR / f"{name}.json").read_text())


def test_ds_config_files():
    names = sorted(p.stem for p in DS_DIR.glob("*.json"))
    assert set(PUBLISHED) | {"cpu_tiny"} <= set(names)
    for name in names:
        ds = _ds(name)  # valid JSON
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "optimizer", "scheduler", "gradient_clipping", "zero_optimization"):
            assert key in ds, f"{name}.json lacks {key}"
        assert ds["train_batch_size"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
        assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
        assert ds["scheduler"]["type"] == "WarmupCosineLR"
        sp = ds["scheduler"]["params"]
        assert sp["total_num_steps"] == "auto" and sp["warmup_min_ratio"] == 0 and sp["cos_min_ratio"] == 0
        assert sp["warmup_type"] == "linear"  # the reference warms up linearly; DeepSpeed's default is log
        assert ds["zero_optimization"]["stage"] in (0, 1, 2, 3)
        assert not ds.get("fp16", {}).get("enabled", False)  # no fp16 (not on CPU, bf16 on GPU)


@pytest.mark.parametrize("name", PUBLISHED)
def test_ds_config_matches_reference(name):
    ds = _ds(name)
    lr, betas, eps, wd, warmup, clip, micro = EXPECTED_OPT[name]
    p = ds["optimizer"]["params"]
    assert (p["lr"], p["betas"], p["eps"], p["weight_decay"]) == (lr, betas, eps, wd)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == warmup
    assert ds["gradient_clipping"] == clip
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["bf16"]["enabled"] is True
    cfg = load_config(name)
    assert ds["scheduler"]["params"]["warmup_num_steps"] < cfg.train.max_updates
    if micro != "auto":
        assert cfg.train.global_batch % micro == 0


def test_cpu_tiny_ds_config_is_fp32():
    ds = _ds("cpu_tiny")
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 1
    for name in TINY:
        cfg = load_config(name)
        assert ds["scheduler"]["params"]["warmup_num_steps"] < cfg.train.max_updates


def test_scheduler_params_match_installed_deepspeed():
    """Read WarmupCosineLR's signature from the installed DeepSpeed source without importing it."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        missing_dependency("deepspeed is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "runtime" / "lr_schedules.py"
    tree = ast.parse(src.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "WarmupCosineLR")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    accepted = {a.arg for a in init.args.args} - {"self", "optimizer"}
    for name in list(PUBLISHED) + ["cpu_tiny"]:
        assert set(_ds(name)["scheduler"]["params"]) <= accepted, name


# ---------------------------------------------------------------------------------------------
# keys a resume may change, read from the schema

RESUMABLE_BEFORE_36 = (  # d2v2scale/train/run.py's literal list when the metadata replaced it
    "preset", "train.max_updates", "train.allow_long_warmup", "train.log_every", "train.save_every", "train.keep_last",
    "train.max_consecutive_skips", "train.warn_target_var", "train.warn_pred_var", "train.warn_layer_spread_ratio",
    "train.batch_scaling", "train.hang_timeout_s", "train.setup_timeout_s",
    "data.num_workers", "data.prefetch_steps", "data.path", "data.index_cache",
    "profiling.enabled", "profiling.trace_start", "profiling.trace_steps",
    "parallel.tp", "parallel.backend", "train.checkpoint_format",
    "model.compile", "model.cuda_graphs", "model.activation_checkpointing", "model.kernels",
)


def test_resumable_keys_come_from_the_fields_metadata():
    from d2v2scale.config import HOW_THE_MODEL_RUNS, resumable_keys

    keys = resumable_keys()
    added_since = {"data.allow_changed"}  # a resume may pass it: it says whether a changed data set is refused
    assert len(keys) == len(set(keys)) and set(keys) == set(RESUMABLE_BEFORE_36) | added_since
    assert {f"model.{k}" for k in HOW_THE_MODEL_RUNS} == {k for k in keys if k.startswith("model.")}
