"""From command-line arguments to a finished run: validate everything, then start processes and train."""
from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, ConfigError, load_config
from ..distributed.dims import LaunchEnv
from .ds_config import BatchPlan, describe_optimization, load_ds_config, plan_batch, resolve_ds_config

SUPPORTED_DATA = ("synthetic", "digits")


@dataclass
class Setup:
    cfg: Config
    ds_config: dict
    plan: BatchPlan
    run_dir: Path
    resume: str | None


def prepare(args) -> Setup:
    """Parse and cross-check preset, overrides, DeepSpeed JSON and launch size; raise ConfigError."""
    cfg = load_config(args.preset, args.overrides)
    ds = load_ds_config(args.ds_config)
    env = LaunchEnv.detect()
    tp = cfg.parallel.tp
    if env.world_size % tp:
        allowed = [k for k in range(1, env.world_size + 1) if env.world_size % k == 0 and cfg.model.num_heads % k == 0]
        raise ConfigError(f"parallel.tp={tp} must divide the number of processes {env.world_size}; "
                          f"allowed values: {', '.join(map(str, allowed))}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if tp > 1 and stage == 3:
        raise ConfigError(f"parallel.tp={tp} with zero_optimization.stage=3 is not supported (DeepSpeed refuses "
                          "tensor parallelism with ZeRO-3 in training); allowed: stage 1 or 2 with tp > 1, or tp=1")
    if tp > 1 and stage == 0 and ds.get("bf16", {}).get("enabled", False):
        raise ConfigError(f"parallel.tp={tp} with zero_optimization.stage=0 and bf16 is not supported (DeepSpeed's "
                          "stage-0 bf16 optimizer computes a wrong gradient norm with TP); allowed: stage 1 or 2")
    if cfg.data.kind not in SUPPORTED_DATA:
        raise ConfigError(f"data.kind={cfg.data.kind} is not available yet; allowed values: {', '.join(SUPPORTED_DATA)}")
    if args.profile:
        raise ConfigError("--profile is not available yet (profiling reports arrive with the profiling issue)")
    plan = plan_batch(ds, cfg, env.world_size // tp)
    resolved = resolve_ds_config(ds, cfg, plan)
    run_dir = Path(args.run_dir or Path("runs") / cfg.preset)
    if args.resume not in (None, "auto") and not _checkpoint_path(run_dir, args.resume).exists():
        raise ConfigError(f"--resume {args.resume}: no such checkpoint; allowed values: auto, a tag under {run_dir / 'checkpoints'}, or a path")
    return Setup(cfg, resolved, plan, run_dir, args.resume)


def _checkpoint_path(run_dir: Path, resume: str) -> Path:
    p = Path(resume)
    return p if p.is_absolute() or p.exists() else run_dir / "checkpoints" / resume


def _write_run_files(setup: Setup) -> None:
    setup.run_dir.mkdir(parents=True, exist_ok=True)
    (setup.run_dir / "config.yaml").write_text(yaml.safe_dump(setup.cfg.to_dict(), sort_keys=False))
    (setup.run_dir / "ds_config.json").write_text(json.dumps(setup.ds_config, indent=2) + "\n")


def run(setup: Setup) -> int:
    """Start the process group, build the engine, resume if asked, train. Returns the exit code."""
    from ..distributed.runtime import init_distributed, shutdown
    from . import checkpoint
    from .engine import build_trainer, train

    try:
        dims, device = init_distributed(setup.cfg.parallel.tp)
        if dims.rank == 0:
            _write_run_files(setup)
            print(f"[d2v2scale] {setup.cfg.preset}: {describe_optimization(setup.ds_config, setup.cfg, setup.plan)}", flush=True)
        tr = build_trainer(setup.cfg, setup.ds_config, setup.plan, dims, device)
        start = 0
        ckpt_dir = setup.run_dir / "checkpoints"
        if setup.resume is not None:
            tag = checkpoint.latest_tag(ckpt_dir) if setup.resume == "auto" else None
            if setup.resume != "auto":
                path = _checkpoint_path(setup.run_dir, setup.resume)
                ckpt_dir, tag = path.parent, path.name
            if tag is not None:
                start = checkpoint.load_checkpoint(tr.engine, tr.teacher, ckpt_dir, tag, dims.rank)
                if dims.rank == 0:
                    print(f"[d2v2scale] resumed from {ckpt_dir / tag} at step {start}", flush=True)
        train(tr, setup.run_dir, start)
        shutdown()
        return 0
    except Exception:  # noqa: BLE001 - the launcher's contract is an exit code
        traceback.print_exc(file=sys.stderr)
        return 1
