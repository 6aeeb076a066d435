"""The planner: runs for every published preset, and its model-state memory matches a real engine."""
import json
import sys
from pathlib import Path

import pytest

from d2v2scale.config import load_config
from d2v2scale.plan import main as plan_main

from test_deepspeed_training import _launch


@pytest.mark.parametrize("preset,nodes,extra", [
    ("vit_h", 32, ["--micro_batch", "1"]),
    ("vit_h", 64, ["--micro_batch", "1", "--tp", "2"]),
    ("audio_large", 32, ["--micro_batch", "320000", "--tp", "4", "train.global_batch=20480000"]),
    ("vit_b", 4, []),
    ("text_base", 2, []),
])
def test_planner_runs(capsys, preset, nodes, extra):
    assert plan_main(["--preset", preset, "--ds_config", f"ds_configs/{preset}.json", "--nodes", str(nodes), *extra]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "s/step" in out


def test_planner_reports_impossible_batch_math_with_the_ways_out(capsys):
    assert plan_main(["--preset", "vit_h", "--ds_config", "ds_configs/vit_h.json", "--nodes", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch math" in err
    # 512 GPUs, batch 256: TP 2 leaves 256 data-parallel ranks of one image; the linear rule gives 4096 (×16 lr)
    assert "--tp 2 (parallel.tp=2) with train_micro_batch_size_per_gpu=1" in err
    assert "train.batch_scaling=linear (global batch 256 → 4096, peak lr 0.0004 → 0.0064" in err


def test_paper_runs_within_35_percent(capsys):
    """Default cluster profile and efficiency curve against the published wall-clock times."""
    assert plan_main(["--paper"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("ViT-H", "speech"))]
    assert len(rows) == 2
    for row in rows:
        predicted, paper, ratio = (float(v) for v in row.split()[-4:-1])
        assert ratio == pytest.approx(predicted / paper, abs=0.01)
        assert 0.65 <= ratio <= 1.35, row


def test_collective_time_is_the_ring_formula():
    from d2v2scale.planning.cluster import DGX_A100_40GB as p

    # all-reduce of 1 GB over 16 ranks on 2 nodes: latency 10 + 12·log2(2) µs, 2·15/16 GB at 185 GB/s
    expected = 22e-6 + 1e9 * 2 * 15 / 16 / 185e9
    assert p.collective_s("all_reduce", 1e9, 16, spans_nodes=True) == pytest.approx(expected)
    # all-gather inside a node: 7/8 of the gathered bytes at 230 GB/s
    assert p.collective_s("all_gather", 8e8, 8, spans_nodes=False) == pytest.approx(10e-6 + 8e8 * 7 / 8 / 230e9)
    assert p.collective_s("all_reduce", 1e9, 1, spans_nodes=False) == 0.0


def test_calibration_file_replaces_the_curve(tmp_path):
    import json

    from d2v2scale.planning.timing import Efficiency, load_calibration

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"gpu": "a100-40gb", "points": [{"flops_per_micro_batch": 1e12, "efficiency": 0.1},
                                                               {"flops_per_micro_batch": 1e14, "efficiency": 0.3}]}))
    eff = load_calibration(str(path), "a100-40gb")
    assert eff(1e13) == pytest.approx(0.2)  # halfway in log(F)
    assert eff(1e15) == pytest.approx(0.3) and eff(5e11) == pytest.approx(0.05)
    assert Efficiency()(5.6e13) == pytest.approx(0.25)  # the default curve at its half point
    with pytest.raises(Exception, match="measured on h200"):
        path.write_text(json.dumps({"gpu": "h200", "points": [{"flops_per_micro_batch": 1, "efficiency": 0.1}]}))
        load_calibration(str(path), "a100-40gb")


