"""Run configuration: dataclass schema, YAML presets, ``section.key=value`` overrides, validation.

Everything a run needs except the DeepSpeed JSON lives here. Validation happens before any
process group exists, so a typo costs a second, not a Slurm allocation. Every failure is a
:class:`ConfigError` whose one-line message names the key and the values it accepts.

Sections are slotted dataclasses, so assigning a name that is not a key raises AttributeError
instead of becoming an attribute no config.yaml will ever hold. A modality's own keys are one
typed object per modality (``cfg.model.keys(ImageKeys).img_size``); users still name them flat
(``model.img_size``) in presets, overrides and config.yaml. A field marked :func:`resumable` is
one a resume may change (:func:`resumable_keys`).
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
from typing import Any, Callable, ClassVar, TypeVar

import yaml

from . import modality_registry
from .errors import ConfigError

T = TypeVar("T")
K = TypeVar("K")
MODALITY_KEYS = "modality_keys"  # the field of model and data that holds the modalities' keys objects


def resumable(default: T) -> T:
    """A field with ``default`` that a resume may change: how a run is driven, watched or laid
    out, not what it computes (:func:`resumable_keys`; ``check_resume`` holds a resume to the rest)."""
    return field(default=default, metadata={"resumable": True})


def _modality_keys(section: str) -> Callable[[], dict[type, Any]]:
    return lambda: {cls: cls() for cls in modality_registry.keys_classes(section)}


class ModalitySection:
    """A section that modalities add keys to (``model``, ``data``). Each registered modality's keys
    of the section are one object of its keys dataclass (``model_keys`` / ``data_keys``), read and
    changed through :meth:`keys`; :meth:`flat` names them beside the section's own keys, as
    presets, overrides and config.yaml do (``model.img_size``)."""

    __slots__ = ()
    SECTION: ClassVar[str]
    modality_keys: dict[type, Any]

    def keys(self, cls: type[K]) -> K:
        """The live keys object of ``cls``, a registered modality's keys of this section:
        ``cfg.model.keys(ImageKeys).img_size = 32`` changes the config."""
        held = self.modality_keys.get(cls)
        if held is None:
            registered = modality_registry.keys_classes(self.SECTION)
            if cls not in registered:
                raise TypeError(f"{cls.__name__} is not the {self.SECTION} keys of a registered modality; registered: "
                                f"{', '.join(c.__name__ for c in registered)}")
            held = self.modality_keys[cls] = cls()  # its modality registered after this config was made
        return typing.cast(K, held)

    def flat(self, only: str | None = None) -> dict[str, Any]:
        """The section's keys and values as config.yaml names them: its own, then each registered
        modality's (``only``: that modality's alone)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in _key_fields(type(self))}
        for cls, owner in modality_registry.keys_classes(self.SECTION).items():
            if only is None or only == owner:
                held = self.modality_keys.get(cls)
                out.update(dataclasses.asdict(cls() if held is None else held))
        return out


@dataclass(slots=True)
class ModelConfig(ModalitySection):
    """Encoder, teacher-target and loss settings (fairseq ``Data2VecMultiConfig`` names where they
    exist); the keys of one modality only (``img_size``, ``conv_feature_layers``, ``vocab_size``)
    are its module's, read as ``cfg.model.keys(ImageKeys)``."""

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
    activation_checkpointing: int = resumable(0)  # student blocks: 0 off, 1 every block, k every k-th block
    compile: bool = resumable(False)  # regional torch.compile: blocks, decoder, tensor math (d2v2scale.train.compile)
    cuda_graphs: bool = resumable(False)  # compiled regions replayed as CUDA graphs (torch.compile mode="reduce-overhead")
    kernels: str = resumable("auto")  # auto: apex's fused LayerNorm where apex is installed on a GPU | torch (d2v2scale.train.kernels)
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
    modality_keys: dict[type, Any] = field(default_factory=_modality_keys("model"), repr=False)

    def validate(self) -> None:
        _one_of("model.modality", self.modality, modality_registry.names())
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


