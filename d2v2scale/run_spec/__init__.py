"""The DeepSpeed JSON, read once: the one place d2v2scale reads the raw dict.

In the order a launch uses them:

- :mod:`.json_file` finds the file (a path or a shipped name) and reads it;
- :mod:`.validate` checks it whole, one line per mistake, before any process group;
- :mod:`.batch` splits ``train.global_batch`` as the JSON asks (or grows it under
  ``train.batch_scaling=linear``) and fills its ``"auto"`` values;
- :mod:`.spec` types the result: :class:`RunSpec`, what the engine, both backends, the planner,
  the metric sinks and the reports read;
- :mod:`.node` answers the node doctor's questions of a JSON nobody has validated yet.

Only the DeepSpeed backend (:mod:`d2v2scale.train.backend`) turns a spec back into a dict, DeepSpeed's own.
"""
from .batch import BatchPlan, linear_scaled_batch, plan_batch, resolve_ds_config, scale_batch_for_world
from .json_file import find_ds_config, flatten, load_ds_config
from .node import bf16_enabled, gpu_only_keys, ops_needed
from .spec import (
    MONITORS,
    MonitorSpec,
    OffloadSpec,
    OptimizerSpec,
    Precision,
    RunSpec,
    SchedulerSpec,
    ZeroSpec,
    peak_lr,
    read_spec,
    recorded_micro_batch,
    reference_row,
    run_spec,
    set_micro_batch,
    set_zero_stage,
)
from .validate import validate_ds_config

__all__ = [
    "MONITORS", "BatchPlan", "MonitorSpec", "OffloadSpec", "OptimizerSpec", "Precision", "RunSpec", "SchedulerSpec",
    "ZeroSpec", "bf16_enabled", "find_ds_config", "flatten", "gpu_only_keys", "linear_scaled_batch", "load_ds_config",
    "ops_needed", "peak_lr", "plan_batch", "read_spec", "recorded_micro_batch", "reference_row", "resolve_ds_config",
    "run_spec", "scale_batch_for_world", "set_micro_batch", "set_zero_stage", "validate_ds_config",
]
