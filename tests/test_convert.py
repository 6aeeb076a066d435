"""fairseq ⇄ d2v2scale conversion against fairseq's own layouts (tests/fixtures/fairseq/fairseq_layouts):
every key, shape and config field of the official module tree, parity through the public
converter, and one-line errors."""
import json
from enum import Enum

import pytest
import torch

from d2v2scale.config import config_from_dict
from d2v2scale.convert import main as convert_main
from d2v2scale.weights import FORMAT
from d2v2scale.interop.fairseq import KeyMappingError, from_fairseq
from d2v2scale.interop.fairseq_config import fairseq_defaults, parse_conv_spec
from d2v2scale.modalities.audio import AudioKeys
from d2v2scale.modalities.image import ImageKeys
from d2v2scale.modalities.text import TextKeys
from d2v2scale.model import Data2Vec2, normalize_loss
from d2v2scale.model.masking import mask_from_bool
from d2v2scale.train.teacher import build_teacher

from conftest import FAIRSEQ_FIXTURES, FIXTURE, REGENERATE

LAYOUTS = FAIRSEQ_FIXTURES / "fairseq_layouts"
MODALITIES = ["image", "audio", "text"]


def _layout(modality: str) -> dict:
    path = LAYOUTS / f"{modality}.json"
    if not path.is_file():
        pytest.fail(f"fixture missing: {path} (it is part of the repository; to remake it: {REGENERATE})")
    return json.loads(path.read_text())


