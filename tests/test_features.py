"""python -m d2v2scale.features on real files: padding never changes an item's features,
mean pooling ignores padding, decoding matches training, errors are one line."""
import numpy as np
import pytest
import soundfile
import torch

from d2v2scale.config import load_config
from d2v2scale.convert import main as convert_main
from d2v2scale.weights import FORMAT
from d2v2scale.data.audio import load_audio
from d2v2scale.features import main as features_main
from d2v2scale.model import Data2Vec2

from conftest import FIXTURE

CLIP_SAMPLES = [4000, 7100, 5500, 9000, 4321]  # deliberately unsorted, all different


def _weights(tmp_path, preset: str) -> str:
    cfg = load_config(preset)
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec())
    path = tmp_path / f"{preset}.pt"
    torch.save({"format": FORMAT, "config": cfg.to_dict(), "student": model.state_dict(), "teacher": None}, path)
    return str(path)


@pytest.fixture(scope="module")
def audio_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio")
    clips = tmp / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for k, n in enumerate(CLIP_SAMPLES):
        wav = (0.3 * np.sin(np.arange(n) * (0.01 + 0.003 * k)) + 0.05 * rng.standard_normal(n)).astype(np.float32)
        soundfile.write(clips / f"clip{k}.wav", wav, 16_000, subtype="PCM_16")
    return tmp, clips, _weights(tmp, "tiny_audio")


def _read(path):
    z = np.load(path)
    names, lengths, feats = list(z["names"]), z["lengths"], torch.from_numpy(z["features"])
    return names, list(torch.split(feats, lengths.tolist())) if len(feats) != len(names) else list(feats), lengths


def test_padded_batch_equals_each_clip_alone_and_mean_skips_padding(audio_case, tmp_path):
    _, clips, weights = audio_case
    for batch in (5, 1):
        assert features_main([weights, str(clips), str(tmp_path / f"none{batch}.npz"), "--pool", "none",
                              "--batch", str(batch)]) == 0
    names, together, lengths = _read(tmp_path / "none5.npz")
    names1, alone, _ = _read(tmp_path / "none1.npz")
    assert names == names1 == [str(clips / f"clip{k}.wav") for k in range(len(CLIP_SAMPLES))]
    # frames per clip follow the CNN arithmetic of each clip's own length, not the padded length
    model = Data2Vec2(load_config("tiny_audio").model_spec())
    assert lengths.tolist() == model.encoder.local_encoder.output_lengths(torch.tensor(CLIP_SAMPLES)).tolist()
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    assert features_main([weights, str(clips), str(tmp_path / "mean.npz"), "--pool", "mean", "--batch", "5"]) == 0
    _, pooled, _ = _read(tmp_path / "mean.npz")
    for p, frames in zip(pooled, alone):
        torch.testing.assert_close(p, frames.mean(0), atol=1e-5, rtol=0)


def test_layer_selection(audio_case, tmp_path):
    _, clips, weights = audio_case
    out = {}
    for layer in ("-1", "2", "0", "mean"):
        assert features_main([weights, str(clips), str(tmp_path / f"l{layer}.npz"), "--layer", layer]) == 0
        out[layer] = torch.from_numpy(np.load(tmp_path / f"l{layer}.npz")["features"])
    torch.testing.assert_close(out["-1"], out["2"], atol=0, rtol=0)  # tiny_audio has 3 shared blocks
    assert not torch.allclose(out["0"], out["-1"])
    # the mean over blocks, computed directly on one clip without padding
    model = Data2Vec2(load_config("tiny_audio").model_spec())
    model.load_state_dict(torch.load(weights, weights_only=True)["student"])
    model.eval()
    wav = torch.from_numpy(load_audio(clips / "clip0.wav"))[None]
    with torch.inference_mode():
        per_block = [model.extract_features(wav, None, k)[0] for k in range(3)]
    torch.testing.assert_close(out["mean"][0], torch.stack(per_block).mean(0)[0].mean(0), atol=1e-5, rtol=0)


def test_load_audio_decodes_resamples_and_normalises(tmp_path):
    n = 8000
    wav = (0.5 * np.sin(np.arange(n) * 0.05) + 0.2).astype(np.float32)
    soundfile.write(tmp_path / "a8k.flac", wav, 8000)
    soundfile.write(tmp_path / "a16k_float.wav", wav, 16_000, subtype="FLOAT")
    x8 = load_audio(tmp_path / "a8k.flac")
    x16 = load_audio(tmp_path / "a16k_float.wav")
    assert abs(len(x8) - 2 * n) <= 2 and len(x16) == n
    assert x16.dtype == np.float32
    for x in (x8, x16):
        assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    expected = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)
    np.testing.assert_allclose(x16, expected, atol=1e-5)


