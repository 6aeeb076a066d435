"""The configuration key reference, generated from the schema: ``docs/configuration-keys.md``.

    python -m d2v2scale.config_reference > docs/configuration-keys.md

It walks the dataclasses of :mod:`d2v2scale.config` (every section, the top-level keys included)
and the keys each shipped modality adds to ``model`` and ``data`` (:mod:`d2v2scale.modality_registry`,
:mod:`d2v2scale.modalities`), and writes each ``section.key`` with its type, its default and the
comment written beside it in the source (the trailing ``# ...`` of the field's line, or the comment
lines right above it). The shipped DeepSpeed JSONs follow as a table read from the files.
``tests/test_docs.py`` checks that the committed file equals this module's output, so a new key,
a changed default or a new JSON fails the tests until the reference is regenerated.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from importlib import resources
from typing import Any

from . import config
from . import modality_registry
from .run_spec import reference_row

GENERATED_BY = "python -m d2v2scale.config_reference > docs/configuration-keys.md"
SHIPPED = "d2v2scale.modalities."  # modalities registered by other modules (plugins, tests) are not listed

# Descriptions of the keys whose field has no comment in the source. A comment written beside the
# field wins over these; tests/test_docs.py checks that every name here is a key of the schema.
NOTES = {
    "preset": "where this configuration came from: a shipped preset's name or a YAML path (set by the loader)",
    "seed": "keys the counter RNG (masks, crops, layerdrop, substitutes for bad files) and the torch RNG streams",
    "model.modality": "which modality module builds the encoder, decoder and data: image, audio, text (or a plugin's)",
    "model.embed_dim": "width of the Transformer blocks",
    "model.num_heads": "attention heads; parallel.tp must divide it",
    "model.mlp_ratio": "MLP hidden width / embed_dim",
    "model.norm_eps": "LayerNorm epsilon",
    "model.attention_dropout": "dropout on the attention weights",
    "model.activation_dropout": "dropout after the MLP activation",
    "model.post_mlp_dropout": "dropout after the MLP",
    "model.prenet_dropout": "dropout of the prenet blocks (only with prenet_depth > 0)",
    "model.layerdrop": "probability of skipping a shared block in training (drawn per step, the same on every rank)",
    "model.average_top_k_layers": "teacher targets: the mean of the last K shared blocks' FFN outputs",
    "model.instance_norm_target_layer": "instance-normalise each target layer before the mean",
    "model.layer_norm_target_layer": "layer-normalise each target layer before the mean",
    "model.layer_norm_targets": "layer-normalise the averaged targets",
    "model.instance_norm_targets": "instance-normalise the averaged targets",
    "model.cls_loss": "weight of the CLS-token loss (images; 0: off)",
    "model.mask_noise_std": "std of the N(0, σ) noise placed at masked positions of the decoder's input",
    "model.num_extra_tokens": "tokens before the patches (images: 1 = CLS)",
    "model.conv_feature_layers": "the wav2vec 2.0 CNN: [channels, kernel, stride] per layer",
    "model.conv_pos_width": "kernel width of the convolutional positional encoder",
    "model.conv_pos_depth": "layers of the convolutional positional encoder",
    "model.conv_pos_groups": "groups of the convolutional positional encoder",
    "model.use_alibi": "ALiBi attention bias with a learned per-head scale",
    "model.alibi_scale": "initial value of the per-head ALiBi scale",
    "model.img_size": "input side in pixels",
    "model.patch_size": "patch side in pixels",
    "model.in_chans": "input channels",
    "model.vocab_size": "token vocabulary",
    "model.max_positions": "learned positions: the longest block of tokens",
    "model.pad_idx": "padding token id",
    "decoder.dim": "channels of the convolutional decoder",
    "decoder.kernel": "kernel size of each decoder convolution",
    "decoder.layers": "decoder convolution layers",
    "decoder.groups": "groups of each decoder convolution; divides decoder.dim and model.embed_dim",
    "decoder.residual": "residual connection around each decoder layer whose width allows it",
    "decoder.input_dropout": "dropout on the decoder's input",
    "decoder.projection_layers": "layers of the decoder's output projection",
    "decoder.projection_ratio": "hidden width of a multi-layer projection, × its input width",
    "masking.kind": "auto, block2d (inverse 2-D blocks: images), block1d (spans: audio) or random (text)",
    "masking.mask_prob": "R: the fraction of positions masked; each row keeps int(L·(1−R))",
    "masking.mask_prob_adjust": "A: added to the share of block centres drawn before each row is equalised",
    "masking.mask_length": "B: block side (2-D) or span length (1-D)",
    "masking.inverse_mask": "fairseq's flag, kept for checkpoint conversion; the mask generator reads masking.kind "
                            "(block2d is always inverse)",
    "teacher.ema_decay": "EMA decay at the first update",
    "teacher.ema_end_decay": "EMA decay once the anneal ends (1: the teacher is frozen)",
    "teacher.ema_anneal_end_step": "updates over which the decay anneals linearly",
    "data.kind": "synthetic, digits, images, audio or text (each modality says which it reads)",
    "data.path": "an image folder, file list or prepared index; an audio folder, .tsv manifest or prepared "
                 "manifest; a token-file prefix",
    "data.num_workers": "threads of the image and audio readers (DALI) and of indexing",
    "data.min_sample_size": "audio shorter than this many 16 kHz samples is left out",
    "data.max_sample_size": "audio longer than this is randomly cropped to it (16 kHz samples)",
    "train.max_updates": "optimizer steps of the run (the LR schedule's length)",
    "train.log_every": "steps between metrics.jsonl rows and log lines",
    "train.save_every": "steps between checkpoints",
    "train.keep_last": "checkpoints kept (the one `latest` names is never removed)",
    "train.warn_pred_var": "collapse warning: the predictions' spread under this",
    "train.warn_layer_spread_ratio": "collapse warning: a target layer's spread under this × its first value",
    "parallel.tp": "tensor-parallel degree: divides model.num_heads; a TP group sits inside a node",
    "profiling.enabled": "the same as --profile: phase timers, NVML, a torch.profiler trace, RUN/report/",
    "profiling.trace_start": "first step of the torch.profiler trace",
    "profiling.trace_steps": "steps in the trace (one Chrome trace file per rank)",
}


@dataclass(frozen=True)
class Key:
    """One configuration key: ``section`` is "" for the top-level keys (``seed=3``)."""

    section: str
    name: str
    type: str
    default: Any
    doc: str
    owner: str | None = None  # the modality whose key it is, or None: every modality reads it

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _rst_to_md(text: str) -> str:
    """``x`` and :role:`~x` (reStructuredText) as markdown code."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Per field of a dataclass: the comment on its line(s), or the comment lines right above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line → comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for node in typing.cast(ast.ClassDef, ast.parse(source).body[0]).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        above: list[str] = []
        n = node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        out[node.target.id] = " ".join(above + trailing)
    return out