def _official_checkpoint(tmp_path, modality: str, with_cfg: bool = True):
    """Random tensors in fairseq's official key layout, saved as a released checkpoint would be."""
    layout = _layout(modality)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in layout["shapes"]["model"].items()}
    state["_ema"] = {k: torch.randn(shape, generator=g) for k, shape in layout["shapes"]["_ema"].items()}
    path = tmp_path / f"{modality}_fairseq.pt"
    torch.save({"model": state, "cfg": {"model": layout["cfg_model"]}} if with_cfg else {"model": state}, path)
    return path, state, layout["cfg_model"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("modality", MODALITIES)
def test_official_layout_round_trips_with_no_flags(tmp_path, modality):
    path, state, cfg_model = _official_checkpoint(tmp_path, modality)
    ours, back = tmp_path / "ours.pt", tmp_path / "back.pt"
    assert convert_main(["from-fairseq", str(path), str(ours)]) == 0
    assert convert_main(["to-fairseq", str(ours), str(back)]) == 0
    returned = torch.load(back, weights_only=True)
    assert returned["model"].keys() == state.keys()
    assert returned["model"]["_ema"].keys() == state["_ema"].keys()
    for k, v in state.items():
        if k != "_ema":
            assert torch.equal(returned["model"][k], v), k
    for k, v in state["_ema"].items():
        assert torch.equal(returned["model"]["_ema"][k], v), k
    # the exported cfg.model is fairseq's own config for this model, field for field
    assert returned["cfg"]["model"] == cfg_model


def _expected(cfg_model: dict, modality: str) -> dict:
    """What each fairseq field means in our schema, written out by hand from the fairseq sources."""
    mod, dec = cfg_model["modalities"][modality], cfg_model["modalities"][modality]["decoder"]
    return {
        "model.embed_dim": cfg_model["embed_dim"], "model.depth": cfg_model["depth"],
        "model.num_heads": cfg_model["num_heads"], "model.norm_eps": cfg_model["norm_eps"],
        "model.prenet_depth": mod["prenet_depth"], "model.clone_batch": cfg_model["clone_batch"],
        "model.average_top_k_layers": cfg_model["average_top_k_layers"],
        "model.instance_norm_target_layer": cfg_model["instance_norm_target_layer"],
        "model.layer_norm_targets": cfg_model["layer_norm_targets"],
        "model.encoder_dropout": cfg_model["encoder_dropout"], "model.attention_dropout": cfg_model["attention_dropout"],
        "model.post_mlp_dropout": cfg_model["post_mlp_drop"], "model.mask_noise_std": mod["mask_noise_std"],
        "decoder.dim": dec["decoder_dim"], "decoder.kernel": dec["decoder_kernel"], "decoder.layers": dec["decoder_layers"],
        "decoder.groups": dec["decoder_groups"], "decoder.residual": dec["decoder_residual"],
        "decoder.projection_layers": dec["projection_layers"], "decoder.input_dropout": dec["input_dropout"],
        "masking.mask_prob": mod["mask_prob"], "masking.mask_length": mod["mask_length"],
        "teacher.ema_decay": cfg_model["ema_decay"], "teacher.ema_encoder_only": cfg_model["ema_encoder_only"],
        "teacher.ema_local_encoder": mod["ema_local_encoder"],
    }


@pytest.mark.parametrize("modality", MODALITIES)
def test_config_is_read_from_the_checkpoint(tmp_path, modality):
    path, _, cfg_model = _official_checkpoint(tmp_path, modality)
    assert convert_main(["from-fairseq", str(path), str(tmp_path / "ours.pt")]) == 0
    cfg = config_from_dict(torch.load(tmp_path / "ours.pt", weights_only=True)["config"])
    for key, want in _expected(cfg_model, modality).items():
        assert cfg.value(key) == want, key
    if modality == "audio":
        a = cfg.model.keys(AudioKeys)
        assert a.conv_feature_layers == [[64, 10, 5]] + [[64, 3, 2]] * 4 + [[64, 2, 2]] * 2
        assert (a.conv_pos_width, a.conv_pos_depth, a.conv_pos_groups) == (15, 3, 16)
        assert a.use_alibi
    if modality == "text":
        t = cfg.model.keys(TextKeys)
        assert (t.vocab_size, t.max_positions, t.embed_dropout) == (1000, 128, 0.0)
        assert cfg.decoder.projection_ratio == 2.0
    if modality == "image":
        i = cfg.model.keys(ImageKeys)
        assert (i.img_size, i.patch_size, cfg.model.num_extra_tokens) == (224, 16, 1)


def test_defaults_match_fairseq_dataclasses():
    """Our copy of fairseq's defaults against the untouched sections of the official configs
    (the image checkpoint's audio/text sections and so on are fairseq's defaults)."""
    defaults = fairseq_defaults()["modalities"]
    for modality in MODALITIES:
        cfg_model = _layout(modality)["cfg_model"]
        for other in MODALITIES:
            if other != modality:
                expected = dict(cfg_model["modalities"][other])
                got = dict(defaults[other])
                for interpolated in ("num_alibi_heads", "model_depth"):  # II("model.num_heads"), II("model.depth")
                    expected.pop(interpolated), got.pop(interpolated)
                assert got == expected, (modality, other)


def test_text_teacher_is_model_blocks_in_fairseq():
    layout = _layout("text")["shapes"]
    state = {k: torch.zeros(s) for k, s in layout["model"].items()}
    state["_ema"] = {k: torch.zeros(s) for k, s in layout["_ema"].items()}
    _, teacher = from_fairseq(state, "text", ema_encoder_only=True)
    assert set(teacher) == {f"blocks.{k}" for k in layout["_ema"]}
    with pytest.raises(KeyMappingError, match="ema_encoder_only=False"):
        from_fairseq(state, "text", ema_encoder_only=False)


def test_audio_conv_positions_sit_one_index_later_in_fairseq():
    layout = _layout("audio")["shapes"]["model"]
    student, _ = from_fairseq({k: torch.zeros(s) for k, s in layout.items()}, "audio")
    assert "encoder.relative_positional_encoder.0.0.weight" in student
    assert "encoder.relative_positional_encoder.2.0.weight" in student
    assert "encoder.relative_positional_encoder.3.0.weight" not in student


def test_conv_spec_parser():
    assert parse_conv_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]") == \
        [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


