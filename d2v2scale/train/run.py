"""From command-line arguments to a finished run: validate everything, then start processes and train."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import atomic, runfiles
from .. import modality_registry
from ..config import Config, ConfigError, ParallelConfig, config_from_dict, load_config, resumable_keys
from ..data.fingerprint import describe_change
from ..distributed.dims import LaunchEnv
from ..exit_codes import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK, EXIT_PREEMPTED
from ..logs import LOG
from ..resilience.events import write_event
from ..resilience.watchdog import Watchdog, collective_timeout_s, read_heartbeat
from ..run_spec import RunSpec, flatten, load_ds_config, recorded_micro_batch, run_spec, scale_batch_for_world
from . import checkpoint
from .backend import check_spec, validate_json
from .shards import has_shards
from .sinks import check_sinks
from .verify import CheckpointError

# The keys a resumed run may change are marked on their fields (config.resumable, resumable_keys);
# anything else must match the checkpoint: the loss sequence of a resumed run is only the
# continuation of the original if the model, data and optimisation agree. In the DeepSpeed JSON, the
# split of the (unchanged) global batch and the sharding may change with the layout.
_DS_RESUMABLE = ("scheduler.params.total_num_steps", "steps_per_print", "wall_clock_breakdown", "train_batch_size",
                 "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_optimization.*",
                 "tensorboard.*", "csv_monitor.*", "wandb.*")


@dataclass
class Setup:
    cfg: Config
    spec: RunSpec  # the DeepSpeed JSON, resolved for this launch and typed
    run_dir: Path
    resume_from: Path | None  # a complete checkpoint directory, or None to start fresh
    layout: dict
    profile: bool = False
    notes: list = field(default_factory=list)  # printed at start (e.g. the batch-scaling rule applied)
    started: float = field(default_factory=time.time)  # for the run's events: start-up begins here
    resume: str | None = None  # as given: auto, a tag or a path
    resume_verified: bool = True  # False: every file of resume_from is checked after the process group starts


def _allowed(key: str, allowed: tuple) -> bool:
    return key in allowed or any(a.endswith("*") and key.startswith(a[:-1]) for a in allowed)


def _first_difference(saved: dict, now: dict, allowed: tuple) -> tuple[str, object, object] | None:
    a, b = flatten(saved), flatten(now)
    for key in sorted(set(a) | set(b)):
        if not _allowed(key, allowed) and a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


def resolve_resume(resume: str | None, run_dir: Path, verify: bool = True) -> tuple[Path | None, list[str]]:
    """(the checkpoint to resume, warnings). ``auto`` → the newest intact tag, each newer damaged one
    named in a warning (None when there is no checkpoint; ConfigError when none is intact); a tag
    name or a path → that directory, refused when it is damaged. ``verify=False`` (several ranks:
    :func:`verify_resume` checks every file once over all of them after the process group starts)
    reads only each tag's ``run.json``."""
    ckpt_dir = run_dir / "checkpoints"
    if resume is None:
        return None, []
    try:
        if resume == "auto":
            if verify:
                return checkpoint.newest_intact(ckpt_dir)
            candidates = checkpoint.resume_candidates(ckpt_dir)
            if not candidates and checkpoint.tags(ckpt_dir):
                return checkpoint.newest_intact(ckpt_dir)  # none has even a run.json: say which, and stop
            return (candidates[0] if candidates else None), []
        path = Path(resume)
        path = path if path.is_dir() else ckpt_dir / resume
        if not path.is_dir():
            raise ConfigError(f"--resume {resume}: no checkpoint there; allowed values: auto, a tag under "
                              f"{ckpt_dir}, or a checkpoint directory")
        if verify:
            found = checkpoint.damage(path)
        else:
            checkpoint.read_run_info(path)  # readable here; verify_resume checks its files once started
            found = None
    except CheckpointError as e:
        raise ConfigError(f"--resume {resume}: {e}") from None
    if found is not None:
        raise ConfigError(f"--resume {resume}: checkpoint {path.name} is damaged ({found}); name an intact one "
                          "or pass --resume auto (the newest intact)")
    return path, []


