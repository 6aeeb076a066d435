"""Run configuration: dataclass schema, YAML presets, ``section.key=value`` overrides, validation.

Everything a run needs except the DeepSpeed JSON lives here. Validation happens before any
process group exists, so a typo costs a second, not a Slurm allocation. Every failure is a
:class:`ConfigError` whose one-line message names the key and the values it accepts.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from . import modality as modalities
from .errors import ConfigError


class _OpenSection:
    """A section that a modality adds keys to (``model``, ``data``). Its own fields are the keys
    every modality reads; each registered modality's keys (``model.img_size`` is the image
    modality's, see :mod:`d2v2scale.modality`) sit flat beside them in ``extra``, so presets,
    overrides, config.yaml and readers (``cfg.model.img_size``) look as they did before the keys
    moved to their modality."""

    extra: dict

    def __getattr__(self, name: str) -> Any:  # only reached when normal lookup fails
        extra = self.__dict__.get("extra")
        if extra is not None and not name.startswith("__"):
            if name in extra:
                return extra[name]
            if name in modalities.section_keys(self.SECTION):  # registered after this config was made
                return modalities.section_keys(self.SECTION)[name][1]
        raise AttributeError(f"'{type(self).__name__}' has no key '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dataclass_fields__ or name not in modalities.section_keys(self.SECTION):
            object.__setattr__(self, name, value)
        else:
            self.extra[name] = value

    def flat(self) -> dict[str, Any]:
        """The section's keys and values, the modalities' included (what config.yaml holds)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**out, **{k: default for k, (_, default) in modalities.section_keys(self.SECTION).items()},
                **copy.deepcopy(self.extra)}


def _extra_defaults(section: str) -> Callable[[], dict]:
    return lambda: {k: default for k, (_, default) in modalities.section_keys(section).items()}


@dataclass
class ModelConfig(_OpenSection):
    """Encoder, teacher-target and loss settings (fairseq ``Data2VecMultiConfig`` names where they
    exist); the keys of one modality only (``img_size``, ``conv_feature_layers``, ``vocab_size``)
    are its module's, in ``extra``."""

    SECTION = "model"

    modality: str = "image"
    embed_dim: int = 768
    depth: int = 12  # shared ("main") blocks; targets come from these only
    prenet_depth: int = 0  # modality-specific blocks before the shared ones
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    encoder_dropout: float = 0.0  # attention / MLP output projections (fairseq encoder_dropout)
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    post_mlp_dropout: float = 0.0
    prenet_dropout: float = 0.0
    layerdrop: float = 0.0
    clone_batch: int = 1  # M: masked views per sample
    activation_checkpointing: int = 0  # student blocks: 0 off, 1 every block, k every k-th block
    compile: bool = False  # regional torch.compile: blocks, decoder, tensor math (d2v2scale.train.compile)
    cuda_graphs: bool = False  # compiled regions replayed as CUDA graphs (torch.compile mode="reduce-overhead")
    kernels: str = "auto"  # auto: apex's fused LayerNorm where apex is installed on a GPU | torch (d2v2scale.train.kernels)
    average_top_k_layers: int = 12
    instance_norm_target_layer: bool = True
    layer_norm_target_layer: bool = False
    layer_norm_targets: bool = False
    instance_norm_targets: bool = False
    loss_scale: float | None = None  # None: 1/sqrt(embed_dim), as the reference
    loss_beta: float = 0.0  # > 0 switches the regression loss to smooth-L1 with this beta
    cls_loss: float = 0.0
    # The CLS term's weight per view is cls_loss × this / train.global_batch: fairseq weighted it by
    # its per-GPU micro-batch (``cls_loss × sample_size``), so a preset pins the one of the run it
    # reproduces, and every split of the global batch optimises that objective. None: the global
    # batch itself (one micro-batch per update, as a 1-process fairseq run).
    cls_loss_reference_micro_batch: int | None = None
    mask_noise_std: float = 0.01
    num_extra_tokens: int = 0
    extra: dict = field(default_factory=_extra_defaults("model"), repr=False)

    def validate(self) -> None:
        _one_of("model.modality", self.modality, modalities.names())
        for key in ("embed_dim", "depth", "num_heads", "clone_batch", "average_top_k_layers"):
            _at_least(f"model.{key}", getattr(self, key), 1)
        _at_least("model.prenet_depth", self.prenet_depth, 0)
        require(self.activation_checkpointing >= 0,
               f"model.activation_checkpointing={self.activation_checkpointing} is not allowed; "
               "allowed values: 0 (off), 1 (every block), k (every k-th block)")
        require(self.embed_dim % self.num_heads == 0,
               f"model.num_heads={self.num_heads} must divide model.embed_dim={self.embed_dim}; allowed values: "
               f"divisors of {self.embed_dim}")
        require(self.average_top_k_layers <= self.depth,
               f"model.average_top_k_layers={self.average_top_k_layers} exceeds model.depth={self.depth}; "
               f"allowed values: 1..{self.depth}")
        for key in ("encoder_dropout", "attention_dropout", "activation_dropout", "post_mlp_dropout", "prenet_dropout",
                    "layerdrop"):
            v = getattr(self, key)
            require(0.0 <= v < 1.0, f"model.{key}={v} is not allowed; allowed values: 0 <= {key} < 1")
        require(self.mask_noise_std >= 0,
               f"model.mask_noise_std={self.mask_noise_std} is not allowed; allowed values: >= 0")
        _one_of("model.kernels", self.kernels, KERNELS)
        require(self.compile or not self.cuda_graphs,
               "model.cuda_graphs=true replays the compiled regions as CUDA graphs: it needs model.compile=true")
        ref = self.cls_loss_reference_micro_batch
        require(ref is None or ref >= 1, f"model.cls_loss_reference_micro_batch={ref} is not allowed; allowed "
                                        "values: null (the global batch) or integers >= 1")