def test_image_parity_through_the_public_converter(tmp_path, fairseq_fixture):
    out = tmp_path / "converted.pt"
    # the fixture is a bare state_dict: the architecture comes from shapes, the rest from overrides
    assert convert_main(["from-fairseq", str(FIXTURE), str(out), "model.num_heads=2", "model.clone_batch=4",
                         "model.average_top_k_layers=3", "model.mask_noise_std=0", "model.norm_eps=1e-6"]) == 0
    blob = torch.load(out, weights_only=True)
    assert blob["format"] == FORMAT
    cfg = config_from_dict(blob["config"])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.keys(ImageKeys).img_size, cfg.decoder.layers) == (64, 3, 224, 2)
    model = Data2Vec2(cfg.model_spec())
    model.load_state_dict(blob["student"], strict=True)
    teacher = build_teacher(model, cfg)
    teacher.module.load_state_dict(blob["teacher"], strict=True)
    model.train()
    fx = fairseq_fixture
    out = model(fx["source"], model.teacher_fn(teacher.module), mask_from_bool(fx["precomputed_mask"]))
    assert abs(normalize_loss(out).item() - fx["loss"]) < 1e-5


def test_round_trip_of_the_parity_fixture_is_identical(tmp_path, fairseq_fixture):
    src, back = tmp_path / "converted.pt", tmp_path / "back.pt"
    # options and overrides in any order, after the positional arguments too
    assert convert_main(["from-fairseq", str(FIXTURE), str(src), "model.num_heads=2", "--preset", "vit_b",
                         "model.clone_batch=4"]) == 0
    assert convert_main(["to-fairseq", str(src), str(back)]) == 0
    original, returned = fairseq_fixture["state_dict"], torch.load(back, weights_only=True)["model"]
    assert set(returned) == set(original) and set(returned["_ema"]) == set(original["_ema"])
    assert all(torch.equal(returned[k], v) for k, v in original.items() if k != "_ema")
    assert all(torch.equal(returned["_ema"][k], v) for k, v in original["_ema"].items())


def test_the_cls_weighting_comes_from_fairseqs_per_gpu_batch(tmp_path, capsys):
    """fairseq's CLS weight followed its per-GPU batch (``cfg.dataset.batch_size``): it becomes
    model.cls_loss_reference_micro_batch; without it the preset's value is used and a note says so
    (an override silences it); to-fairseq says which batch_size keeps the objective in fairseq."""
    path, _, _ = _official_checkpoint(tmp_path, "image")
    plain = torch.load(path, weights_only=True)
    with_batch = tmp_path / "with_batch.pt"
    torch.save({**plain, "cfg": {**plain["cfg"], "dataset": {"batch_size": 8}}}, with_batch)

    def convert(src, *overrides) -> tuple[int, str]:
        assert convert_main(["from-fairseq", str(src), str(tmp_path / "o.pt"), *overrides]) == 0
        blob = torch.load(tmp_path / "o.pt", weights_only=True)
        return config_from_dict(blob["config"]).model.cls_loss_reference_micro_batch, capsys.readouterr().out

    ref, out = convert(with_batch)
    assert ref == 8 and "note:" not in out
    assert convert_main(["to-fairseq", str(tmp_path / "o.pt"), str(tmp_path / "back.pt")]) == 0
    assert "note: to continue this objective in fairseq, train with dataset.batch_size=8 per GPU" in capsys.readouterr().out
    ref, out = convert(path)
    assert ref == 16 and "note: model.cls_loss_reference_micro_batch=16 (preset vit_b): the checkpoint does not " \
                         "record the per-GPU batch" in out
    ref, out = convert(path, "model.cls_loss_reference_micro_batch=4")
    assert ref == 4 and "note:" not in out


@pytest.mark.parametrize("modality, message", [
    ("image", "model.num_heads is not recoverable from tensors; pass model.num_heads=N or --preset"),
    ("audio", "model.num_heads is not recoverable from tensors"),
])
def test_without_embedded_config_it_names_what_is_missing(tmp_path, capsys, modality, message):
    path, _, _ = _official_checkpoint(tmp_path, modality, with_cfg=False)
    assert convert_main(["from-fairseq", str(path), str(tmp_path / "o.pt")]) == 2
    assert message in _one_error_line(capsys)
    if modality == "audio":
        assert convert_main(["from-fairseq", str(path), str(tmp_path / "o.pt"), "model.num_heads=2"]) == 2
        assert "CNN strides are not recoverable" in _one_error_line(capsys)
        spec = "[[64,10,5],[64,3,2],[64,3,2],[64,3,2],[64,3,2],[64,2,2],[64,2,2]]"
        assert convert_main(["from-fairseq", str(path), str(tmp_path / "o.pt"), "model.num_heads=2",
                             f"model.conv_feature_layers={spec}"]) == 0


