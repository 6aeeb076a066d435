"""Is this DeepSpeed JSON well-formed for this run? Checked whole, before any process group, so that
a mistake is one line naming its key, not a traceback from inside an engine (or, worse, a run that
trains with it: DeepSpeed reads ``"gradient_clipping": -1`` and ``"enabled": "yes"`` without a word).

Three layers, the cheap ones first:

1. by hand, what DeepSpeed reads without checking or checks only when the engine is built: the JSON
   type of each section the backends read, the optimizer and the scheduler (type, parameter names
   and ranges), gradient clipping, the precision conflict, monitor paths that cannot be created;
2. DeepSpeed's own pydantic models for the sections they describe (``bf16``, ``fp16``,
   ``zero_optimization``, the monitors), with JSON's types held strictly where pydantic would
   coerce (``"yes"`` → true, ``"1"`` → 1): the backends read the raw JSON, not the model;
3. DeepSpeed's whole parser (``DeepSpeedConfig``) for every other section. It also tells which
   top-level keys DeepSpeed reads: any other key is refused, since DeepSpeed ignores it silently (a
   misspelt ``gradient_cliping`` would train without clipping).

Backend-specific refusals of well-formed JSON stay with the backends (``check_ds_config`` there);
the batch keys are checked against the preset by :func:`d2v2scale.run_spec.batch.plan_batch`.
"""
from __future__ import annotations

import copy
import difflib
import enum
import errno
import importlib
import inspect
import json
import logging
import os
import tempfile
import types
import typing
from collections.abc import Callable, KeysView
from contextlib import contextmanager
from pathlib import Path
from typing import TypeGuard

import torch

from ..config import ConfigError

OPTIMIZERS = ("Adam", "AdamW")  # matched as DeepSpeed does, ignoring case; checkpoints hold AdamW's two moments
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
MODELS = {  # section → DeepSpeed's pydantic model of it
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
}
OBJECTS = ("optimizer", "scheduler", *MODELS)
# keys DeepSpeed acts on outside its config parser, each a layout d2v2scale sets itself
NOT_SUPPORTED = {
    "sequence_parallel_size": "d2v2scale has no sequence parallelism (its layout is parallel.tp and the launch size); "
                              "remove it",
    "data_parallel_size": "the data-parallel size is the launch size / parallel.tp; remove it",
    "bfloat16": "it is DeepSpeed's old name for bf16, the one d2v2scale reads; write it as bf16",
}

Rule = tuple[Callable[[object], bool], str]  # (accepts the JSON value, what is allowed)


def _number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
OPTIONAL_BOOL: Rule = (lambda v: v is None or isinstance(v, bool), "true, false or null")
OPTIMIZER_PARAMS: dict[str, Rule] = {  # what both backends' AdamW read; nothing else reaches a checkpoint
    "lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "betas": (lambda v: isinstance(v, list) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1), e.g. [0.9, 0.95]"),
    "eps": (lambda v: _number(v) and v > 0, "a number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "adam_w_mode": BOOL,
    "torch_adam": BOOL,
    "fused": OPTIONAL_BOOL,
    "foreach": OPTIONAL_BOOL,
}
SCALARS: dict[str, Rule] = {
    "gradient_clipping": (lambda v: _number(v) and v >= 0, "a number >= 0 (0 turns clipping off)"),
    "steps_per_print": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 or null"),
    "wall_clock_breakdown": BOOL,
}


