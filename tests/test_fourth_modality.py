"""A modality from outside the package: 1-D multichannel sensor sequences (B, C, L), cut into
patches of ``model.sensor_patch`` samples and embedded by one linear layer, with fixed sinusoidal
positions. This file is the whole of it - its keys, checks, encoder, decoder, synthetic data,
positions and FLOPs - registered with :func:`d2v2scale.modality_registry.register` when imported; a run
names it under ``plugins`` and trains it through the launcher, no package file touched."""
from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from d2v2scale import modality_registry
from d2v2scale.config import Config, ConfigError, ModelConfig, load_config
from d2v2scale.modality_registry import Modality, register
from d2v2scale.model.decoder import Decoder1d
from d2v2scale.model.encoders import context_encoder, gather_kept

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).stem


@dataclass
class SensorKeys:
    sensor_channels: int = 3
    sensor_patch: int = 4


def sinusoid(positions: int, dim: int) -> torch.Tensor:
    """(T, D) fixed 1-D sin-cos positions."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    freq = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1).float()


class SensorEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        keys = cfg.keys(SensorKeys)
        self.patch, self.dim = keys.sensor_patch, cfg.embed_dim
        self.local_encoder = nn.Linear(keys.sensor_channels * keys.sensor_patch, cfg.embed_dim)
        self.context_encoder = context_encoder(cfg, with_norm=True)

    def reset_parameters(self) -> None:
        pass

    def local_features(self, x: torch.Tensor, lengths=None):
        b, c, length = x.shape
        t = length // self.patch
        patches = x[..., : t * self.patch].reshape(b, c, t, self.patch).permute(0, 2, 1, 3).reshape(b, t, -1)
        return self.local_encoder(patches), None

    def num_positions(self, x: torch.Tensor, lengths=None):
        return x.shape[-1] // self.patch, None

    def forward(self, x: torch.Tensor, valid, mask, clones: int = 1):
        x = x + sinusoid(x.shape[1], self.dim).to(x)
        if mask is not None:
            x = gather_kept(x, mask, clones)
        return self.context_encoder(x), None


class Sensor(Modality):
    name = "sensor"
    model_keys = SensorKeys

    def validate(self, cfg: Config) -> None:
        super().validate(cfg)
        patch = cfg.model.keys(SensorKeys).sensor_patch
        if (cfg.data.sample_length or 0) < patch:
            raise ConfigError(f"data.sample_length={cfg.data.sample_length} is shorter than one patch "
                              f"(model.sensor_patch={patch})")

    def encoder(self, model_cfg) -> nn.Module:
        return SensorEncoder(model_cfg)

    def decoder(self, spec, encoder) -> nn.Module:
        return Decoder1d(spec.decoder, spec.model.embed_dim)

    def synthetic_batch(self, cfg: Config, batch_size: int, generator) -> torch.Tensor:
        return torch.randn(batch_size, cfg.model.keys(SensorKeys).sensor_channels, cfg.data.sample_length,
                           generator=generator)

    def positions(self, cfg: Config, input_length: int) -> int:
        return cfg.data.sample_length // cfg.model.keys(SensorKeys).sensor_patch

    def local_encoder_flops(self, model_cfg, input_length: int, positions: int) -> float:
        keys = model_cfg.keys(SensorKeys)
        return 2.0 * positions * keys.sensor_channels * keys.sensor_patch * model_cfg.embed_dim


if "sensor" not in modality_registry.names():
    register(Sensor())

PRESET = {
    "plugins": [PLUGIN],
    "model": {"modality": "sensor", "sensor_channels": 3, "sensor_patch": 4, "embed_dim": 32, "depth": 2,
              "prenet_depth": 1, "num_heads": 4, "clone_batch": 2, "average_top_k_layers": 2, "norm_eps": 1e-5},
    "decoder": {"dim": 32, "kernel": 3, "layers": 2, "groups": 4},
    "masking": {"mask_prob": 0.5, "mask_length": 2, "inverse_mask": False},
    "teacher": {"ema_anneal_end_step": 10, "ema_local_encoder": True, "ema_encoder_only": False},
    "data": {"kind": "synthetic", "num_workers": 0, "sample_length": 64},
    "train": {"global_batch": 8, "max_updates": 2, "log_every": 1, "save_every": 2, "allow_long_warmup": True},
}


@pytest.fixture
def preset(tmp_path) -> Path:
    path = tmp_path / "tiny_sensor.yaml"
    path.write_text(yaml.safe_dump(PRESET))
    return path


def test_the_core_reads_the_sensor_modality_through_its_hooks(preset):
    """Config keys, checks, mask, positions and FLOPs come from the class above, compared with
    formulas written here; keys of other modalities stay out of the run's config."""
    from d2v2scale.planning.planner import positions_per_item
    from d2v2scale.profiling.flops import StepShape, forward_flops

    cfg = load_config(str(preset))
    keys = cfg.model.keys(SensorKeys)
    assert (keys.sensor_channels, keys.sensor_patch, cfg.mask_kind()) == (3, 4, "block1d")
    run = cfg.run_dict()
    assert run["plugins"] == [PLUGIN] and run["model"]["sensor_patch"] == 4
    assert not {"img_size", "conv_feature_layers", "vocab_size"} & set(run["model"])
    assert "max_tokens" not in run["data"]
    assert positions_per_item(cfg) == 64 // 4
    f = forward_flops(cfg, StepShape(samples=5, positions=16, kept=8))
    assert f["local_encoder"] == 5 * 2.0 * 16 * (3 * 4) * 32
    with pytest.raises(ConfigError, match="shorter than one patch"):
        load_config(str(preset), ["data.sample_length=2"])
    with pytest.raises(ConfigError, match="allowed values for sensor: 0"):
        load_config(str(preset), ["model.cls_loss=1.0"])
    with pytest.raises(ConfigError, match="data.kind=images is not data for model.modality=sensor"):
        load_config(str(preset), ["data.kind=images", "data.path=x"])

    from d2v2scale.data.synthetic import synthetic_batch
    from d2v2scale.model import Data2Vec2, normalize_loss

    model = Data2Vec2(cfg.model_spec())
    x = synthetic_batch(cfg, 2, torch.Generator().manual_seed(0))
    local, _ = model.encoder.local_features(x)
    assert x.shape == (2, 3, 64) and local.shape == (2, 16, 32)
    patch = x[1, :, 20:24].reshape(-1)  # the 6th patch of item 1, channel-major
    assert torch.allclose(local[1, 5], model.encoder.local_encoder(patch), atol=1e-6)
    teacher = model.teacher_copy()
    mask = model.make_mask(cfg.seed, 1, torch.arange(2), x)
    assert mask.mask.shape == (2 * cfg.model.clone_batch, 16)
    assert math.isfinite(normalize_loss(model(x, model.teacher_fn(teacher), mask, layerdrop_key=1)).item())


