"""Malformed DeepSpeed JSON: each mistake is one line and exit 2 at start-up, before any process
group, for both backends (they read the same sections); every shipped ds_config still passes."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from d2v2scale.train.run import _preset_of_ds_config

from test_hardening import _main, _one_line

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("deepspeed", "fsdp2")
DROP = object()  # a case's value: delete the key


def _base() -> dict:
    return json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())


def _with(ds: dict, key: str, value) -> dict:
    """``ds`` with the dotted ``key`` set to ``value`` (or deleted): exactly one mistake."""
    out = copy.deepcopy(ds)
    *parents, leaf = key.split(".")
    node = out
    for name in parents:
        node = node[name]
    if value is DROP:
        del node[leaf]
    else:
        node[leaf] = value
    return out


def _cases(tmp: Path) -> list[tuple[str, object, str]]:
    """(dotted key, bad value, what the one line must say), one mistake each."""
    (tmp / "afile").write_text("")
    on = {"enabled": True, "job_name": "job"}
    number = "is not allowed; allowed: a number"
    obj = "is not allowed; allowed: a JSON object"
    return [
        # optimizer: type, parameters and their ranges, JSON types
        ("optimizer.type", "SGD", 'optimizer.type="SGD" is not allowed; allowed: Adam, AdamW'),
        ("optimizer.type", None, "optimizer.type=null"),
        ("optimizer.params.lr", -0.001, f"optimizer.params.lr=-0.001 {number} > 0"),
        ("optimizer.params.lr", "1e-3", f'optimizer.params.lr="1e-3" {number} > 0'),
        ("optimizer.params.betas", [0.9], "betas=[0.9] is not allowed; allowed: two numbers in [0, 1)"),
        ("optimizer.params.betas", [0.9, 1.5], "optimizer.params.betas=[0.9, 1.5]"),
        ("optimizer.params.eps", 0, f"optimizer.params.eps=0 {number} > 0"),
        ("optimizer.params.weight_decay", -0.05, f"optimizer.params.weight_decay=-0.05 {number} >= 0"),
        ("optimizer.params.amsgrad", True, "optimizer.params.amsgrad is not an AdamW parameter the backends honour"),
        ("optimizer.params.fused", "yes", 'optimizer.params.fused="yes" is not allowed; allowed: true, false or null'),
        ("optimizer.params", [0.001], f"optimizer.params=[0.001] {obj}"),
        ("optimizer", "AdamW", f'optimizer="AdamW" {obj}'),
        ("optimizer", DROP, "ds_config has no optimizer section"),
        # scheduler: type, parameter names and ranges
        ("scheduler.type", "CosineAnnealingLR", 'scheduler.type="CosineAnnealingLR" is not allowed; allowed: '),
        ("scheduler.params.warmup_num_steps", -20,
         "scheduler.params.warmup_num_steps=-20 is not allowed; allowed: an integer >= 1"),
        ("scheduler.params.warmup_num_steps", 2.5, "scheduler.params.warmup_num_steps=2.5"),
        ("scheduler.params.total_num_steps", 0, 'scheduler.params.total_num_steps=0 is not allowed; allowed: "auto"'),
        ("scheduler.params.total_num_steps", DROP, "scheduler.params.total_num_steps is missing"),
        ("scheduler.params.cos_min_ratio", 1.5, f"scheduler.params.cos_min_ratio=1.5 {number} in [0, 1]"),
        ("scheduler.params.warmup_min_ratio", -0.1, f"scheduler.params.warmup_min_ratio=-0.1 {number} in [0, 1]"),
        ("scheduler.params.warmup_type", "cubic", 'warmup_type="cubic" is not allowed; allowed: "log" or "linear"'),
        ("scheduler.params.warmup_steps", 20,
         "scheduler.params.warmup_steps is not a parameter of WarmupCosineLR (did you mean warmup_num_steps?)"),
        ("scheduler.params", [20], f"scheduler.params=[20] {obj}"),
        ("scheduler", "WarmupCosineLR", f'scheduler="WarmupCosineLR" {obj}'),
        # precision: strict booleans, JSON types, DeepSpeed's model (the conflict: the next test)
        ("bf16.enabled", "yes", 'bf16.enabled="yes" is not allowed; allowed: true or false'),
        ("fp16.enabled", 1, "fp16.enabled=1 is not allowed; allowed: true or false"),
        ("bf16", True, f"bf16=true {obj}"),
        ("bf16.enable", True, "bf16.enable is not a key of DeepSpeed's bf16 section (did you mean enabled?)"),
        ("fp16.initial_scale_power", "16", f'fp16.initial_scale_power="16" {number}'),
        ("bfloat16", {"enabled": True}, "bfloat16 is not allowed: it is DeepSpeed's old name for bf16"),
        # clipping
        ("gradient_clipping", -1.0, f"gradient_clipping=-1.0 {number} >= 0"),
        ("gradient_clipping", "1.0", f'gradient_clipping="1.0" {number} >= 0'),
        # ZeRO: DeepSpeed's model, strictly typed
        ("zero_optimization.stage", 4, "zero_optimization.stage=4 is not allowed; allowed: 0, 1, 2, 3"),
        ("zero_optimization.stage", "one", 'zero_optimization.stage="one" is not allowed; allowed: 0, 1, 2, 3'),
        ("zero_optimization.stage", "1", 'zero_optimization.stage="1" is not allowed; allowed: 0, 1, 2, 3'),
        ("zero_optimization.stage", True, "zero_optimization.stage=true is not allowed; allowed: 0, 1, 2, 3"),
        ("zero_optimization.reduce_bucket_size", -1,
         "zero_optimization.reduce_bucket_size=-1 is not allowed; DeepSpeed says: Input should be greater than 0"),
        ("zero_optimization.offload_optimizer", {"device": "gpu"},
         'zero_optimization.offload_optimizer.device="gpu" is not allowed; allowed: "none", "cpu", "nvme"'),
        ("zero_optimization.stages", 1, "zero_optimization.stages is not a key of DeepSpeed's zero_optimization"),
        ("zero_optimization", 1, f"zero_optimization=1 {obj}"),
        # monitors: DeepSpeed's models, strict booleans, folders that cannot be created
        ("tensorboard", {**on, "output_path": str(tmp / "afile" / "tb")}, "is not writable ("),
        ("tensorboard", {**on, "output_path": "/proc/d2v2scale-tb"}, 'tensorboard.output_path="/proc/d2v2scale-tb" is '
                                                                     "not writable"),
        ("csv_monitor", {**on, "output_path": str(tmp / "afile")}, "csv_monitor.output_path="),
        ("csv_monitor", {"enabled": "yes"}, 'csv_monitor.enabled="yes" is not allowed; allowed: true or false'),
        ("tensorboard", {"output_path": 5}, "tensorboard.output_path=5 is not allowed; DeepSpeed says"),
        ("wandb", [], f"wandb=[] {obj}"),
        # everything else DeepSpeed reads, through its own parser; keys it would ignore
        ("gradient_cliping", 1.0, "gradient_cliping is not a key DeepSpeed reads (did you mean gradient_clipping?)"),
        ("steps_per_print", 0, "steps_per_print=0 is not allowed; allowed: an integer >= 1 or null"),
        ("wall_clock_breakdown", "false", 'wall_clock_breakdown="false" is not allowed; allowed: true or false'),
        ("activation_checkpointing", 5, f"activation_checkpointing=5 {obj}"),
        ("checkpoint", {"tag_validation": "Sometimes"}, "checkpoint is not allowed: DeepSpeed says"),
        ("comms_logger", {"enabled": "maybe"}, 'comms_logger.enabled="maybe" is not allowed'),
        ("sequence_parallel_size", 2, "sequence_parallel_size is not allowed"),
    ]


def test_malformed_ds_configs_sweep(tmp_path):
    cases = _cases(tmp_path)
    assert len(cases) >= 25
    base = _base()
    for n, (key, value, needle) in enumerate(cases):
        path = tmp_path / f"case{n}.json"
        path.write_text(json.dumps(_with(base, key, value)))
        for backend in BACKENDS:
            code, _, err = _main("--ds_config", str(path), "--preset", "tiny_image", "--run_dir", str(tmp_path / "r"),
                                 f"parallel.backend={backend}")
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, (key, value, backend, err)
            assert needle in lines[0], (key, value, backend, lines[0])
            assert not torch.distributed.is_initialized()
    assert not (tmp_path / "r").exists()


def test_conflicts_and_backend_refusals_are_one_line(tmp_path):
    """Mistakes of more than one key, and well-formed JSON a backend refuses."""
    both = {**_base(), "bf16": {"enabled": True}, "fp16": {"enabled": True}}
    cases = [
        (both, BACKENDS, "bf16.enabled=true and fp16.enabled=true are both on; allowed: at most one of them"),
        (_with(_base(), "optimizer.params.torch_adam", DROP), ("deepspeed",),
         "optimizer.params.fused is torch AdamW's; DeepSpeed passes it only with optimizer.params.torch_adam=true"),
        (_with(_base(), "scheduler.type", "OneCycle"), ("fsdp2",),
         'scheduler.type="OneCycle" is not allowed; allowed: WarmupCosineLR (parallel.backend=fsdp2)'),
        (_with(_base(), "fp16.enabled", True), ("fsdp2",),
         "fp16.enabled=true is not supported by parallel.backend=fsdp2"),
        ({**_base(), "optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, ("fsdp2",),
         "adam_w_mode=false (L2 weight decay) is not supported by parallel.backend=fsdp2"),
    ]
    for n, (ds, backends, needle) in enumerate(cases):
        path = tmp_path / f"case{n}.json"
        path.write_text(json.dumps(ds))
        for backend in backends:
            code, _, err = _main("--ds_config", str(path), "--preset", "tiny_image", "--run_dir", str(tmp_path / "r"),
                                 f"parallel.backend={backend}")
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, (needle, backend, err)
            assert needle in lines[0], (backend, lines[0])
            assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_ds_config_validates_for_its_preset(path, tmp_path):
    preset = _preset_of_ds_config(str(path)) or "tiny_image"
    for backend in BACKENDS:  # synthetic data: the preset's own needs a data set here
        code, out, err = _main("--ds_config", str(path), "--preset", preset, "--run_dir", str(tmp_path / backend),
                               "--dry_run", f"parallel.backend={backend}", "data.kind=synthetic")
        assert code == 0 and err == "", (path.name, backend, err)
        assert "effective global batch" in out


def test_every_optional_section_filled_passes(tmp_path):
    ds = {
        **_base(),
        "bf16": {"enabled": False, "immediate_grad_update": False},
        "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": 2, "contiguous_gradients": False, "overlap_comm": False,
                              "reduce_bucket_size": 200000000, "allgather_bucket_size": 200000000},
        "tensorboard": {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "job"},
        "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv" / "deeper"), "job_name": "job"},
        "wandb": {"enabled": False, "project": "d2v2scale", "group": "g", "team": None},
        "comet": {"enabled": False},
        "activation_checkpointing": {"partition_activations": False},
        "steps_per_print": None,
        "gradient_clipping": 0.0,
    }
    path = tmp_path / "full.json"
    path.write_text(json.dumps(ds))
    for backend in BACKENDS:
        code, out, err = _main("--ds_config", str(path), "--preset", "tiny_image", "--run_dir", str(tmp_path / backend),
                               "--dry_run", f"parallel.backend={backend}")
        assert code == 0 and err == "", (backend, err)
    assert not (tmp_path / "tb").exists() and not (tmp_path / "csv").exists()  # checked, not created


# Every numeric range the validator enforces, both sides of each bound: (dotted key, a value at or
# just inside the bound that must pass, the nearest value on the other side that must be refused).
# The smallest float steps (math.nextafter) make a flipped comparison (> for >=, <= for <) fail.
BELOW_0, BELOW_1, ABOVE_1 = math.nextafter(0.0, -1.0), math.nextafter(1.0, 0.0), math.nextafter(1.0, 2.0)
TINY = math.nextafter(0.0, 1.0)
BOUNDARIES = [
    ("optimizer.params.lr", TINY, 0),
    ("optimizer.params.eps", TINY, 0),
    ("optimizer.params.weight_decay", 0, BELOW_0),
    ("optimizer.params.betas", [0, 0.95], [BELOW_0, 0.95]),
    ("optimizer.params.betas", [0.9, 0], [0.9, BELOW_0]),
    ("optimizer.params.betas", [BELOW_1, 0.95], [1, 0.95]),
    ("optimizer.params.betas", [0.9, BELOW_1], [0.9, 1]),
    ("gradient_clipping", 0, BELOW_0),
    ("steps_per_print", 1, 0),
    ("scheduler.params.warmup_num_steps", 1, 0),
    ("scheduler.params.total_num_steps", 1, 0),
    ("scheduler.params.warmup_min_ratio", 0, BELOW_0),
    ("scheduler.params.warmup_min_ratio", 1, ABOVE_1),
    ("scheduler.params.cos_min_ratio", 0, BELOW_0),
    ("scheduler.params.cos_min_ratio", 1, ABOVE_1),
    ("scheduler.params.warmup_min_lr", 0, BELOW_0),
    ("scheduler.params.warmup_max_lr", 0, BELOW_0),
]
# the *_lr parameters belong to DeepSpeed's WarmupLR, which only the deepspeed backend runs
WARMUP_LR = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 20,
                                            "warmup_type": "linear"}}


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize("key, accepted, refused", BOUNDARIES,
                         ids=[f"{k.rsplit('.', 1)[-1]}:{_compact(a)}|{_compact(r)}" for k, a, r in BOUNDARIES])
def test_each_numeric_bound_holds_on_both_sides(key, accepted, refused, tmp_path):
    """Through the launcher (the entry point users meet): the accepted value starts a dry run, the
    refused one is one line naming the key and the value, exit 2."""
    base, backends = _base(), BACKENDS
    if key.endswith("_lr"):
        base, backends = {**base, "scheduler": WARMUP_LR}, ("deepspeed",)
    for value, expect in ((accepted, 0), (refused, 2)):
        path = tmp_path / f"{expect}.json"
        path.write_text(json.dumps(_with(base, key, value)))
        for backend in backends:
            code, _, err = _main("--ds_config", str(path), "--preset", "tiny_image", "--run_dir",
                                 str(tmp_path / "r"), "--dry_run", f"parallel.backend={backend}")
            assert code == expect, (key, value, backend, err)
            if expect == 2:
                assert f"error: ds_config {key}={json.dumps(value)} is not allowed; allowed: " in _one_line(err)