def verify_resume(setup: Setup, rank: int, world_size: int) -> None:
    """The checkpoint chosen before the launch, verified by every rank together (each file read once
    in all, not once per rank); ``--resume auto`` falls back to an older intact tag, rechecked
    against this run's configuration. Collective; CheckpointError/ConfigError alike on every rank."""
    if setup.resume_from is None or setup.resume_verified:
        return
    if setup.resume != "auto":
        checkpoint.verify_tag(setup.resume_from, rank, world_size)
        return
    tag, passed_over = checkpoint.newest_verified(setup.run_dir / "checkpoints", rank, world_size)
    if rank == 0:
        for line in passed_over:
            LOG.info(line)
    if tag != setup.resume_from:
        note = None if tag is None else check_resume(tag, setup.cfg, setup.spec.json_copy(), setup.layout)
        if rank == 0 and note:
            LOG.info(note)
        setup.resume_from = tag


def _saved_config(info: dict) -> dict:
    """A checkpoint's config, with ``model.cls_loss_reference_micro_batch`` filled in for one written
    before that key existed: its CLS weight followed the micro-batch it ran with, so that is the
    value that continues its objective."""
    saved, model = info["config"], info["config"].get("model", {})
    if "cls_loss_reference_micro_batch" in model or not model.get("cls_loss"):
        return saved
    micro = recorded_micro_batch(info.get("ds_config", {}))
    return {**saved, "model": {**model, "cls_loss_reference_micro_batch": micro}}


def check_resume(tag_dir: Path, cfg: Config, ds_json: dict, layout: dict) -> str | None:
    """The checkpoint must come from the same model, data and optimisation (the global batch
    included). A layout-free checkpoint resumes on any layout: returns the line saying how it
    changes; a native DeepSpeed one only on the layout that wrote it."""
    info = checkpoint.read_run_info(tag_dir)
    saved = config_from_dict(_saved_config(info), check=False).to_dict()  # keys added since: their defaults
    resumable = resumable_keys()
    diff = _first_difference(saved, cfg.to_dict(), resumable)
    if diff:
        key, old, new = diff
        raise ConfigError(f"--resume {tag_dir.name}: {key} was {old!r} in the checkpoint, is {new!r} now; keys that "
                          f"may change on resume: {', '.join(resumable)}")
    diff = _first_difference(info["ds_config"], ds_json, _DS_RESUMABLE)
    if diff:
        key, old, new = diff
        raise ConfigError(f"--resume {tag_dir.name}: ds_config {key} was {old!r} in the checkpoint, is {new!r} now; "
                          "only the schedule length, the batch split and the sharding may change on resume")
    saved = {"backend": ParallelConfig().backend, **info["layout"]}  # checkpoints from before backends were named
    if saved == layout:
        return None
    change = ", ".join(f"{k} {saved.get(k)} → {layout[k]}" for k in layout if saved.get(k) != layout[k])
    if not has_shards(tag_dir):
        raise ConfigError(f"--resume {tag_dir.name}: a native DeepSpeed checkpoint resumes on its own layout only "
                          f"({change}); resume with the layout {saved}, or save with train.checkpoint_format=layout_free")
    return (f"resharding {tag_dir.name} to a new layout: {change} (global batch {cfg.train.global_batch} unchanged; "
            "dropout RNG streams restart from their seeds)")


def check_same_data(tag_dir: Path, cfg: Config, now: dict | None) -> str | None:
    """The warning to print when the data index differs from the one ``tag_dir`` was written with
    (None: the same, or no index then or now); ConfigError under ``data.allow_changed=false``.
    Every rank holds the index here, so every rank decides alike."""
    saved = checkpoint.read_run_info(tag_dir).get("data")
    change = describe_change(saved, now) if saved and now else None
    if change is None:
        return None
    line = (f"the data set changed since checkpoint {tag_dir.name} ({change}): the batches after step "
            f"{checkpoint.step_of(tag_dir.name)} follow another data order than the run's")
    if not cfg.data.allow_changed:
        raise ConfigError(f"--resume {tag_dir.name}: {line}; restore the data set, or pass data.allow_changed=true "
                          "to continue on this one")
    return f"warning: {line} (data.allow_changed=false refuses such a resume)"


def _preset_of_ds_config(path: str) -> str | None:
    """The preset a shipped ds_config is named for (``vit_h_a100_40gb.json`` → ``vit_h``), if any."""
    from ..config import preset_names

    stem = Path(path).stem
    matches = [p for p in preset_names() if stem == p or stem.startswith(p + "_")]
    return max(matches, key=len) if matches else None


class AlreadyComplete(Exception):
    """``--resume auto`` on a run whose latest checkpoint is at ``train.max_updates``: nothing to do."""