@dataclass
class DecoderConfig:
    """The convolutional decoder (fairseq ``D2vDecoderConfig``)."""

    dim: int = 384
    kernel: int = 5
    layers: int = 5
    groups: int = 16
    residual: bool = True
    input_dropout: float = 0.0
    projection_layers: int = 1
    projection_ratio: float = 2.0

    def validate(self) -> None:
        require(0.0 <= self.input_dropout < 1.0,
               f"decoder.input_dropout={self.input_dropout} is not allowed; allowed values: 0 <= input_dropout < 1")
        for key in ("dim", "kernel", "layers", "groups", "projection_layers"):
            _at_least(f"decoder.{key}", getattr(self, key), 1)


@dataclass
class MaskingConfig:
    """Mask generator; ``kind`` auto picks the modality's own (2-D inverse blocks for images, 1-D blocks
    for spans longer than one, else random)."""

    kind: str = "auto"
    mask_prob: float = 0.8
    mask_prob_adjust: float = 0.0
    mask_length: int = 3
    inverse_mask: bool = True

    def validate(self) -> None:
        _one_of("masking.kind", self.kind, MASK_KINDS)
        require(0.0 < self.mask_prob < 1.0,
               f"masking.mask_prob={self.mask_prob} is not allowed; allowed values: 0 < mask_prob < 1")
        _at_least("masking.mask_length", self.mask_length, 1)
        require(self.mask_prob_adjust >= 0,
               f"masking.mask_prob_adjust={self.mask_prob_adjust} is not allowed; allowed values: >= 0")


@dataclass
class TeacherConfig:
    """EMA teacher: decay annealed linearly ``ema_decay → ema_end_decay`` over ``ema_anneal_end_step``."""

    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_end_step: int = 100_000
    ema_local_encoder: bool = True  # teacher has its own local encoder (images)
    ema_encoder_only: bool = False  # teacher is the shared blocks only (text)

    def validate(self) -> None:
        require(0.0 <= self.ema_decay <= self.ema_end_decay <= 1.0,
               f"teacher.ema_decay={self.ema_decay}, teacher.ema_end_decay={self.ema_end_decay}: "
               "allowed values: 0 <= ema_decay <= ema_end_decay <= 1")
        require(self.ema_anneal_end_step >= 0,
               f"teacher.ema_anneal_end_step={self.ema_anneal_end_step}; allowed values: integers >= 0")


@dataclass
class DataConfig(_OpenSection):
    """Where a run's items come from; a modality's own data keys (audio's ``max_tokens``) are in ``extra``."""

    SECTION = "data"
    kind: str = "synthetic"
    path: str | None = None
    num_workers: int = 2
    prefetch_steps: int = 1  # steps read ahead on a background thread (0: load when the step starts)
    sample_length: int | None = None  # synthetic audio/text: samples or tokens per item
    # images/audio: where the job's index of data.path is built once and read by every rank
    # (d2v2scale.data.index); null: RUN/data.d2v2index. A prepared index needs none.
    index_cache: str | None = None
    extra: dict = field(default_factory=_extra_defaults("data"), repr=False)

    def validate(self) -> None:
        _one_of("data.kind", self.kind, modalities.data_kinds())
        _at_least("data.prefetch_steps", self.prefetch_steps, 0)