def test_search_prefers_the_pinned_batch_and_reports_the_choice(capsys):
    assert plan_main(["--search", "--preset", "vit_h", "--ds_config", "ds_configs/vit_h.json", "--nodes", "32",
                      "--top", "3"]) == 0
    out = capsys.readouterr().out
    chosen = next(line for line in out.splitlines() if "chosen #1" in line)
    assert "keeps the preset's global batch" in chosen and "train.batch_scaling=none" in chosen
    assert "sbatch variables: TP=" in out


@pytest.mark.slow
@pytest.mark.parametrize("ds_name", ["cpu_tiny.json", "cpu_tiny_bf16.json"])
def test_model_state_memory_matches_a_real_engine(tmp_path, ds_name):
    """Weights, optimizer states and teacher tensors of a DeepSpeed ZeRO-1 engine on CPU, measured
    tensor by tensor, against the planner's formulas (20 %: alignment padding and the frozen
    positions are the only differences)."""
    ds = json.loads(open("ds_configs/cpu_tiny.json").read())
    if "bf16" in ds_name:
        ds["bf16"] = {"enabled": True}
    (tmp_path / ds_name).write_text(json.dumps(ds))
    _launch([sys.executable], "tests/dist/model_state_bytes.py", "tiny_image", str(tmp_path / ds_name),
            str(tmp_path / "out.json"))
    result = json.loads((tmp_path / "out.json").read_text())
    for key, measured in result["measured"].items():
        assert result["model"][key] == pytest.approx(measured, rel=0.2), (key, result)