RUN_FILES = (runfiles.CONFIG, runfiles.METRICS, runfiles.CHECKPOINTS)


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool, dry_run: bool) -> str | None:
    """Refuse a run directory that cannot be written or that already holds another run; returns the
    line to print when ``--overwrite`` moved an old run aside."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run_dir {run_dir} exists and is not a directory")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    moved = None
    if existing and resume is None:
        if not overwrite:
            latest = checkpoint.read_latest(run_dir / "checkpoints")
            what = f"checkpoints up to {latest}" if latest else ", ".join(existing)
            raise ConfigError(f"--run_dir {run_dir} already holds a run ({what}); pass --resume auto to continue it, "
                              "a new --run_dir, or --overwrite to move the old one aside (nothing is deleted)")
        if not dry_run and LaunchEnv.detect().rank == 0:
            aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            moved = f"--overwrite: moved the previous run in {run_dir} to {aside}"
    probe = atomic.nearest_existing(run_dir)
    if not probe.is_dir():
        raise ConfigError(f"--run_dir {run_dir}: {probe} is not a directory")
    why_not = atomic.cannot_write(probe)
    if why_not:
        raise ConfigError(f"--run_dir {run_dir} is not writable ({probe}: {why_not})")
    return moved


def prepare(args) -> Setup:
    """Parse and cross-check preset, overrides, DeepSpeed JSON, launch size and resume point; raise ConfigError."""
    cfg = load_config(args.preset, args.overrides)
    ds = load_ds_config(args.ds_config)
    env = LaunchEnv.detect()
    tp = cfg.parallel.tp
    if env.world_size % tp:
        allowed = [k for k in range(1, env.world_size + 1) if env.world_size % k == 0 and cfg.model.num_heads % k == 0]
        raise ConfigError(f"parallel.tp={tp} must divide the number of processes {env.world_size}; "
                          f"allowed values: {', '.join(map(str, allowed))}")
    backend = cfg.parallel.backend
    validate_json(backend, ds)
    dp = env.world_size // tp
    scaling_note = scale_batch_for_world(ds, cfg, dp)
    spec = run_spec(ds, cfg, dp)
    check_spec(backend, spec, tp)
    check_sinks(spec.monitors)
    kind = modality_registry.data_kind(cfg)  # None: synthetic
    if kind is not None and kind.needs_path and not cfg.data.path:
        raise ConfigError(f"data.kind={cfg.data.kind} needs data.path=<folder or file list>")
    run_dir = Path(args.run_dir or Path("runs") / cfg.preset)
    if kind is not None and kind.index is not None and cfg.data.index_cache is None:  # indexed once per job
        cfg.data.index_cache = str(run_dir / "data.d2v2index")  # config.yaml says where it is
    if kind is not None and kind.needs_path and not getattr(args, "dry_run", False):
        from ..data.files import DataError
        from ..data.precheck import check_data

        try:  # rank 0 indexes the data once for the job; the others read its index after the group meets
            check_data(cfg, builder=env.rank == 0, verbose=env.rank == 0)
        except DataError as e:
            raise ConfigError(str(e)) from None
    notes = [scaling_note] if scaling_note else []
    foreign = _preset_of_ds_config(args.ds_config)
    warmup = spec.scheduler.warmup_num_steps if spec.scheduler else 0
    if warmup >= cfg.train.max_updates and not cfg.train.allow_long_warmup:
        if foreign and foreign != cfg.preset:
            raise ConfigError(f"the ds_config's scheduler warms up for {warmup} updates but the run has "
                              f"train.max_updates={cfg.train.max_updates}: the learning rate would never reach its "
                              f"peak ({args.ds_config} is written for preset '{foreign}', this run is '{cfg.preset}'); "
                              "pass train.allow_long_warmup=true if intended")
        notes.append(f"warning: the learning rate never reaches its peak: the ds_config warms up for {warmup} updates, "
                     f"the run stops at train.max_updates={cfg.train.max_updates} (fine for a smoke test; "
                     "train.allow_long_warmup=true says it is meant)")
    stage = spec.zero.stage
    if dp == 1 and stage in (1, 2) and backend == ParallelConfig().backend:
        notes.append(f"note: one data-parallel rank: ZeRO-{stage} partitions nothing but still copies gradients into "
                     "its flat buffers; zero_optimization.stage=0 runs the same step faster (bench/step_paths.py)")
    if foreign and foreign != cfg.preset:
        notes.append(f"warning: {args.ds_config} is written for preset '{foreign}', this run is '{cfg.preset}'")
    dry_run = getattr(args, "dry_run", False)
    moved = None if getattr(args, "print_config", False) else \
        check_run_dir(run_dir, args.resume, getattr(args, "overwrite", False), dry_run)
    layout = {"backend": backend, "tp": tp, "dp": dp, "zero_stage": stage}
    alone = env.world_size == 1  # one process verifies before anything starts; several share it afterwards
    resume_from, passed_over = resolve_resume(args.resume, run_dir, verify=alone)
    notes += passed_over
    if args.resume == "auto" and resume_from is None:
        notes += [f"starting at step 0: no checkpoint under {run_dir / runfiles.CHECKPOINTS}",
                  *_sibling_runs(run_dir, cfg.preset)]
    if resume_from is not None:
        reshard = check_resume(resume_from, cfg, spec.json_copy(), layout)
        notes += [reshard] if reshard else []
        done = checkpoint.step_of(resume_from.name)
        if done >= cfg.train.max_updates:
            raise AlreadyComplete(f"{run_dir} is already complete at step {done} (train.max_updates="
                                  f"{cfg.train.max_updates}); nothing to do")
    notes = ([moved] if moved else []) + notes
    cfg.profiling.enabled = bool(args.profile or cfg.profiling.enabled)  # config.yaml says what ran
    return Setup(cfg, spec, run_dir, resume_from, layout, profile=cfg.profiling.enabled, notes=notes,
                 resume=args.resume, resume_verified=alone)


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


def drop_rows_after(path: Path, step: int) -> int:
    """Remove the JSON-lines rows of ``path`` past ``step`` (written by an attempt that died before
    its next checkpoint, so this one writes them again); returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _row_step(line) <= step]  # a line cut by kill -9 is dropped too
    dropped = len(lines) - len(kept)
    if dropped:
        atomic.write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def _write_run_files(setup: Setup) -> None:
    setup.run_dir.mkdir(parents=True, exist_ok=True)
    said = "".join(f"# {note}\n" for note in setup.notes if note.startswith("warning:"))  # kept with the run
    atomic.write_text(setup.run_dir / runfiles.CONFIG, said + yaml.safe_dump(setup.cfg.run_dict(), sort_keys=False))
    atomic.write_text(setup.run_dir / runfiles.DS_CONFIG, json.dumps(setup.spec.json_copy(), indent=2) + "\n")