@dataclass(slots=True)
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


@dataclass(slots=True)
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


@dataclass(slots=True)
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


@dataclass(slots=True)
class DataConfig(ModalitySection):
    """Where a run's items come from; a modality's own data keys (audio's ``max_tokens``) are its
    module's, read as ``cfg.data.keys(AudioDataKeys)``."""

    SECTION = "data"
    kind: str = "synthetic"
    path: str | None = resumable(None)
    num_workers: int = resumable(2)
    prefetch_steps: int = resumable(1)  # steps read ahead on a background thread (0: load when the step starts)
    sample_length: int | None = None  # synthetic audio/text: samples or tokens per item
    # images/audio: where the job's index of data.path is built once and read by every rank
    # (d2v2scale.data.index); null: RUN/data.d2v2index. A prepared index needs none.
    index_cache: str | None = resumable(None)
    # a resume onto a data set whose index changed since the checkpoint (another data order): true warns and
    # continues, false refuses (each checkpoint records the index's fingerprint)
    allow_changed: bool = resumable(True)
    modality_keys: dict[type, Any] = field(default_factory=_modality_keys("data"), repr=False)

    def validate(self) -> None:
        _one_of("data.kind", self.kind, modality_registry.data_kinds())
        _at_least("data.prefetch_steps", self.prefetch_steps, 0)


@dataclass(slots=True)
class TrainConfig:
    global_batch: int = 256  # samples per optimizer step, all ranks together (pinned per preset)
    max_updates: int = resumable(100)
    log_every: int = resumable(10)
    save_every: int = resumable(1000)
    keep_last: int = resumable(3)
    max_consecutive_skips: int = resumable(10)  # non-finite steps in a row before the run stops
    warn_target_var: float = resumable(0.1)  # collapse warnings (the reference aborts at these)
    warn_pred_var: float = resumable(0.01)
    warn_layer_spread_ratio: float = resumable(0.1)
    batch_scaling: str = resumable("none")  # none | linear: grow global batch + LR when the GPUs cannot split it
    allow_long_warmup: bool = resumable(False)  # permit an LR warm-up as long as (or longer than) the run
    checkpoint_format: str = resumable("layout_free")  # layout_free (resumes on any layout/backend) | native (the backend's own, same layout)
    # hang watchdog (d2v2scale/resilience/watchdog.py): seconds a step may take before every rank's stacks are
    # written and the attempt restarts; None: 10 x the slowest step measured, at least 300 s
    hang_timeout_s: float | None = resumable(None)
    setup_timeout_s: float = resumable(1800.0)  # the same for start-up, the first step and checkpoint writes

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
BACKENDS = ("deepspeed", "fsdp2")  # training backends, d2v2scale/train/backend/<name>.py; the first is the default


@dataclass(slots=True)
class ParallelConfig:
    tp: int = resumable(1)
    backend: str = resumable(BACKENDS[0])  # see d2v2scale.train.backend

    def validate(self) -> None:
        _at_least("parallel.tp", self.tp, 1)
        _one_of("parallel.backend", self.backend, BACKENDS)


@dataclass(slots=True)
class ProfilingConfig:
    enabled: bool = resumable(False)
    trace_start: int = resumable(5)
    trace_steps: int = resumable(3)

    def validate(self) -> None:
        require(isinstance(self.enabled, bool),
                f"profiling.enabled={self.enabled!r} is not allowed; allowed values: true, false")
        _at_least("profiling.trace_start", self.trace_start, 0)
        _at_least("profiling.trace_steps", self.trace_steps, 1)