def validate_ds_config(ds: dict, backend: str, schedules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`ConfigError` (one line: the dotted key and what is allowed) unless ``ds`` is a
    DeepSpeed JSON that ``parallel.backend=backend`` can run as written. ``schedules``: the
    scheduler types that backend runs (None: all of DeepSpeed's own)."""
    _check_shapes(ds)
    _check_optimizer(ds, backend)
    with _deepspeed():
        for section in MODELS:
            if section in ds:
                _check_model(section, ds[section])
        _check_precision(ds)
        _check_scheduler(ds, backend, schedules)
        _check_parser(ds)
    _check_monitor_paths(ds)


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"ds_config {key}={_show(value)} is not allowed; allowed: {allowed}")


def _apply(key: str, value, rule: Rule) -> None:
    accepts, allowed = rule
    if not accepts(value):
        raise _bad(key, value, allowed)


def _unknown(key: str, known, what: str, advice: str = "") -> ConfigError:
    """``key`` is not among ``known``: name the nearest one, and all of them when they are few."""
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    listed = f"allowed keys: {', '.join(known)}" if len(known) <= 12 else "see DeepSpeed's configuration documentation"
    return ConfigError(f"ds_config {key} is not {what}{hint}; {advice}{listed}")


def _check_keys(where: str, section: dict, allowed, what: str) -> None:
    for key in section:
        if key not in allowed:
            raise _unknown(f"{where}.{key}", allowed, what)


# ------------------------------------------------------------------------------ by hand
def _check_shapes(ds: dict) -> None:
    """The JSON type of every section the backends read: they call ``.get`` on objects and compare numbers."""
    for key in OBJECTS:
        if key in ds and not isinstance(ds[key], dict):
            raise _bad(key, ds[key], "a JSON object {...}")
    for key in ("optimizer", "scheduler"):
        if "params" in ds.get(key, {}) and not isinstance(ds[key]["params"], dict):
            raise _bad(f"{key}.params", ds[key]["params"], "a JSON object {...}")
    for key, rule in SCALARS.items():
        if key in ds:
            _apply(key, ds[key], rule)
    for key, why in NOT_SUPPORTED.items():
        if key in ds:
            raise ConfigError(f"ds_config {key} is not allowed: {why}")


def _check_optimizer(ds: dict, backend: str) -> None:
    if "optimizer" not in ds:
        raise ConfigError(f"ds_config has no optimizer section; allowed: \"optimizer\": {{\"type\": \"AdamW\", "
                          f"\"params\": {{...}}}} (types {', '.join(OPTIMIZERS)})")
    opt = ds["optimizer"]
    _check_keys("optimizer", opt, ("type", "params"), "a key of the optimizer section")
    kind = opt.get("type")
    if not isinstance(kind, str) or kind.lower() not in {o.lower() for o in OPTIMIZERS}:
        raise _bad("optimizer.type", kind, f"{', '.join(OPTIMIZERS)} (parallel.backend={backend})")
    params = opt.get("params", {})
    _check_keys("optimizer.params", params, tuple(OPTIMIZER_PARAMS), "an AdamW parameter the backends honour")
    for key, value in params.items():
        _apply(f"optimizer.params.{key}", value, OPTIMIZER_PARAMS[key])
    torch_only = [k for k in ("fused", "foreach") if params.get(k) is not None]
    if backend == "deepspeed" and torch_only and params.get("torch_adam") is not True:
        raise ConfigError(f"ds_config optimizer.params.{torch_only[0]} is torch AdamW's; DeepSpeed passes it only "
                          "with optimizer.params.torch_adam=true (its FusedAdam takes no such argument); allowed: "
                          f"torch_adam=true, or no {torch_only[0]}")


def _check_precision(ds: dict) -> None:
    if ds.get("bf16", {}).get("enabled") is True and ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError("ds_config bf16.enabled=true and fp16.enabled=true are both on; allowed: at most one of them")


def _schedule_rule(name: str) -> Rule | None:
    """The range of a scheduler parameter, by DeepSpeed's naming (its constructors check almost none)."""
    if name == "warmup_num_steps":  # DeepSpeed's warm-up schedules refuse 0 when they are built
        return (lambda v: _integer(v) and v >= 1, "an integer >= 1")
    if name == "total_num_steps":
        return (lambda v: v == "auto" or (_integer(v) and v >= 1), "\"auto\" (train.max_updates) or an integer >= 1")
    if name == "warmup_type":
        return (lambda v: v in ("log", "linear"), "\"log\" or \"linear\"")
    if name.endswith("_ratio"):
        return (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
    if name.endswith("_lr"):
        return (lambda v: v is None or (_number(v) and v >= 0), "a number >= 0")
    return None


def _deepspeed_schedules() -> tuple[str, ...]:
    """DeepSpeed's own schedules (a torch one would not keep its position in a checkpoint)."""
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    return tuple(VALID_LR_SCHEDULES)


def _check_scheduler(ds: dict, backend: str, schedules: tuple[str, ...] | None) -> None:
    if "scheduler" not in ds:
        return
    sched = ds["scheduler"]
    _check_keys("scheduler", sched, ("type", "params"), "a key of the scheduler section")
    allowed = schedules if schedules is not None else _deepspeed_schedules()
    if sched.get("type") not in allowed:
        raise _bad("scheduler.type", sched.get("type"), f"{', '.join(allowed)} (parallel.backend={backend})")
    from deepspeed.runtime import lr_schedules

    signature = inspect.signature(getattr(lr_schedules, sched["type"]).__init__).parameters
    accepted = {k: p for k, p in signature.items() if k not in ("self", "optimizer", "last_batch_iteration")}
    params = sched.get("params", {})
    _check_keys("scheduler.params", params, tuple(accepted), f"a parameter of {sched['type']}")
    for key, p in accepted.items():
        if p.default is inspect.Parameter.empty and key not in params:
            needs = (_schedule_rule(key) or (None, "a value"))[1]
            raise ConfigError(f"ds_config scheduler.params.{key} is missing ({sched['type']} needs it); "
                              f"allowed: {needs}")
    for key, value in params.items():
        rule = _schedule_rule(key)
        if rule:
            _apply(f"scheduler.params.{key}", value, rule)


def _check_monitor_paths(ds: dict) -> None:
    """The folder a monitor writes to (``output_path/job_name``) must be creatable now, not at step 1."""
    for name in ("tensorboard", "csv_monitor"):
        section = ds.get(name, {})
        if not section.get("enabled") or not section.get("output_path"):
            continue  # an empty output_path means the run directory, which check_run_dir checks
        target = Path(section["output_path"]) / section.get("job_name", "DeepSpeedJobName")
        probe = next(p for p in (target, *target.parents) if os.path.exists(p))
        try:
            if not probe.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            raise ConfigError(f"ds_config {name}.output_path={_show(section['output_path'])} is not writable "
                              f"({probe}: {e.strerror}); allowed: a folder this user can create or write") from None


# ------------------------------------------------------------------------------ DeepSpeed's models
@contextmanager
def _deepspeed():
    """DeepSpeed imported as the backend will (naming the accelerator first: it warns when it has to
    guess) and silent meanwhile: the engine repeats whatever it has to say when it reads the JSON."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # as pick_device
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _model(section: str):
    module, name = MODELS[section]
    return getattr(importlib.import_module(module), name)


def _plain(annotation):
    """``Optional[X]`` → ``X``; None for unions of several types."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return annotation


def _field_type(model, loc: tuple):
    """The annotation at ``loc`` inside ``model`` (nested models followed), or None."""
    for i, key in enumerate(loc):
        declared = getattr(model, "model_fields", None) or {}
        fields = {f.alias or n: f for n, f in declared.items()} | dict(declared)
        if key not in fields:
            return None
        kind = _plain(fields[key].annotation)
        if i == len(loc) - 1:
            return kind
        model = kind
    return None


def _allowed(kind) -> str | None:
    """What a JSON value of a model field's type looks like (None: leave it to pydantic)."""
    if kind is bool:
        return "true or false"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return ", ".join(dict.fromkeys(json.dumps(m.value) for m in kind))
    if isinstance(kind, type) and issubclass(kind, (int, float)):
        return "a number"
    return None


def _strict_ok(kind, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(kind, type) and issubclass(kind, (int, float)):
        return _number(value)
    return True


def _check_strict(where: str, model, section: dict) -> None:
    """Refuse what pydantic would coerce: ``"yes"`` or ``1`` for a boolean, ``"1"`` or ``true`` for a number."""
    for key, value in section.items():
        kind = _field_type(model, (key,))
        if kind is None:
            continue
        if isinstance(kind, type) and hasattr(kind, "model_fields") and isinstance(value, dict):
            _check_strict(f"{where}.{key}", kind, value)
        elif not _strict_ok(kind, value):
            allowed = _allowed(kind)
            assert allowed is not None  # _strict_ok refuses only for booleans and numbers, which _allowed names
            raise _bad(f"{where}.{key}", value, allowed)


def _pydantic_line(where: str, model, error) -> ConfigError:
    """A pydantic ValidationError as one line: the dotted field and what is allowed there."""
    first = error.errors()[0]
    loc = tuple(str(k) for k in first["loc"])
    key = ".".join((where, *loc))
    fields = getattr(model, "model_fields", {})
    if first["type"] == "extra_forbidden":
        return _unknown(key, tuple(fields) if len(loc) == 1 else (), f"a key of DeepSpeed's {where} section")
    allowed = _allowed(_field_type(model, loc)) if fields and loc else None
    if allowed and first["type"].split("_")[0] in ("enum", "bool", "int", "float"):
        return _bad(key, first.get("input"), allowed)
    shown = f"={_show(first['input'])}" if loc and "input" in first else ""
    return ConfigError(f"ds_config {key}{shown} is not allowed; DeepSpeed says: {first['msg'].splitlines()[0]}")


def _check_model(section: str, value: dict) -> None:
    from pydantic import ValidationError

    model = _model(section)
    try:
        model(**value)
    except ValidationError as e:
        raise _pydantic_line(section, model, e) from None
    except Exception as e:  # noqa: BLE001 -- DeepSpeed's validators raise what they like; all of it is a bad section
        raise ConfigError(f"ds_config {section} is not allowed: DeepSpeed says {_first_line(e)}") from None
    _check_strict(section, model, value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ------------------------------------------------------------------------------ DeepSpeed's parser
class _Reads(dict):
    """The JSON as DeepSpeed's parser sees it, noting each top-level key it looks up (the list is
    shared with the shallow copy the parser takes)."""

    def __init__(self, data: dict, read: list):
        super().__init__(data)
        self.read = read

    def get(self, key, default=None):
        self.read.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.append(key)
        return super().__contains__(key)

    def keys(self):
        return KeysView(self)  # its ``in`` asks this mapping, so it is noted too


def _check_parser(ds: dict) -> None:
    """Every other section through ``DeepSpeedConfig``; then refuse the keys it never looked up."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    probe = copy.deepcopy(ds)
    probe.update({key: 1 for key in BATCH_KEYS})  # checked against the preset elsewhere; "auto" is ours
    read: list = []
    one_rank = types.SimpleNamespace(get_data_parallel_world_size=lambda: 1)  # the batch keys above are per rank
    try:
        DeepSpeedConfig(_Reads(probe, read), mpu=one_rank)
    except Exception as e:  # noqa: BLE001 -- its parser asserts and raises anything; name the section it was reading
        where: str | None = next((k for k in reversed(read) if k in ds), None)
        if isinstance(e, ValidationError) and where is not None:
            raise _pydantic_line(where, _model(where) if where in MODELS else None, e) from None
        if isinstance(e, (AttributeError, TypeError)) and where is not None and not isinstance(ds[where], dict):
            raise _bad(where, ds[where], "a JSON object {...}") from None
        label = f"ds_config {where}" if where else "ds_config"
        raise ConfigError(f"{label} is not allowed: DeepSpeed says {_first_line(e)}") from None
    known = sorted({k for k in read if isinstance(k, str)} | set(BATCH_KEYS) | set(OBJECTS) | set(SCALARS))
    for key in ds:
        if key not in known:
            raise _unknown(key, known, "a key DeepSpeed reads", "DeepSpeed would ignore it silently, so fix or remove "
                           "it; ")