def _edited_cfg(tmp_path, modality: str, edit) -> str:
    path, state, cfg_model = _official_checkpoint(tmp_path, modality)
    edit(cfg_model)
    torch.save({"model": state, "cfg": {"model": cfg_model}}, path)
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(layer_norm_first=True), "cfg.model.layer_norm_first=True is not supported (blocks are post-LN"),
    (lambda c: c.update(end_drop_path_rate=0.1), "cfg.model.end_drop_path_rate=0.1 is not supported"),
    (lambda c: c.update(some_new_field=3), "unknown fairseq field(s) some_new_field"),
    (lambda c: c["modalities"]["image"].update(mask_dropout=0.2), "modalities.image.mask_dropout=0.2 is not supported"),
    (lambda c: c["modalities"]["image"]["decoder"].update(add_positions_all=True), "decoder.add_positions_all=True"),
])
def test_fields_it_cannot_honour_are_refused_by_name(tmp_path, capsys, edit, message):
    assert convert_main(["from-fairseq", _edited_cfg(tmp_path, "image", edit), str(tmp_path / "o.pt")]) == 2
    assert message in _one_error_line(capsys)


class Opaque:  # stands in for the omegaconf objects in released checkpoints
    pass


def test_untrusted_pickles_need_the_opt_in(tmp_path, capsys):
    path = tmp_path / "released.pt"
    torch.save({"model": {}, "cfg": Opaque()}, path)
    assert convert_main(["from-fairseq", str(path), str(tmp_path / "o.pt")]) == 2
    assert "--trust_checkpoint" in _one_error_line(capsys)


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    weights, _, _ = _official_checkpoint(tmp_path, "image")
    cases = [
        (["from-fairseq", str(tmp_path / "missing.pt"), "o.pt"], "does not exist"),
        (["from-fairseq", str(tmp_path), "o.pt"], "is not a file"),
        (["from-fairseq", str(text_file), "o.pt"], "is not a PyTorch checkpoint"),
        (["from-fairseq", str(weights), str(tmp_path / "o.pt"), "model.no_such_key=1"], "unknown key 'model.no_such_key'"),
        (["to-fairseq", str(tmp_path / "missing"), "o.pt"], "does not exist"),
        (["to-fairseq", str(weights), "o.pt"], "is a fairseq checkpoint (convert it first"),
        (["to-fairseq", str(tmp_path), "o.pt"], "not a training checkpoint"),
        (["sideways", "a", "b"], "invalid choice"),
    ]
    for argv, message in cases:
        try:
            code = convert_main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code
        assert code == 2, argv
        assert message in _one_error_line(capsys), argv


class Modality(Enum):  # fairseq's examples.data2vec.data.modality.Modality
    AUDIO = "AUDIO"
    IMAGE = "IMAGE"
    TEXT = "TEXT"


def test_released_omegaconf_checkpoint_with_trust(tmp_path, capsys):
    """A released file: cfg is an omegaconf DictConfig (with fairseq's Modality enum) inside the pickle."""
    from omegaconf import OmegaConf

    path, state, cfg_model = _official_checkpoint(tmp_path, "audio")
    with_enums = json.loads(json.dumps(cfg_model))
    with_enums["modalities"]["audio"]["type"] = Modality.AUDIO
    torch.save({"model": state, "cfg": OmegaConf.create({"model": with_enums, "task": {"_name": "audio_pretraining"}})},
               path)
    assert convert_main(["from-fairseq", str(path), str(tmp_path / "o.pt")]) == 2
    assert "--trust_checkpoint" in _one_error_line(capsys)
    assert convert_main(["from-fairseq", str(path), str(tmp_path / "o.pt"), "--trust_checkpoint"]) == 0
    assert convert_main(["to-fairseq", str(tmp_path / "o.pt"), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["cfg"]["model"] == cfg_model
    assert all(torch.equal(back["model"][k], v) for k, v in state.items() if k != "_ema")
