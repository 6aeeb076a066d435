"""The collapse watch sees a collapsing teacher: warnings once per kind, and every row in diagnostics.jsonl."""
import json
from types import SimpleNamespace

import torch

from d2v2scale.config import load_config
from d2v2scale.data.synthetic import synthetic_batch
from d2v2scale.model import Data2Vec2
from d2v2scale.train.teacher import build_teacher
from d2v2scale.train.reporting import Diagnostics, Interval


def test_a_collapsing_teacher_is_reported(tmp_path, caplog):
    cfg = load_config("tiny_image", ["train.warn_layer_spread_ratio=0.1"])
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).train()
    teacher = build_teacher(model, cfg)
    source = synthetic_batch(cfg, 4, torch.Generator().manual_seed(1))
    mask = model.make_mask(0, 0, torch.arange(4), source)
    diagnostics = Diagnostics(tmp_path / "diagnostics.jsonl", cfg.train, enabled=True)
    tr = SimpleNamespace(dims=SimpleNamespace(dp_group=None), plan=SimpleNamespace(dp=1))
    for step, shrink in enumerate([1.0, 1.0, 1e-3, 1e-3]):
        with torch.no_grad():  # the teacher's FFNs stop producing anything: every target layer collapses
            for blk in teacher.module.blocks:
                blk.mlp.fc2.weight.mul_(shrink)
                blk.mlp.fc2.bias.mul_(shrink)
            out = model(source, model.teacher_fn(teacher.module), mask)
        row = {"target_var": out.target_var.item(), "pred_var": out.pred_var.item()}
        stats = SimpleNamespace(loss_reg=out.loss_reg, loss_cls=out.loss_cls, masked=out.sample_size,
                                kept=out.sample_size, flops=0.0, data_time_s=0.0, spreads=out.moments())
        diagnostics.write(tr, step, Interval([stats]), row)
    rows = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["warnings"] == [] and rows[1]["warnings"] == []
    first, collapsed = rows[0]["layer_target_var"], rows[2]["layer_target_var"]
    assert len(first) == cfg.model.average_top_k_layers
    assert all(c < 0.1 * f for c, f in zip(collapsed, first))
    assert any("target layers" in w for w in rows[2]["warnings"])
    out = caplog.text  # a warning, through the d2v2scale logger (stderr in a run)
    assert out.count("possible collapse: target layers") == 1  # once per kind, though rows 3 and 4 both warn
