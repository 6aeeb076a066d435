"""The DeepSpeed JSON is read once, into :class:`d2v2scale.run_spec.RunSpec`: its values are the
JSON's (checked against the file read with ``json`` here), and no other module reads the raw dict."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from d2v2scale.config import load_config
from d2v2scale.run_spec import load_ds_config
from d2v2scale.run_spec import RunSpec, read_spec, run_spec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "d2v2scale"
SHIPPED = sorted((PACKAGE / "ds_configs").glob("*.json"))
# The rooms that read the raw JSON: the run_spec package (read, validate, split the batch, type) and
# the DeepSpeed backend (DeepSpeed's own dict is built there).
SPEC_PACKAGE = "run_spec/"
RAW_READERS = {"train/backend/deepspeed.py"}
_KEYS = ("bf16|fp16|amp|zero_optimization|optimizer|scheduler|gradient_clipping|gradient_accumulation_steps|"
         "train_micro_batch_size_per_gpu|train_batch_size|tensorboard|csv_monitor|wandb|steps_per_print|"
         "wall_clock_breakdown")  # DeepSpeed's top-level keys that d2v2scale reads
RAW_READ = re.compile(rf"\bds(_config|_json)?\s*(\.get\(|\.setdefault\(|\[)|\.get\(\s*\"({_KEYS})\"|\[\s*\"({_KEYS})\"\s*\]")


def _raw_reads(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if RAW_READ.search(line)]


@pytest.mark.parametrize("line", [
    'bf16 = bool(ds.get("bf16", {}).get("enabled", False))',
    'stage = ds_config.get("zero_optimization", {}).get("stage", 0)',
    'opt = ds["optimizer"]["params"]',
    'clip = float(cfg_json.get("gradient_clipping", 0.0))',
    'micro = info["ds_config"]["train_micro_batch_size_per_gpu"]',
    'ds.setdefault("optimizer", {})',
])
def test_the_raw_read_pattern_sees_each_planted_form(line):
    assert _raw_reads(line) == [line]


def test_no_module_but_the_spec_reads_the_raw_deepspeed_json():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = str(path.relative_to(PACKAGE))
        if not name.startswith(SPEC_PACKAGE) and name not in RAW_READERS and _raw_reads(path.read_text()):
            found[name] = _raw_reads(path.read_text())
    assert found == {}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_spec_holds_the_json_values(path):
    raw = json.loads(path.read_text())
    preset = "tiny_audio" if path.name.startswith("audio") else "tiny_image"
    cfg = load_config(preset, ["train.global_batch=64", "train.max_updates=77"])
    dp = 2
    spec = run_spec(load_ds_config(str(path)), cfg, dp)
    opt, sched, zero = raw["optimizer"]["params"], raw["scheduler"]["params"], raw["zero_optimization"]
    assert (spec.optimizer.lr, list(spec.optimizer.betas), spec.optimizer.eps, spec.optimizer.weight_decay) == \
        (opt["lr"], opt["betas"], opt["eps"], opt["weight_decay"])
    assert (spec.optimizer.fused, spec.optimizer.torch_adam) == (opt.get("fused"), opt.get("torch_adam", False))
    assert spec.scheduler is not None and spec.scheduler.type == raw["scheduler"]["type"]
    assert spec.scheduler.warmup_num_steps == sched["warmup_num_steps"]
    assert spec.scheduler.params["total_num_steps"] == 77  # "auto" is train.max_updates
    assert spec.gradient_clipping == raw["gradient_clipping"]
    assert spec.precision.bf16 == raw["bf16"]["enabled"]
    assert spec.zero.stage == zero["stage"] and spec.zero.overlap_comm == zero.get("overlap_comm", False)
    assert spec.zero.reduce_bucket_size == zero.get("reduce_bucket_size", 5e8)  # DeepSpeed's default otherwise
    assert spec.batch.global_batch == 64 and spec.batch.dp == dp
    resolved = spec.json_copy()
    assert resolved["gradient_accumulation_steps"] == spec.batch.grad_accum and "auto" not in json.dumps(resolved)
    assert read_spec(resolved, spec.batch) == spec  # a checkpoint's record types back to the same spec


def test_the_spec_is_frozen_and_its_json_read_only():
    cfg = load_config("tiny_image")
    spec = run_spec(load_ds_config("cpu_tiny.json"), cfg, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.optimizer.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.json["gradient_clipping"] = 0.0  # type: ignore[index]
    copy = spec.json_copy()
    copy["optimizer"]["params"]["lr"] = 5.0
    assert spec.optimizer.lr == spec.json["optimizer"]["params"]["lr"] == 1e-3  # the copy is the caller's


def test_defaults_are_deepspeeds_where_the_json_is_silent():
    """A minimal JSON: each value the backends use takes DeepSpeed's own default (from its config
    models and FusedAdam's signature, read here, not copied)."""
    import inspect

    from deepspeed.ops.adam import FusedAdam
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = load_config("tiny_image")
    spec: RunSpec = run_spec({"optimizer": {"type": "AdamW"}}, cfg, 1)
    adam = inspect.signature(FusedAdam.__init__).parameters
    assert (spec.optimizer.lr, spec.optimizer.betas, spec.optimizer.eps, spec.optimizer.weight_decay) == \
        (adam["lr"].default, tuple(adam["betas"].default), adam["eps"].default, adam["weight_decay"].default)
    zero = DeepSpeedZeroConfig()
    assert (spec.zero.stage, spec.zero.overlap_comm, spec.zero.contiguous_gradients, spec.zero.reduce_bucket_size) == \
        (int(zero.stage), bool(zero.overlap_comm), zero.contiguous_gradients, zero.reduce_bucket_size)
    assert (spec.zero.stage3_param_persistence_threshold, spec.zero.stage3_max_reuse_distance,
            spec.zero.stage3_max_live_parameters) == (zero.param_persistence_threshold, zero.max_reuse_distance,
                                                      zero.max_live_parameters)
    assert spec.scheduler is None and spec.gradient_clipping == 0.0 and not spec.precision.bf16 and spec.monitors == ()