def _start_watchdog(setup: Setup, rank: int) -> Watchdog:
    """The hang watchdog of this rank; the attempt's name (its incident folder) is the supervisor's,
    or rank 0's clock, the same on every rank."""
    from ..distributed.runtime import broadcast_object

    attempt = os.environ.get("D2V2SCALE_ATTEMPT") or str(broadcast_object(time.strftime("%Y%m%d-%H%M%S")))
    t = setup.cfg.train
    watchdog = Watchdog(setup.run_dir, rank, attempt, t.hang_timeout_s, t.setup_timeout_s, heartbeat=rank == 0)
    watchdog.start()
    return watchdog


def _record_attempt(setup: Setup, start: int, reached: tuple[int, float] | None, world_size: int) -> None:
    """Rank 0's events at the start of an attempt: who runs it, and what a resume redoes."""
    write_event(setup.run_dir, "attempt", job=os.environ.get("SLURM_JOB_ID"), attempt=os.environ.get("D2V2SCALE_ATTEMPT"),
                world_size=world_size, started=setup.started, start_step=start)
    if setup.resume_from is not None:
        furthest = max(start, reached[0] if reached else start)
        write_event(setup.run_dir, "resume", from_step=start, reached_step=furthest, recomputed=furthest - start)


def _error_event(setup: Setup, rank: int, watchdog: Watchdog | None, error: BaseException) -> None:
    cause = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    write_event(setup.run_dir, "error", rank=rank, step=watchdog.step if watchdog else None, cause=cause)


_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "ProcessGroupNCCL's watchdog", "Socket Timeout")


def _peer_lost(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _PEER_LOST)