def _measured_activation_peak(cfg):
    """Peak of every non-parameter, non-gradient, non-optimizer byte torch's memory profiler sees
    during one forward + backward of 16 samples (fp32, CPU), and the planner's layout for it."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category, MemoryProfileTimeline

    from d2v2scale.data.synthetic import synthetic_batch
    from d2v2scale.model import Data2Vec2, normalize_loss
    from d2v2scale.planning.memory import Layout
    from d2v2scale.train.teacher import build_teacher

    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).train()
    teacher = build_teacher(model, cfg)
    source = synthetic_batch(cfg, 16, torch.Generator().manual_seed(0))
    mask = model.make_mask(0, 0, torch.arange(16), source)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        normalize_loss(model(source, model.teacher_fn(teacher.module), mask)).backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    sizes = np.array(sizes)
    states = {_CATEGORY_TO_INDEX[c] + 1 for c in (Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE)}
    measured = sizes[:, [i for i in range(sizes.shape[1]) if i not in states]].sum(1).max()
    audio_len = source.shape[-1] if cfg.model.modality == "audio" else 0
    return measured, Layout(1, 1, 0, False, 16, mask.mask.shape[1], audio_len)


@pytest.mark.slow
def test_zero2_and_zero3_per_rank_states_match_a_two_process_engine(tmp_path):
    """What one of 2 ranks holds at ZeRO-2 and ZeRO-3 (weights, optimizer states, teacher masters
    and compute copy), measured on real engines, against the planner's per-rank terms. 5 %:
    DeepSpeed pads partitions to alignment and keeps the frozen positions out of the optimizer."""
    from test_deepspeed_training import _torchrun

    _launch(_torchrun(2), "tests/dist/model_state_bytes.py", "tiny_image", "ds_configs/cpu_tiny.json",
            str(tmp_path / "out.json"), "2,3")
    result = json.loads((tmp_path / "out.json").read_text())
    for stage in ("2", "3"):
        r = result[stage]
        assert r["per_rank"][0] == r["per_rank"][1]  # both ranks hold the same share
        for key, measured in r["measured"].items():
            assert r["model"][key] == pytest.approx(measured, rel=0.05), (stage, key, r)
    # partitioning is real: ZeRO-3 holds half the weights ZeRO-2 does, the teacher masters are halved
    assert result["3"]["measured"]["weights"] * 2 == pytest.approx(result["2"]["measured"]["weights"], rel=0.02)


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_activation_memory_matches_measured_peak(preset):
    """The planner's activation estimate against the measured peak, without and with activation
    checkpointing of every block (a real ``torch.utils.checkpoint`` in the model). 20 % without:
    the estimate counts stored tensors by formula (10 + 24 bytes-equivalents per token and width
    per block), the profiler sees the allocator's exact lifetimes; 15 % with checkpointing, where
    the stored block inputs are exact and the formula only covers one recomputed block."""
    from d2v2scale.planning.memory import activation_bytes

    measured, layout = _measured_activation_peak(load_config(preset))
    assert sum(activation_bytes(load_config(preset), layout, checkpoint_every=0).values()) == \
        pytest.approx(measured, rel=0.2)
    cfg = load_config(preset, ["model.activation_checkpointing=1"])
    measured_ck, layout = _measured_activation_peak(cfg)
    assert measured_ck < measured
    assert sum(activation_bytes(cfg, layout, checkpoint_every=1).values()) == pytest.approx(measured_ck, rel=0.15)


def test_a_cluster_profile_from_json(tmp_path, capsys):
    profile = {"name": "my-h100", "gpu": "h100-80gb", "gpus_per_node": 4, "intra_busbw_gbs": 360,
               "inter_busbw_gbs": 350, "intra_latency_us": 8, "inter_latency_us": 10, "sources": ["our nccl-tests"]}
    (tmp_path / "c.json").write_text(json.dumps(profile))
    assert plan_main(["--preset", "vit_h", "--ds_config", "ds_configs/vit_h.json", "--nodes", "16", "--micro_batch", "4",
                      "--cluster", str(tmp_path / "c.json")]) == 0
    assert "64 × h100-80gb (my-h100;" in capsys.readouterr().out
    (tmp_path / "c.json").write_text(json.dumps({**profile, "gpu": "b200"}))
    assert plan_main(["--preset", "vit_h", "--ds_config", "ds_configs/vit_h.json", "--cluster",
                      str(tmp_path / "c.json")]) == 2
    assert "gpu 'b200' is not one of" in capsys.readouterr().err


def test_the_planners_ways_out_print_the_batch_the_launcher_scales_to():
    """One rounding rule for ``train.batch_scaling=linear``: for every shipped JSON of a preset, at
    8…64 nodes of 8 GPUs, where the pinned batch does not split, the batch the planner's ways out
    print is the one the launcher scales to, with the JSON's accumulation steps or a pinned 2."""
    import copy
    import itertools
    import re

    from d2v2scale.config import ConfigError, load_config, preset_names
    from d2v2scale.run_spec import load_ds_config, plan_batch, scale_batch_for_world
    from d2v2scale.planning.search import ways_out

    checked = 0
    for path in sorted(Path("ds_configs").glob("*.json")):
        preset = next((p for p in sorted(preset_names(), key=len, reverse=True)
                       if path.stem == p or path.stem.startswith(p + "_")), None)
        if preset is None:
            continue
        for nodes, accumulation in itertools.product((8, 16, 32, 48, 64), (None, 2)):
            cfg, ds = load_config(preset), load_ds_config(str(path))
            if accumulation:  # a JSON that pins the accumulation steps (the planner once left them out)
                ds["gradient_accumulation_steps"] = accumulation
            try:
                plan_batch(copy.deepcopy(ds), cfg, nodes * 8)
                continue  # it splits: nothing to scale
            except ConfigError:
                pass
            printed = int(re.search(r"global batch \d+ → (\d+)", ways_out(cfg, ds, nodes, 8, 1)).group(1))
            scaled = load_config(preset, ["train.batch_scaling=linear"])
            scale_batch_for_world(copy.deepcopy(ds), scaled, nodes * 8)
            assert printed == scaled.train.global_batch, (path.name, nodes, printed, scaled.train.global_batch)
            checked += 1
    assert checked >= 10  # the large presets do not split over 64-512 GPUs as pinned
