"""Run configuration: dataclass schema, YAML presets, ``section.key=value`` overrides, validation.

Everything a run needs except the DeepSpeed JSON lives here. Validation happens before any
process group exists, so a typo costs a second, not a Slurm allocation. Every failure is a
:class:`ConfigError` whose one-line message names the key and the values it accepts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

MODALITIES = ("image", "audio", "text")
DATA_KINDS = ("synthetic", "digits", "images", "audio", "text")
DATA_FOR = {"image": ("synthetic", "digits", "images"), "audio": ("synthetic", "audio"), "text": ("synthetic", "text")}


class ConfigError(ValueError):
    """A configuration or command-line mistake; the message is one line meant for the user."""


@dataclass
class ModelConfig:
    """Encoder, teacher-target and loss settings (fairseq ``Data2VecMultiConfig`` names where they exist)."""

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
    # image
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    # audio
    conv_feature_layers: list = field(
        default_factory=lambda: [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    )
    conv_pos_width: int = 95
    conv_pos_depth: int = 5
    conv_pos_groups: int = 16
    use_alibi: bool = False
    alibi_scale: float = 1.0
    # text
    vocab_size: int = 50265
    max_positions: int = 512
    pad_idx: int = 1
    embed_dropout: float = 0.1  # after the token + position embedding (fairseq modalities.text.dropout)

    def validate(self) -> None:
        _one_of("model.modality", self.modality, MODALITIES)
        for key in ("embed_dim", "depth", "num_heads", "clone_batch", "average_top_k_layers"):
            _at_least(f"model.{key}", getattr(self, key), 1)
        _at_least("model.prenet_depth", self.prenet_depth, 0)
        _check(self.activation_checkpointing >= 0,
               f"model.activation_checkpointing={self.activation_checkpointing} is not allowed; "
               "allowed values: 0 (off), 1 (every block), k (every k-th block)")
        _check(self.embed_dim % self.num_heads == 0,
               f"model.num_heads={self.num_heads} must divide model.embed_dim={self.embed_dim}; allowed values: "
               f"divisors of {self.embed_dim}")
        _check(self.average_top_k_layers <= self.depth,
               f"model.average_top_k_layers={self.average_top_k_layers} exceeds model.depth={self.depth}; "
               f"allowed values: 1..{self.depth}")
        for key in ("encoder_dropout", "attention_dropout", "activation_dropout", "post_mlp_dropout", "prenet_dropout",
                    "layerdrop", "embed_dropout"):
            v = getattr(self, key)
            _check(0.0 <= v < 1.0, f"model.{key}={v} is not allowed; allowed values: 0 <= {key} < 1")
        _check(self.mask_noise_std >= 0,
               f"model.mask_noise_std={self.mask_noise_std} is not allowed; allowed values: >= 0")
        _one_of("model.kernels", self.kernels, KERNELS)
        if self.modality == "image":
            _check(self.img_size % self.patch_size == 0,
                   f"model.patch_size={self.patch_size} must divide model.img_size={self.img_size}")
            _check(self.num_extra_tokens >= 0, "model.num_extra_tokens must be >= 0")
            _check(self.cls_loss == 0 or self.num_extra_tokens >= 1,
                   f"model.cls_loss={self.cls_loss} needs model.num_extra_tokens >= 1 (the CLS token)")
            ref = self.cls_loss_reference_micro_batch
            _check(ref is None or ref >= 1, f"model.cls_loss_reference_micro_batch={ref} is not allowed; allowed "
                                            "values: null (the global batch) or integers >= 1")
        else:
            _check(self.num_extra_tokens == 0,
                   f"model.num_extra_tokens={self.num_extra_tokens}: allowed values for {self.modality}: 0")
            _check(self.cls_loss == 0,
                   f"model.cls_loss={self.cls_loss}: allowed values for {self.modality}: 0 (CLS loss is image-only)")
        if self.modality == "audio":
            _check(self.embed_dim % self.conv_pos_groups == 0,
                   f"model.conv_pos_groups={self.conv_pos_groups} must divide model.embed_dim={self.embed_dim}")
            _check(all(isinstance(layer, list) and len(layer) == 3 and all(isinstance(v, int) and v >= 1 for v in layer)
                       for layer in self.conv_feature_layers),
                   "model.conv_feature_layers: allowed values: a list of [channels, kernel, stride] triples of "
                   "positive integers")
        if self.modality == "text":
            _check(self.vocab_size > self.pad_idx >= 0, f"model.vocab_size={self.vocab_size} must exceed "
                                                        f"model.pad_idx={self.pad_idx}; allowed values: integers > "
                                                        f"{self.pad_idx}")
            _at_least("model.max_positions", self.max_positions, 1)


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
        _check(0.0 <= self.input_dropout < 1.0,
               f"decoder.input_dropout={self.input_dropout} is not allowed; allowed values: 0 <= input_dropout < 1")
        for key in ("dim", "kernel", "layers", "groups", "projection_layers"):
            _at_least(f"decoder.{key}", getattr(self, key), 1)


@dataclass
class MaskingConfig:
    """Mask generator; ``kind`` auto picks 2-D inverse blocks (image), 1-D blocks (audio) or random (text)."""

    kind: str = "auto"
    mask_prob: float = 0.8
    mask_prob_adjust: float = 0.0
    mask_length: int = 3
    inverse_mask: bool = True

    def validate(self) -> None:
        _one_of("masking.kind", self.kind, MASK_KINDS)
        _check(0.0 < self.mask_prob < 1.0,
               f"masking.mask_prob={self.mask_prob} is not allowed; allowed values: 0 < mask_prob < 1")
        _at_least("masking.mask_length", self.mask_length, 1)
        _check(self.mask_prob_adjust >= 0,
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
        _check(0.0 <= self.ema_decay <= self.ema_end_decay <= 1.0,
               f"teacher.ema_decay={self.ema_decay}, teacher.ema_end_decay={self.ema_end_decay}: "
               "allowed values: 0 <= ema_decay <= ema_end_decay <= 1")
        _check(self.ema_anneal_end_step >= 0,
               f"teacher.ema_anneal_end_step={self.ema_anneal_end_step}; allowed values: integers >= 0")


@dataclass
class DataConfig:
    kind: str = "synthetic"
    path: str | None = None
    num_workers: int = 2
    prefetch_steps: int = 1  # steps read ahead on a background thread (0: load when the step starts)
    max_tokens: int | None = None  # audio: samples per micro-batch per rank
    min_sample_size: int = 32_000
    max_sample_size: int = 320_000
    sample_length: int | None = None  # synthetic audio/text: samples or tokens per item
    # images/audio: where the job's index of data.path is built once and read by every rank
    # (d2v2scale.data.index); null: RUN/data.d2v2index. A prepared index needs none.
    index_cache: str | None = None

    def validate(self) -> None:
        _one_of("data.kind", self.kind, DATA_KINDS)
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

    def validate(self) -> None:
        _one_of("train.batch_scaling", self.batch_scaling, ("none", "linear"))
        _one_of("train.checkpoint_format", self.checkpoint_format, ("layout_free", "native"))
        for key in ("global_batch", "max_updates", "log_every", "save_every", "keep_last", "max_consecutive_skips"):
            _at_least(f"train.{key}", getattr(self, key), 1)


KERNELS = ("auto", "torch")  # model.kernels, chosen in d2v2scale/train/kernels.py
# model keys that change how the same parameters compute, not what they are: a resume may change
# them, and the planner counts parameters once for all their values
HOW_THE_MODEL_RUNS = ("compile", "activation_checkpointing", "kernels")
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
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the keys only other modalities read (what a run's config.yaml shows)."""
        out = self.to_dict()
        for modality, sections in MODALITY_KEYS.items():
            if modality != self.model.modality:
                for section, keys in sections.items():
                    for key in keys:
                        out[section].pop(key, None)
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
        if self.model.modality == "image":
            return "block2d"
        return "block1d" if self.masking.mask_length > 1 else "random"


