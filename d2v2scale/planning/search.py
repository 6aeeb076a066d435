"""Choose a layout for a node count: enumerate, keep what fits, rank by predicted step time.

Dimensions: TP degree (divisors of the head count within one node), micro-batch (images/blocks
per GPU; audio: samples per GPU), ZeRO stage (1, 2, 3; TP only with 1/2), activation
checkpointing (off / every block) and batch scaling (none / linear with the LR rule). Layouts
that keep the preset's global batch rank before scaled ones — the recipe stays the paper's unless
no layout can keep it — then by predicted step time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from .. import modality_registry
from ..config import Config, ConfigError, load_config
from ..run_spec import linear_scaled_batch, load_ds_config
from ..run_spec import peak_lr, set_zero_stage
from .cluster import ClusterProfile
from .planner import Plan, plan, set_micro_batch
from .timing import Efficiency

ITEM_MICRO = (1, 2, 4, 8, 16, 32, 64)  # items per GPU; a modality with a budget key offers its own


@dataclass
class Candidate:
    tp: int
    zero: int
    micro: int
    checkpoint_every: int
    scaling: str
    ds: dict  # the DeepSpeed JSON to launch with (before any batch scaling the launcher applies)
    plan: Plan

    @property
    def key(self) -> tuple:
        return (self.plan.scaling_note is not None, self.plan.time.total_s, self.plan.total_bytes())

    def overrides(self, cfg: Config) -> list[str]:
        out = [f"model.activation_checkpointing={self.checkpoint_every}"]
        budget_key = modality_registry.get(cfg.model.modality).budget_key
        if budget_key:
            out.append(f"data.{budget_key}={self.micro}")
        return out


def _tp_options(cfg: Config, world: int, per_node: int) -> list[int]:
    return [t for t in range(1, per_node + 1) if cfg.model.num_heads % t == 0 and world % t == 0]


def _micro_options(cfg: Config) -> list[int]:
    modality = modality_registry.get(cfg.model.modality)
    return modality.budget_options(cfg) if modality.budget_key else list(ITEM_MICRO)


def _micro_key(cfg: Config) -> str:
    """Where the micro-batch is set: the modality's data budget key or the JSON's item count."""
    budget_key = modality_registry.get(cfg.model.modality).budget_key
    return f"data.{budget_key}" if budget_key else "train_micro_batch_size_per_gpu"


def search(cfg: Config, ds: dict, nodes: int, profile: ClusterProfile, efficiency: Efficiency,
           pinned_tp: int | None = None) -> tuple[list[Candidate], dict[str, int]]:
    """(fitting candidates, best first; {reason: count} of the rejected ones)."""
    world = nodes * profile.gpus_per_node
    ranked, rejected = [], {}
    for tp in [pinned_tp] if pinned_tp else _tp_options(cfg, world, profile.gpus_per_node):
        for zero in (1, 2, 3) if tp == 1 else (1, 2):
            for micro in _micro_options(cfg):
                for every in (0, 1):
                    for scaling in ("none", "linear"):
                        c, d = copy.deepcopy(cfg), copy.deepcopy(ds)
                        c.parallel.tp, c.model.activation_checkpointing, c.train.batch_scaling = tp, every, scaling
                        set_zero_stage(d, zero)
                        set_micro_batch(c, d, micro)
                        launch_ds = copy.deepcopy(d)
                        try:
                            p = plan(c, d, nodes, tp, profile, efficiency)
                        except ConfigError as e:
                            reason = "batch math" if "batch math" in str(e) else str(e).split(";")[0]
                            rejected[reason] = rejected.get(reason, 0) + 1
                            continue
                        if scaling == "linear" and p.scaling_note is None:
                            continue  # the same layout as "none"
                        if not p.fits:
                            rejected["does not fit in memory"] = rejected.get("does not fit in memory", 0) + 1
                            continue
                        ranked.append(Candidate(tp, zero, micro, every, scaling, launch_ds, p))
    ranked.sort(key=lambda k: k.key)
    return ranked, rejected


def report(ranked: list[Candidate], rejected: dict[str, int], nodes: int, profile: ClusterProfile,
           top: int) -> tuple[str, str, dict]:
    """(explanation, shell assignments for slurm/common.sh, the chosen DeepSpeed JSON)."""
    if not ranked:
        why = ", ".join(f"{n} × {r}" for r, n in sorted(rejected.items(), key=lambda x: -x[1]))
        raise ConfigError(f"no layout fits on {nodes} nodes × {profile.gpus_per_node} GPUs ({why})")
    best = ranked[0]
    cfg = best.plan.cfg
    gb = 1e9
    lines = [f"{cfg.preset} on {nodes} nodes × {profile.gpus_per_node} {profile.gpu} ({profile.name}): "
             f"{len(ranked)} layouts fit in {0.9 * best.plan.capacity / gb:.0f} GB "
             f"({sum(rejected.values())} rejected: " + ", ".join(f"{n} {r}" for r, n in rejected.items()) + ")",
             f"  {'#':>2} {'tp':>3} {'zero':>4} {'micro':>7} {'accum':>5} {'ckpt':>4} {'global batch':>14} "
             f"{'mem GB':>7} {'s/step':>7} {'compute':>8} {'comm':>7} {'exposed':>8} {'run h':>7} {'MFU':>6} bound"]
    for i, c in enumerate(ranked[:top], start=1):
        p, t = c.plan, c.plan.time
        batch = f"{p.batch.global_batch}{'*' if p.scaling_note else ''}"
        lines.append(f"  {i:>2} {c.tp:>3} {c.zero:>4} {c.micro:>7} {p.batch.grad_accum:>5} {c.checkpoint_every:>4} "
                     f"{batch:>14} {p.total_bytes() / gb:7.1f} {t.total_s:7.3f} {t.compute_s:8.3f} {t.comm_s:7.3f} "
                     f"{t.exposed_comm_s:8.3f} {p.run_h:7.1f} {p.mfu:6.1%} {t.dominant}")
    if best.plan.scaling_note:
        lines.append("  * no layout keeps the preset's global batch on this many GPUs; "
                     + best.plan.scaling_note)
        why = "no layout keeps the pinned global batch; the fastest with linear batch scaling"
    else:
        why = "the fastest predicted step that keeps the preset's global batch"
    ds_values = (f"zero_optimization.stage={best.zero}, "
                 + f"{_micro_key(cfg)}={best.micro}"
                 + f", gradient_accumulation_steps={best.plan.batch.grad_accum}")
    overrides = " ".join(best.overrides(cfg))
    lines += [f"  chosen #1 ({why}): tp={best.tp}, {ds_values}, model.activation_checkpointing="
              f"{best.checkpoint_every}, train.batch_scaling={best.scaling}",
              f"  predicted {best.plan.time.total_s:.3f} s/step ({best.plan.time.dominant}-bound), "
              f"{best.plan.total_bytes() / gb:.1f} GB per GPU",
              f"  sbatch variables: TP={best.tp} SCALE_BATCH={best.scaling} PLAN_OVERRIDES=\"{overrides}\""]
    shell = "\n".join([f"TP={best.tp}", f"SCALE_BATCH={best.scaling}", f"PLAN_OVERRIDES='{overrides}'"])
    return "\n".join(lines), shell, best.ds


def ways_out(cfg: Config, ds: dict, nodes: int, gpus: int, tp: int) -> str:
    """Concrete alternatives when the global batch cannot be split over ``nodes × gpus / tp`` ranks."""
    world = nodes * gpus
    g = cfg.train.global_batch
    unit = _micro_key(cfg)
    budget = modality_registry.get(cfg.model.modality).budget_key is not None
    out = []
    for t in [tp] + [t for t in range(1, gpus + 1) if t != tp and cfg.model.num_heads % t == 0 and world % t == 0]:
        dp = world // t
        micros = [m for m in (_micro_options(cfg) if budget else range(1, 65)) if g % (m * dp) == 0]
        if micros:
            tp_part = f"--tp {t} (parallel.tp={t}) with " if t != tp else ""
            out.append(f"{tp_part}{unit}={micros[0]}" + (f" (or {', '.join(map(str, micros[1:4]))})" if micros[1:] else ""))
    if not any(o.startswith(unit) for o in out):
        out.insert(0, f"no {unit} splits {g} over {world // tp} data-parallel ranks")
    lr = peak_lr(ds)
    new = linear_scaled_batch(ds, cfg, world // tp)
    out.append(f"train.batch_scaling=linear (global batch {g} → {new}, peak lr {lr} → "
               f"{lr * new / g if lr else '?'}, linear rule)")
    out.append("python -m d2v2scale.plan --search picks the fastest layout that fits")
    return "Ways out: " + "; ".join(out)


# The paper's own runs (data2vec 2.0, Tables 2-3 and 8-9), as our presets with the paper's sizes.
PAPER_RUNS = [
    ("ViT-H/14, ImageNet, 500k updates × 256 images", "vit_h", "ds_configs/vit_h.json",
     ["model.patch_size=14", "train.max_updates=500000"], 8, 4, 66.1),
    ("speech Large, Libri-light, 600k updates × 960 s", "audio_large", "ds_configs/audio_large.json",
     ["data.max_tokens=240000", "data.max_sample_size=240000"], 8, None, 76.7),
]


def paper_table(profile: ClusterProfile, efficiency: Efficiency) -> str:
    lines = [f"The paper's runs on 64 A100s, predicted on {profile.name} with {efficiency.source}:",
             f"  {'run':<50} {'GPUs':>5} {'s/step':>7} {'compute':>8} {'exposed comm':>12} {'predicted h':>11} "
             f"{'paper h':>8} {'ratio':>6}  bound"]
    for name, preset, ds_path, overrides, nodes, micro, paper_h in PAPER_RUNS:
        cfg = load_config(preset, overrides)
        ds = load_ds_config(ds_path)
        set_micro_batch(cfg, ds, micro)
        p = plan(cfg, ds, nodes, 1, profile, efficiency)
        t = p.time
        lines.append(f"  {name:<50} {nodes * profile.gpus_per_node:>5} {t.total_s:7.3f} {t.compute_s:8.3f} "
                     f"{t.exposed_comm_s:12.4f} {p.run_h:11.1f} {paper_h:8.1f} {p.run_h / paper_h:6.2f}  {t.dominant}")
    return "\n".join(lines)