def _sibling_runs(run_dir: Path, preset: str) -> list[str]:
    """Warnings for other run directories beside ``run_dir`` holding checkpoints of the same preset
    (a run started under another name, e.g. one named after its job id)."""
    found = []
    parent = run_dir.parent
    for other in sorted(parent.iterdir()) if parent.is_dir() else []:
        latest = checkpoint.read_latest(other / "checkpoints") if other != run_dir and other.is_dir() else None
        if latest is None or not (other / runfiles.CONFIG).is_file():
            continue
        try:
            saved = yaml.safe_load((other / runfiles.CONFIG).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if saved.get("preset") == preset:
            found.append(f"warning: {other} holds a {preset} run with checkpoints up to {latest}; to continue it "
                         f"instead, pass --run_dir {other} (RUN_DIR={other} for the sbatch scripts)")
    return found


def run(setup: Setup) -> int:
    """Start the process group, build the engine, resume if asked, train. Returns the exit code."""
    from ..data.files import DataError
    from ..distributed.runtime import init_distributed, shutdown
    from .engine import build_trainer, train
    from .faults import NonFiniteTraining, Preempted

    rank, watchdog = 0, None
    t = setup.cfg.train
    try:
        dims, device = init_distributed(setup.cfg.parallel.tp, collective_timeout_s(t.hang_timeout_s, t.setup_timeout_s))
        rank = dims.rank
        if rank == 0:
            _write_run_files(setup)
            for note in setup.notes:
                LOG.info(note)
            LOG.info(f"{setup.cfg.preset}: {setup.spec.describe(setup.cfg)}")
        reached = read_heartbeat(setup.run_dir) if rank == 0 else None  # how far the attempt before got
        watchdog = _start_watchdog(setup, rank)
        verify_resume(setup, rank, dims.world_size)
        tr = build_trainer(setup.cfg, setup.spec, dims, device)
        start = 0
        if setup.resume_from is not None:
            changed = check_same_data(setup.resume_from, setup.cfg, tr.data_fingerprint)
            if rank == 0 and changed:
                LOG.info(changed)
            start = checkpoint.load_checkpoint(tr, setup.resume_from, setup.layout)
            tr.counters.update(checkpoint.read_run_info(setup.resume_from).get("counters", {}))
            if rank == 0:
                LOG.info(f"resumed from {setup.resume_from} at step {start}")
        if rank == 0:
            _record_attempt(setup, start, reached, dims.world_size)
            for name in (runfiles.METRICS, runfiles.DIAGNOSTICS):
                dropped = drop_rows_after(setup.run_dir / name, start)
                if dropped:
                    LOG.info(f"{name}: dropped {dropped} rows past step {start} written by the interrupted "
                             "attempt (this run writes them again)")
        run_info = {"config": setup.cfg.to_dict(), "ds_config": setup.spec.json_copy(), "layout": setup.layout,
                    "data": tr.data_fingerprint}
        profiler = None
        if setup.profile:
            from ..profiling.profiler import Profiler

            profiler = Profiler(setup.run_dir, setup.cfg, device, rank)
        train(tr, setup.run_dir, start, run_info, profiler, watchdog)
        shutdown()
        return EXIT_OK
    except Preempted as e:
        if rank == 0:
            # A marker next to the checkpoints: under srun a task's exit code can be lost to a second
            # SIGTERM (time limit), so the supervisor requeues on this file as well as on exit code 3.
            (setup.run_dir / runfiles.PREEMPTED).write_text(f"{e}\n")
            LOG.info(f"{e}; exiting with {EXIT_PREEMPTED} (requeue and resume with --resume auto)")
        shutdown()
        return EXIT_PREEMPTED
    except NonFiniteTraining as e:
        LOG.error(f"ERROR: {e}")
        _error_event(setup, rank, watchdog, e)
        return EXIT_ERROR
    except (DataError, CheckpointError, ConfigError) as e:  # the data set or a checkpoint, found after start-up
        LOG.error(f"ERROR: {e}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if rank == 0:
            latest = checkpoint.read_latest(setup.run_dir / "checkpoints")
            LOG.error(f"interrupted: stopped without a checkpoint (latest: {latest or 'none'})")
        return EXIT_ERROR
    except checkpoint.CheckpointWriteError as e:
        if rank == 0:  # every rank raises together; rank 0's message has the numbers
            LOG.error(f"ERROR: {e}")
            _error_event(setup, rank, watchdog, e)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - the launcher's contract is an exit code
        if _peer_lost(e):  # the cause is another rank's: its own line (or srun's) says what happened
            LOG.error(f"ERROR: lost contact with another rank during a collective (it died or hung): "
                      f"{(str(e).splitlines() or [''])[0][:200]}")
        else:
            traceback.print_exc(file=sys.stderr)
        _error_event(setup, rank, watchdog, e)
        return EXIT_ERROR
    finally:
        if watchdog is not None:
            watchdog.close()