@dataclass
class TrainConfig:
    global_batch: int = 256  # samples per optimizer step, all ranks together (pinned per preset)
    max_updates: int = 100
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops
    warn_target_var: float = 0.1  # collapse warnings (the reference aborts at these)
    warn_pred_var: float = 0.01
    warn_layer_spread_ratio: float = 0.1
    batch_scaling: str = "none"  # none | linear: grow global batch + LR when the GPUs cannot split it
    allow_long_warmup: bool = False  # permit an LR warm-up as long as (or longer than) the run
    checkpoint_format: str = "layout_free"  # layout_free (resumes on any layout/backend) | native (the backend's own, same layout)
    # hang watchdog (d2v2scale/resilience/watchdog.py): seconds a step may take before every rank's stacks are
    # written and the attempt restarts; None: 10 x the slowest step measured, at least 300 s
    hang_timeout_s: float | None = None
    setup_timeout_s: float = 1800.0  # the same for start-up, the first step and checkpoint writes

    def validate(self) -> None:
        _one_of("train.batch_scaling", self.batch_scaling, ("none", "linear"))
        _one_of("train.checkpoint_format", self.checkpoint_format, ("layout_free", "native"))
        for key in ("global_batch", "max_updates", "log_every", "save_every", "keep_last", "max_consecutive_skips"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        for key in ("hang_timeout_s", "setup_timeout_s"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"train.{key}={value}: allowed values: a number of seconds > 0"
                                  + (" or null (automatic)" if key == "hang_timeout_s" else ""))


KERNELS = ("auto", "torch")  # model.kernels, chosen in d2v2scale/train/kernels.py
# model keys that change how the same parameters compute, not what they are: a resume may change
# them, and the planner counts parameters once for all their values
HOW_THE_MODEL_RUNS = ("compile", "cuda_graphs", "activation_checkpointing", "kernels")
BACKENDS = ("deepspeed", "fsdp2")  # training backends, d2v2scale/train/backend/<name>.py; the first is the default


@dataclass
class ParallelConfig:
    tp: int = 1
    backend: str = BACKENDS[0]  # see d2v2scale.train.backend

    def validate(self) -> None:
        _at_least("parallel.tp", self.tp, 1)
        _one_of("parallel.backend", self.backend, BACKENDS)


@dataclass
class ProfilingConfig:
    enabled: bool = False
    trace_start: int = 5
    trace_steps: int = 3


@dataclass
class Config:
    """One run's configuration; ``preset`` records where it came from."""

    preset: str = ""
    seed: int = 1
    # Python modules imported before anything else is read: a modality registered outside the
    # package (d2v2scale.modality.register) comes with its run's config.yaml wherever it goes.
    plugins: list = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(model=self.model.flat(), data=self.data.flat())
        return out

    def run_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the keys only other modalities read (what a run's config.yaml shows)."""
        out = self.to_dict()
        for section in ("model", "data"):
            for key in list(out[section]):
                if modalities.key_owner(section, key) not in (None, self.model.modality):
                    del out[section][key]
        return out

    def model_spec(self) -> "ModelSpec":
        """The sections the model reads (``d2v2scale.model`` sees nothing else)."""
        return ModelSpec(self.model, self.decoder, self.masking, self.teacher)

    def mask_kind(self) -> str:
        return self.model_spec().mask_kind()


@dataclass(frozen=True)
class ModelSpec:
    """The model-only view of a :class:`Config`: architecture, decoder, masking and the teacher's
    target settings — no data, training, parallelism or profiling keys."""

    model: ModelConfig
    decoder: DecoderConfig
    masking: MaskingConfig
    teacher: TeacherConfig

    def mask_kind(self) -> str:
        """The mask generator this config resolves to."""
        if self.masking.kind != "auto":
            return self.masking.kind
        return modalities.get(self.model.modality).mask_kind(self.masking)


MASK_KINDS = ("auto", "block2d", "block1d", "random")
_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
_SCALARS = ("preset", "seed", "plugins")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _apply(cfg: Config, section: str, key: str | None, value: Any, source: str) -> None:
    if key is None:
        if section in _SCALARS:
            setattr(cfg, section, _coerce(section, value, _hints(Config)[section]))
            return
        if section in _SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                _apply(cfg, section, str(k), v, source)
            return
        allowed = ", ".join(list(_SCALARS) + [s for s in _SECTIONS if s not in _SCALARS])
        raise ConfigError(f"unknown key '{section}' in {source}; allowed: {allowed}")
    if section not in _SECTIONS or section in _SCALARS:
        allowed = ", ".join(s for s in _SECTIONS if s not in _SCALARS)
        raise ConfigError(f"unknown section '{section}' in '{section}.{key}' ({source}); allowed sections: {allowed}")
    sub = getattr(cfg, section)
    hints = {k: v for k, v in _hints(type(sub)).items() if k != "extra"}
    if isinstance(sub, _OpenSection):
        hints.update({k: tp for k, (tp, _) in modalities.section_keys(section).items()})
    if key not in hints:
        raise ConfigError(
            f"unknown key '{section}.{key}' ({source}); allowed keys in '{section}': {', '.join(hints)}"
        )
    setattr(sub, key, _coerce(f"{section}.{key}", value, hints[key]))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A section's resolved annotations, once per class (callers copy before they change it)."""
    return typing.get_type_hints(cls)


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    root = resources.files("d2v2scale") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_preset(preset: str) -> tuple[str, dict]:
    path = Path(preset)
    if preset.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file '{preset}' does not exist; give a YAML path or one of: {', '.join(preset_names())}")
        text, name = path.read_text(), path.stem
    else:
        res = resources.files("d2v2scale") / "presets" / f"{preset}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown preset '{preset}'; available presets: {', '.join(preset_names())}")
        text, name = res.read_text(), preset
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset '{preset}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{preset}' must be a YAML mapping of sections")
    return name, data


def parse_override(text: str) -> tuple[str, str | None, Any]:
    """``section.key=value`` → (section, key, YAML-parsed value); ``seed=3`` → ("seed", None, 3)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.max_updates=100)")
    path, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = path.strip().split(".")
    if len(parts) == 1:
        return parts[0], None, value
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.max_updates=100)")
    return parts[0], parts[1], value


def load_config(
    preset: str, overrides: list[str] | tuple[str, ...] = (), values: dict[str, Any] | None = None
) -> Config:
    """Build a validated :class:`Config` from a preset (name or YAML path), then ``values``
    (``{"model.depth": 3}``, e.g. read from a checkpoint), then command-line overrides."""
    name, data = _read_preset(preset)
    parsed = [parse_override(text) for text in overrides]
    import_plugins([*(data.get("plugins") or []), *((values or {}).get("plugins") or []),
                    *(name for section, key, value in parsed if section == "plugins" and key is None
                      for name in (value if isinstance(value, list) else [value]))])
    cfg = Config(preset=name)
    for section, value in data.items():
        _apply(cfg, str(section), None, value, f"preset '{preset}'")
    for dotted, value in (values or {}).items():
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key or None, value, "checkpoint config")
    for section, key, value in parsed:
        _apply(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def import_plugins(names: list) -> None:
    """Import the ``plugins`` modules (each registers what it brings); one line when one cannot."""
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"plugins: expected Python module names, got {name!r}")
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"plugins: cannot import {name!r} ({e}); is it on PYTHONPATH?") from None


def config_from_dict(data: dict, check: bool = True) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. a run directory's config.yaml);
    keys added since it was written take their defaults. ``check=False``: as it was saved, not
    held to today's checks (a resume compares it with the config it continues)."""
    import_plugins(data.get("plugins") or [])
    cfg = Config()
    for section, value in data.items():
        _apply(cfg, str(section), None, value, "saved config")
    if check:
        validate(cfg)
    return cfg


def require(ok: bool, message: str) -> None:
    """Raise the one-line :class:`ConfigError` ``message`` unless ``ok`` (config and modality checks)."""
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    require(value in allowed, f"{key}={value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")


def _at_least(key: str, value: int, low: int) -> None:
    require(value >= low, f"{key}={value} is not allowed; allowed values: integers >= {low}")


def validate(cfg: Config) -> None:
    """Each section's own :meth:`validate`, then the checks that span sections, here and nowhere
    else; the first failure is a one-line :class:`ConfigError` naming the key and allowed values."""
    for section in (cfg.model, cfg.decoder, cfg.masking, cfg.teacher, cfg.data, cfg.train, cfg.parallel):
        section.validate()
    modalities.get(cfg.model.modality).validate(cfg)
    _cross_section_checks(cfg)


def _cross_section_checks(cfg: Config) -> None:
    m, d, p = cfg.model, cfg.decoder, cfg.parallel
    mod = modalities.get(m.modality)
    kinds = ["synthetic"] + [k.name for k in mod.data_kinds]
    require(cfg.data.kind in kinds,
           f"data.kind={cfg.data.kind} is not data for model.modality={m.modality}; allowed values: {', '.join(kinds)}")
    divisors = [k for k in range(1, m.num_heads + 1) if m.num_heads % k == 0]
    require(m.num_heads % p.tp == 0,
           f"parallel.tp={p.tp} must divide model.num_heads={m.num_heads}; allowed values: {', '.join(map(str, divisors))}")
    require(d.dim % d.groups == 0 and m.embed_dim % d.groups == 0,
           f"decoder.groups={d.groups} must divide decoder.dim={d.dim} and model.embed_dim={m.embed_dim}")
    require(cfg.mask_kind() in mod.mask_kinds,
           f"masking.kind={cfg.masking.kind} is not for {m.modality}; allowed for {m.modality}: auto, "
           f"{', '.join(mod.mask_kinds)}")
    require(cfg.train.checkpoint_format == "layout_free" or p.backend == BACKENDS[0],
           f"train.checkpoint_format=native needs parallel.backend={BACKENDS[0]} (FSDP2 has no native format here); "
           f"allowed with {p.backend}: layout_free")