def test_an_unknown_plugin_is_one_line(preset):
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin'"):
        load_config(str(preset), ["plugins=[no_such_plugin]"])


def _checkpoint_files(tag: Path) -> dict:
    """Every file of a checkpoint tag, read here with torch.load (not the package's loader); a
    layout-free shard as its pieces by name (``model/<param>[start:stop]``, ``exp_avg/...``, ``teacher/...``)."""
    out = {}
    for path in sorted(tag.rglob("*.pt")):
        name, blob = path.relative_to(tag).as_posix(), torch.load(path, weights_only=True)
        if name.startswith("shards/"):
            blob = {f"{meta[0]}[{meta[3]}:{meta[4]}]": data for meta, data in zip(blob["pieces"], blob["data"])}
        out[name] = blob
    return out


def _differences(got, want, where: str = "") -> list[str]:
    """Where two loaded checkpoint files differ: tensors and arrays bit for bit, the rest by ==."""
    if isinstance(want, dict):
        if set(got) != set(want):
            return [f"{where}: keys {sorted(map(str, got))} != {sorted(map(str, want))}"]
        return [d for k in want for d in _differences(got[k], want[k], f"{where}/{k}" if where else str(k))]
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items != {len(want)}"]
        return [d for k, (g, w) in enumerate(zip(got, want)) for d in _differences(g, w, f"{where}[{k}]")]
    if isinstance(want, torch.Tensor):
        same = got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    elif type(want).__module__ == "numpy":
        same = type(got) is type(want) and bool((got == want).all())
    else:
        same = got == want
    return [] if same else [f"{where}: differs"]


@pytest.mark.slow
def test_the_sensor_modality_trains_and_resumes_through_the_launcher(preset, tmp_path):
    """Two processes (data parallel, gloo), the package as shipped; the run directory records the
    plugin, so the run resumes from its own config.yaml, and the resumed step 3 is the one the
    uninterrupted run took: a resume that did not load the weights, the teacher or AdamW's state
    from the checkpoint would train another step 3."""
    from d2v2scale.runfiles import read_metrics
    from d2v2scale.train.checkpoint import LATEST

    from test_deepspeed_training import _env, _torchrun

    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    run = tmp_path / "run"
    # a warm-up at the full learning rate and a fast teacher, so that the step-2 checkpoint's weights,
    # teacher and moments all differ from a fresh start's (cpu_tiny's warm-up starts at lr 0, and the
    # first step has lr 0 whatever the schedule: DeepSpeed's schedulers start after it)
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["scheduler"]["params"]["warmup_min_ratio"] = 1.0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = [*_torchrun(2), "launchers/pretrain.py", "--ds_config", str(tmp_path / "ds.json"), "--preset", str(preset),
            "--run_dir", str(run), "train.max_updates=3", "teacher.ema_decay=0.9", "teacher.ema_end_decay=0.9"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["plugins"] == [PLUGIN] and saved["model"]["modality"] == "sensor"
    # the run as if it had stopped after its step-2 checkpoint; its step 3 kept aside to compare
    ckpt = run / "checkpoints"
    (ckpt / "step_00000003").rename(tmp_path / "uninterrupted_step_3")
    (ckpt / LATEST).write_text("step_00000002\n")
    more = subprocess.run([*args, "--resume", "auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-5000:]
    assert f"resumed from {ckpt / 'step_00000002'} at step 2" in more.stdout
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[2]["loss"] == rows[2]["loss"]
    # model, teacher and AdamW state (and the RNG states) after the resumed step 3, bit for bit: the
    # same layout, CPU kernels and gloo reductions make the same step exactly
    want, got = _checkpoint_files(tmp_path / "uninterrupted_step_3"), _checkpoint_files(ckpt / "step_00000003")
    kinds = {key.split("/")[0] for name, pieces in want.items() if name.startswith("shards/") for key in pieces}
    assert sorted(got) == sorted(want) and kinds == {"model", "exp_avg", "exp_avg_sq", "teacher"}
    assert _differences(got, want) == []