def test_fixture_features_through_npy_inputs(tmp_path, fairseq_fixture):
    weights = tmp_path / "converted.pt"
    assert convert_main(["from-fairseq", str(FIXTURE), str(weights), "model.num_heads=2"]) == 0
    np.save(tmp_path / "x.npy", fairseq_fixture["source"].numpy())
    assert features_main([str(weights), str(tmp_path / "x.npy"), str(tmp_path / "f.npy"), "--pool", "none"]) == 0
    feats = torch.from_numpy(np.load(tmp_path / "f.npy"))
    # the student's unmasked last-block features of the reference implementation
    torch.testing.assert_close(feats, fairseq_fixture["features_unmasked"], atol=1e-5, rtol=0)


def test_image_folder_and_text_token_file(tmp_path):
    from PIL import Image

    images = tmp_path / "imgs" / "class_a"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(40, 30), (32, 64), (50, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{k}.png")
    (images / "notes.md").write_text("not an image")
    weights = _weights(tmp_path, "tiny_image")
    assert features_main([weights, str(tmp_path / "imgs"), str(tmp_path / "img.npy")]) == 0
    cfg = load_config("tiny_image")
    assert np.load(tmp_path / "img.npy").shape == (3, cfg.model.embed_dim)

    tokens = tmp_path / "ids.txt"
    tokens.write_text("0 5 6 7 8 9\n0 12 13\n\n0 20 21 22 23 24 25 26 27\n")
    weights = _weights(tmp_path, "tiny_text")
    assert features_main([weights, str(tokens), str(tmp_path / "t.npz"), "--pool", "none", "--batch", "3"]) == 0
    names, together, lengths = _read(tmp_path / "t.npz")
    assert lengths.tolist() == [6, 3, 9] and names == ["ids.txt:1", "ids.txt:2", "ids.txt:4"]
    assert features_main([weights, str(tokens), str(tmp_path / "t1.npz"), "--pool", "none", "--batch", "1"]) == 0
    for a, b in zip(together, _read(tmp_path / "t1.npz")[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_file_that_does_not_decode_is_skipped_with_one_line(audio_case, tmp_path, capsys):
    _, clips, weights = audio_case
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k in range(2):
        (folder / f"clip{k}.wav").write_bytes((clips / f"clip{k}.wav").read_bytes())
    (folder / "broken.wav").write_bytes(b"RIFF" + bytes(60))
    assert features_main([weights, str(folder), str(tmp_path / "f.npz")]) == 0
    err = capsys.readouterr().err
    assert err.count("broken.wav") == 1 and "Traceback" not in err
    assert len(np.load(tmp_path / "f.npz")["names"]) == 2


def test_cli_errors_are_one_line_with_exit_2(audio_case, tmp_path, capsys):
    _, clips, weights = audio_case
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    manifest = tmp_path / "bad.tsv"
    manifest.write_text(f"{clips}\nclip0.wav\tabc\n")
    cases = [
        ([str(tmp_path / "nope.pt"), str(clips), str(tmp_path / "o.npz")], "does not exist"),
        ([weights, str(tmp_path / "nothing_here"), str(tmp_path / "o.npz")], "does not exist"),
        ([weights, str(images), str(tmp_path / "o.npz")], "holds no audio files"),
        ([weights, str(manifest), str(tmp_path / "o.npz")], "expected 'relative/path<TAB>num_samples'"),
        ([weights, str(clips), str(tmp_path / "o.npz"), "--layer", "7"], "this model has 3 blocks"),
        ([weights, str(clips), str(tmp_path / "o.npz"), "--layer", "last"], "allowed values"),
        ([weights, str(clips), str(tmp_path / "o.npy"), "--pool", "none"], "different lengths"),
        ([weights, str(clips), str(tmp_path / "o.csv")], "must end in .npz or .npy"),
        ([weights, str(clips), str(tmp_path / "o.npz"), "--pool", "max"], "invalid choice"),
    ]
    for argv, message in cases:
        try:
            code = features_main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, argv
        assert len(err) == 1 and message in err[0], (argv, err)