@dataclass(slots=True)
class Config:
    """One run's configuration; ``preset`` records where it came from."""

    preset: str = resumable("")
    seed: int = 1
    # Python modules imported before anything else is read: a modality registered outside the
    # package (d2v2scale.modality_registry.register) comes with its run's config.yaml wherever it goes.
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
        """Every key, every registered modality's included (what a checkpoint's run.json holds)."""
        return self._dict(None)

    def run_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the keys only other modalities read (what a run's config.yaml shows)."""
        return self._dict(self.model.modality)

    def _dict(self, only: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.flat(only) if isinstance(value, ModalitySection) else \
                dataclasses.asdict(value) if f.name in _SECTIONS else copy.deepcopy(value)
        return out

    def value(self, key: str) -> Any:
        """The value of ``key`` as users name it (``model.img_size``, ``seed``): for tables of keys,
        such as fairseq's; code reads the typed attribute."""
        section, _, name = key.partition(".")
        if not name:
            return getattr(self, section)
        return getattr(_holder(self, section, name, "Config.value")[0], name)

    def set_value(self, key: str, value: Any) -> None:
        """Set ``key`` as an override does, checked against its type (:func:`validate` checks the rest)."""
        section, _, name = key.partition(".")
        _apply(self, section, name or None, value, "Config.set_value")

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
        return modality_registry.get(self.model.modality).mask_kind(self.masking)


MASK_KINDS = ("auto", "block2d", "block1d", "random")
_SCALARS = ("preset", "seed", "plugins")
_SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name not in _SCALARS}


def _key_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """A section's fields that are keys (not the modalities' keys objects)."""
    return [f for f in dataclasses.fields(cls) if f.name != MODALITY_KEYS]


def resumable_keys() -> tuple[str, ...]:
    """Every key a resume may change, ``section.key`` as users name them: the fields marked
    :func:`resumable`, a registered modality's keys included."""
    out = [f.name for f in dataclasses.fields(Config) if f.name in _SCALARS and f.metadata.get("resumable")]
    for section in _SECTIONS:
        cls = _hints(Config)[section]
        owners = modality_registry.keys_classes(section) if issubclass(cls, ModalitySection) else {}
        for c in (cls, *owners):
            out += [f"{section}.{f.name}" for f in _key_fields(c) if f.metadata.get("resumable")]
    return tuple(out)


# model keys that change how the same parameters compute, not what they are: a resume may change
# them, and the planner counts parameters once for all their values
HOW_THE_MODEL_RUNS = tuple(f.name for f in _key_fields(ModelConfig) if f.metadata.get("resumable"))


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
        raise ConfigError(f"unknown key '{section}' in {source}; allowed: {', '.join([*_SCALARS, *_SECTIONS])}")
    holder, tp = _holder(cfg, section, key, source)
    setattr(holder, key, _coerce(f"{section}.{key}", value, tp))


def _holder(cfg: Config, section: str, key: str, source: str) -> tuple[Any, Any]:
    """The object that holds ``section.key`` (the section, or a modality's keys object) and the key's type."""
    if section not in _SECTIONS:
        raise ConfigError(f"unknown section '{section}' in '{section}.{key}' ({source}); allowed sections: "
                          f"{', '.join(_SECTIONS)}")
    sub = getattr(cfg, section)
    cls: type = type(sub)
    hints = {f.name: _hints(cls)[f.name] for f in _key_fields(cls)}
    if key in hints:
        return sub, hints[key]
    owners = modality_registry.section_keys(section) if isinstance(sub, ModalitySection) else {}
    if key in owners:
        return sub.keys(owners[key]), _hints(owners[key])[key]
    raise ConfigError(f"unknown key '{section}.{key}' ({source}); allowed keys in '{section}': "
                      f"{', '.join([*hints, *owners])}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved annotations, once per class (resolving them is most of a load's time)."""
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
        section, _, field_name = dotted.partition(".")
        _apply(cfg, section, field_name or None, value, "checkpoint config")
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
    for section in (cfg.model, cfg.decoder, cfg.masking, cfg.teacher, cfg.data, cfg.train, cfg.parallel, cfg.profiling):
        section.validate()
    modality_registry.get(cfg.model.modality).validate(cfg)
    _cross_section_checks(cfg)


def _cross_section_checks(cfg: Config) -> None:
    m, d, p = cfg.model, cfg.decoder, cfg.parallel
    mod = modality_registry.get(m.modality)
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