def _class_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses write when a class has no docstring
        return ""
    return _rst_to_md(" ".join(doc.split()))


def _dataclass_keys(section: str, cls: type, owner: str | None = None, skip: tuple[str, ...] = ()) -> list[Key]:
    hints = typing.get_type_hints(cls)
    notes = field_comments(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        dotted = f"{section}.{f.name}" if section else f.name
        doc = notes.get(f.name) or NOTES.get(dotted, "")
        keys.append(Key(section, f.name, _type_name(hints[f.name]), default, _rst_to_md(doc), owner))
    return keys


def shipped_modalities() -> list[modality_registry.Modality]:
    """The modalities the package ships, in registration order (not those a plugin or a test adds)."""
    import d2v2scale.modalities  # noqa: F401  (registers them)

    registered = [modality_registry.get(n) for n in modality_registry.names()]
    return [m for m in registered if type(m).__module__.startswith(SHIPPED)]


def sections() -> list[tuple[str, type | None]]:
    """(section name, its dataclass) in the order of :class:`~d2v2scale.config.Config`; "" is the top level."""
    out: list[tuple[str, type | None]] = [("", None)]
    for f in dataclasses.fields(config.Config):
        factory = f.default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            out.append((f.name, factory))
    return out


def schema_keys() -> list[Key]:
    """Every key a preset, an override or config.yaml may set, in the order this reference lists them."""
    top = [f.name for f in dataclasses.fields(config.Config) if f.name not in dict(sections()[1:])]
    keys = [k for k in _dataclass_keys("", config.Config) if k.name in top]
    for section, cls in sections():
        if cls is None:
            continue
        keys += _dataclass_keys(section, cls, skip=(config.MODALITY_KEYS,))
        if issubclass(cls, config.ModalitySection):
            for m in shipped_modalities():
                own = m.keys_class(section)
                if own is not None:
                    keys += _dataclass_keys(section, own, owner=m.name)
    return keys


def key_names() -> set[str]:
    """``section.key`` (and the top-level names) of every key in the schema."""
    return {k.dotted for k in schema_keys()}


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if v == "":
        return '""'
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def ds_config_rows() -> list[str]:
    """One markdown row per shipped DeepSpeed JSON, read from the files."""
    rows = []
    root = resources.files("d2v2scale") / "ds_configs"
    for path in sorted((p for p in root.iterdir() if p.name.endswith(".json")), key=lambda p: p.name):
        precision, stage, micro, lr, betas, decay, warmup, clipping, zero = reference_row(json.loads(path.read_text()))
        extra = ", ".join(f"{k}={_value(v)}" for k, v in zero.items())
        rows.append(f"| `{path.name}` | {precision} | {stage} | {_value(micro)} | {_value(lr)} | {_value(betas)} | "
                    f"{_value(decay)} | {_value(warmup)} | {_value(clipping)} | {_cell(extra)} |")
    return rows


def render() -> str:
    lines = ["# Configuration key reference", "",
             f"<!-- Generated by `{GENERATED_BY}`; do not edit by hand. "
             "tests/test_docs.py fails when this file and the schema disagree. -->", "",
             "Every key of a run's configuration: set it in a preset YAML (`section: {key: value}`) or on the "
             "command line as `section.key=value` (top-level keys as `key=value`). How the layers combine is in "
             "[configuration.md](configuration.md). *Modality* names the modality whose key it is: the key sits "
             "in its section like the others, and a run's `config.yaml` lists only its own modality's keys.", ""]
    keys = schema_keys()
    for section, cls in sections():
        lines += [f"## {'top level' if not section else f'`{section}`'}", ""]
        doc = _class_doc(cls if cls is not None else config.Config)
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | modality | description |", "|---|---|---|---|---|"]
        for k in (k for k in keys if k.section == section):
            lines.append(f"| `{k.dotted}` | {_cell(k.type)} | `{_cell(_value(k.default))}` | {k.owner or ''} | "
                         f"{_cell(k.doc)} |")
        lines.append("")
    lines += ["## Shipped DeepSpeed JSONs", "",
              "Read from `d2v2scale/ds_configs/*.json` (`ds_configs/` in the repository is a link to that folder). "
              "`auto` is filled from the preset at start (`--print-config` shows the result); what each file is "
              "for is in [configuration.md](configuration.md#deepspeed-json).", "",
              "| file | precision | ZeRO stage | micro-batch per GPU | lr | betas | weight decay | warm-up steps "
              "| clipping | other zero_optimization keys |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += ds_config_rows()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv if argv is not None else sys.argv[1:]:
        print(f"usage: {GENERATED_BY}", file=sys.stderr)
        return 2
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
