"""fairseq ⇄ d2v2scale conversion: parity through the public converter, exact round trips, errors."""
import pytest
import torch

from d2v2scale.config import load_config
from d2v2scale.convert import FORMAT, main as convert_main
from d2v2scale.interop.fairseq import KeyMappingError, from_fairseq, to_fairseq
from d2v2scale.model import Data2Vec2
from d2v2scale.model.masking import mask_from_bool
from d2v2scale.teacher import build_teacher

from conftest import FIXTURE


def test_image_parity_through_the_public_converter(tmp_path, fairseq_fixture):
    out = tmp_path / "converted.pt"
    # the fixture is a plain dict of tensors and floats: it loads without --trust_checkpoint
    assert convert_main(["from-fairseq", str(FIXTURE), str(out), "model.num_heads=2", "model.clone_batch=4",
                         "model.average_top_k_layers=3", "model.mask_noise_std=0", "model.norm_eps=1e-6"]) == 0
    blob = torch.load(out, weights_only=True)
    assert blob["format"] == FORMAT
    from d2v2scale.config import config_from_dict

    cfg = config_from_dict(blob["config"])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.img_size, cfg.decoder.layers) == (64, 3, 224, 2)
    model = Data2Vec2(cfg)
    model.load_state_dict(blob["student"], strict=True)
    teacher = build_teacher(model, cfg)
    teacher.module.load_state_dict(blob["teacher"], strict=True)
    model.train()
    fx = fairseq_fixture
    out = model(fx["source"], teacher.module, mask_from_bool(fx["precomputed_mask"]))
    assert abs((out.loss_sum / out.sample_size).item() - fx["loss"]) < 1e-5


def test_round_trip_fairseq_d2v2scale_fairseq_is_identical(tmp_path, fairseq_fixture):
    src = tmp_path / "converted.pt"
    back = tmp_path / "back.pt"
    assert convert_main(["from-fairseq", str(FIXTURE), str(src), "model.num_heads=2"]) == 0
    assert convert_main(["to-fairseq", str(src), str(back)]) == 0
    original, returned = fairseq_fixture["state_dict"], torch.load(back, weights_only=True)
    assert set(returned) == set(original) and set(returned["_ema"]) == set(original["_ema"])
    for k, v in original.items():
        if k != "_ema":
            assert torch.equal(returned[k], v), k
    for k, v in original["_ema"].items():
        assert torch.equal(returned["_ema"][k], v), k


@pytest.mark.parametrize("preset", ["tiny_audio", "tiny_text"])
def test_audio_and_text_layouts_round_trip(tmp_path, preset):
    cfg = load_config(preset)
    model = Data2Vec2(cfg)
    teacher = build_teacher(model, cfg)
    fairseq = to_fairseq(model.state_dict(), teacher.module.state_dict(), cfg.model.modality)
    tag = "AUDIO" if preset == "tiny_audio" else "TEXT"
    assert all(k.startswith((f"modality_encoders.{tag}.", "blocks.")) for k in fairseq if k != "_ema")
    if tag == "AUDIO":  # fairseq's TransposeLast wrappers shift these Sequential indices
        assert "modality_encoders.AUDIO.local_encoder.conv_layers.0.2.1.weight" in fairseq
        assert "modality_encoders.AUDIO.project_features.2.weight" in fairseq
        assert "modality_encoders.AUDIO.relative_positional_encoder.1.0.0.weight" in fairseq
    student, teacher_sd = from_fairseq(fairseq, cfg.model.modality)
    assert student.keys() == model.state_dict().keys()
    assert all(torch.equal(student[k], v) for k, v in model.state_dict().items())
    assert teacher_sd.keys() == teacher.module.state_dict().keys()


def test_conversion_errors_name_the_problem(tmp_path, fairseq_fixture):
    sd = dict(fairseq_fixture["state_dict"])
    sd["modality_encoders.IMAGE.something_new.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    assert convert_main(["from-fairseq", str(path), str(tmp_path / "o.pt"), "model.num_heads=2"]) == 2
    with pytest.raises(KeyMappingError, match="unknown fairseq key 'something.else'"):
        from_fairseq({"something.else": torch.zeros(1)}, "image")
    with pytest.raises(KeyMappingError, match="supported: image, audio, text"):
        from_fairseq({}, "video")


class Opaque:  # stands in for the omegaconf objects in released checkpoints
    pass


def test_untrusted_pickles_need_the_opt_in(tmp_path, capsys):
    path = tmp_path / "released.pt"
    torch.save({"model": {}, "cfg": Opaque()}, path)
    assert convert_main(["from-fairseq", str(path), str(tmp_path / "o.pt")]) == 2
    assert "--trust_checkpoint" in capsys.readouterr().err


def test_feature_extraction_entry_point(tmp_path, fairseq_fixture):
    import numpy as np

    from d2v2scale.features import main as features_main

    weights = tmp_path / "converted.pt"
    assert convert_main(["from-fairseq", str(FIXTURE), str(weights), "model.num_heads=2"]) == 0
    np.save(tmp_path / "x.npy", fairseq_fixture["source"].numpy())
    assert features_main([str(weights), str(tmp_path / "x.npy"), str(tmp_path / "f.npy"), "--pool", "none"]) == 0
    feats = torch.from_numpy(np.load(tmp_path / "f.npy"))
    # the student's unmasked last-block features of the reference implementation
    torch.testing.assert_close(feats, fairseq_fixture["features_unmasked"], atol=1e-5, rtol=0)