MASK_KINDS = ("auto", "block2d", "block1d", "random")
# Keys only one modality reads, by section (the others' are left out of a run's config.yaml).
MODALITY_KEYS = {
    "image": {"model": ("img_size", "patch_size", "in_chans")},
    "audio": {"model": ("conv_feature_layers", "conv_pos_width", "conv_pos_depth", "conv_pos_groups", "use_alibi",
                        "alibi_scale"),
              "data": ("max_tokens", "min_sample_size", "max_sample_size")},
    "text": {"model": ("vocab_size", "max_positions", "pad_idx", "embed_dropout")},
}
_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
_SCALARS = ("preset", "seed")


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
    hints = _hints(type(sub))
    if key not in hints:
        raise ConfigError(
            f"unknown key '{section}.{key}' ({source}); allowed keys in '{section}': {', '.join(hints)}"
        )
    setattr(sub, key, _coerce(f"{section}.{key}", value, hints[key]))


def _hints(cls: type) -> dict[str, Any]:
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
    cfg = Config(preset=name)
    for section, value in data.items():
        _apply(cfg, str(section), None, value, f"preset '{preset}'")
    for dotted, value in (values or {}).items():
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key or None, value, "checkpoint config")
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. a run directory's config.yaml)."""
    cfg = Config()
    for section, value in data.items():
        _apply(cfg, str(section), None, value, "saved config")
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{key}={value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")


def _at_least(key: str, value: int, low: int) -> None:
    _check(value >= low, f"{key}={value} is not allowed; allowed values: integers >= {low}")


def frame_lengths(conv_layers: list, length):
    """The length after each layer of the wav2vec CNN (``[channels, kernel, stride]`` per layer) for
    ``length`` input samples: an int or an integer tensor (floor division either way). The model,
    the planner's memory and FLOPs and the positions count all read it here."""
    out = []
    for _, kernel, stride in conv_layers:
        length = (length - kernel) // stride + 1
        out.append(length)
    return out


def receptive_field(conv_layers: list) -> int:
    """Input samples one output frame of the wav2vec CNN sees (400 for the standard 7-layer stack)."""
    field, stride = 1, 1
    for _, kernel, layer_stride in conv_layers:
        field += (kernel - 1) * stride
        stride *= layer_stride
    return field


def _check_audio_sizes(cfg: Config) -> None:
    d = cfg.data
    rf = receptive_field(cfg.model.conv_feature_layers)
    _check(d.min_sample_size >= rf, f"data.min_sample_size={d.min_sample_size} is below the CNN's receptive field "
                                    f"of {rf} samples (one frame); allowed values: >= {rf}")
    _check(d.max_sample_size >= d.min_sample_size, f"data.max_sample_size={d.max_sample_size} is below "
                                                   f"data.min_sample_size={d.min_sample_size}; allowed values: "
                                                   f">= {d.min_sample_size}")
    if d.sample_length is not None:
        _check(d.sample_length >= rf, f"data.sample_length={d.sample_length} is below the CNN's receptive field of "
                                      f"{rf} samples; allowed values: >= {rf}")
    if d.max_tokens is not None:
        _check(d.max_tokens >= d.max_sample_size, f"data.max_sample_size={d.max_sample_size} exceeds data.max_tokens="
                                                  f"{d.max_tokens}: one crop would not fit a micro-batch; allowed: "
                                                  f"data.max_tokens >= {d.max_sample_size}")


def validate(cfg: Config) -> None:
    """Each section's own :meth:`validate`, then the checks that span sections, here and nowhere
    else; the first failure is a one-line :class:`ConfigError` naming the key and allowed values."""
    for section in (cfg.model, cfg.decoder, cfg.masking, cfg.teacher, cfg.data, cfg.train, cfg.parallel):
        section.validate()
    _cross_section_checks(cfg)


def _cross_section_checks(cfg: Config) -> None:
    m, d, t, p = cfg.model, cfg.decoder, cfg.teacher, cfg.parallel
    _check(cfg.data.kind in DATA_FOR[m.modality],
           f"data.kind={cfg.data.kind} is not data for model.modality={m.modality}; allowed values: "
           f"{', '.join(DATA_FOR[m.modality])}")
    divisors = [k for k in range(1, m.num_heads + 1) if m.num_heads % k == 0]
    _check(m.num_heads % p.tp == 0,
           f"parallel.tp={p.tp} must divide model.num_heads={m.num_heads}; allowed values: {', '.join(map(str, divisors))}")
    _check(d.dim % d.groups == 0 and m.embed_dim % d.groups == 0,
           f"decoder.groups={d.groups} must divide decoder.dim={d.dim} and model.embed_dim={m.embed_dim}")
    if m.modality == "audio":
        _check_audio_sizes(cfg)
    if cfg.mask_kind() == "block2d":
        _check(m.modality == "image", f"masking.kind=block2d is for images; allowed for {m.modality}: block1d, random")
    _check(t.ema_encoder_only or m.modality != "text",
           "teacher.ema_encoder_only=false is not supported for text; allowed values: true")
    _check(not (m.modality == "audio" and t.ema_local_encoder),
           "teacher.ema_local_encoder=true is not supported for audio (the teacher shares the student's CNN); "
           "allowed values: false")
    _check(cfg.train.checkpoint_format == "layout_free" or p.backend == BACKENDS[0],
           f"train.checkpoint_format=native needs parallel.backend={BACKENDS[0]} (FSDP2 has no native format here); "
           f"allowed with {p.backend}: layout_free")