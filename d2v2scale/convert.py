"""Convert checkpoints between fairseq's data2vec 2.0 layout and d2v2scale.

    python -m d2v2scale.convert from-fairseq IN.pt OUT.pt [--preset NAME|path.yaml] [--trust_checkpoint] [key=value ...]
    python -m d2v2scale.convert to-fairseq IN OUT.pt

``from-fairseq`` reads a ``Data2VecMultiModel`` checkpoint (released files hold the state_dict
under ``model`` and the configuration under ``cfg``; a bare state_dict works too). The model
configuration comes from the checkpoint's ``cfg.model``, field by field (fields d2v2scale cannot
honour are refused by name); without one, the architecture is derived from the tensor shapes
and what shapes cannot tell (the head count, the CNN strides) must come from ``key=value`` or
``--preset``. Every tensor is then checked against the model that config builds. The output is a
d2v2scale weights file: ``{"format", "config", "student", "teacher"}``. fairseq weighted the image
CLS loss by its per-GPU batch; the checkpoint's ``cfg.dataset.batch_size`` becomes
``model.cls_loss_reference_micro_batch``, so training on from here optimises the same objective at
any layout (without it, the preset's value is used and a note says so).

``to-fairseq`` takes such a file or a training checkpoint directory (``RUN/checkpoints/<tag>``:
a layout-free one from any layout and backend, a native one at tp=1, ZeRO stage 0–2) and writes ``{"model": state_dict, "cfg": {"model": ...}}``: the student in
fairseq's names, the teacher under ``_ema`` in the layout fairseq's EMA restore expects, and the
``Data2VecMultiConfig`` values that rebuild the model, and a note on the per-GPU ``batch_size`` that
keeps the CLS loss's weight when training goes on in fairseq.

Released fairseq checkpoints embed omegaconf objects, so ``torch.load`` can only read them with
``weights_only=False``, which executes pickled code from the file: that needs the explicit
``--trust_checkpoint`` opt-in, for files from a source you trust (and ``pip install omegaconf``).
"""
from __future__ import annotations

import enum
import sys
from typing import Any

import torch

from .atomic import atomic_output
from .cli import OneLineParser, fail
from .config import Config, ConfigError, load_config
from .interop.fairseq import KeyMappingError, detect_modality, from_fairseq, layout, to_fairseq
from .interop.fairseq_config import config_values, to_fairseq_config
from .weights import FORMAT, load_torch_file, read_weights


def _plain(obj: Any) -> Any:
    """omegaconf containers and enums → dicts, lists and strings (no omegaconf import needed)."""
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.name  # fairseq's Modality
    return obj


def read_fairseq(path: str, trust: bool) -> tuple[dict, dict | None, int | None]:
    """(state_dict, ``cfg.model`` as a plain dict or None, ``cfg.dataset.batch_size`` or None) of a
    fairseq checkpoint."""
    blob = load_torch_file(path, trust)
    if not isinstance(blob, dict):
        raise ConfigError(f"{path} holds a {type(blob).__name__}, not a checkpoint dict")
    state = next((blob[k] for k in ("model", "state_dict") if isinstance(blob.get(k), dict)), blob)
    cfg = blob.get("cfg")
    cfg = cfg if cfg is not None and hasattr(cfg, "get") else {}
    cfg_model = _plain(cfg["model"]) if cfg.get("model") else None
    batch = (_plain(cfg.get("dataset")) or {}).get("batch_size")
    return state, cfg_model, batch if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else None


def _count(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def derive_values(student: dict[str, torch.Tensor], teacher: dict | None, modality: str) -> dict[str, Any]:
    """The config values the tensors themselves determine."""
    dim = student["blocks.0.norm1.weight"].shape[0]
    out: dict[str, Any] = {"model.modality": modality, "model.embed_dim": dim, "model.depth": _count(student, "blocks."),
                           "model.prenet_depth": _count(student, "encoder.context_encoder.blocks.")}
    convs = sorted(k for k in student if k.startswith("decoder.blocks.") and k.endswith(".0.weight"))
    w = student[convs[0]]
    out.update({"decoder.dim": w.shape[0], "decoder.layers": len(convs), "decoder.kernel": w.shape[-1],
                "decoder.groups": dim // w.shape[1]})
    proj = sorted(k for k in student if k.startswith("decoder.proj.") and k.endswith(".weight"))
    out["decoder.projection_layers"] = len(proj)
    if len(proj) > 1:
        out["decoder.projection_ratio"] = student[proj[0]].shape[0] / w.shape[0]
    out.update(layout(modality).derive(student))
    if teacher is not None:
        out["teacher.ema_encoder_only"] = not any(key.startswith("encoder.") for key in teacher)
        out["teacher.ema_local_encoder"] = any(key.startswith("encoder.local_encoder.") for key in teacher)
    return out


def _given_keys(overrides: list[str]) -> set[str]:
    """The ``section.key`` names of ``key=value`` overrides."""
    return {o.split("=", 1)[0].strip() for o in overrides}


def _given(key: str, overrides: list[str]) -> bool:
    return key in _given_keys(overrides)


def _values_without_config(student: dict, teacher: dict | None, modality: str, preset: str | None,
                           overrides: list[str]) -> dict[str, Any]:
    """Shape-derived values, with a precise message for what shapes cannot give."""
    values = derive_values(student, teacher, modality)
    own = layout(modality)
    base = load_config(preset or own.base_preset)
    if not preset and not _given("model.num_heads", overrides):
        raise ConfigError("the checkpoint has no cfg.model and model.num_heads is not recoverable from tensors; "
                          "pass model.num_heads=N or --preset NAME")
    values.update(own.without_config(student, base, _given_keys(overrides), from_preset=bool(preset)))
    # not in the weights; the base preset's value, capped by the depth (override to change)
    values["model.average_top_k_layers"] = min(base.model.average_top_k_layers, values["model.depth"])
    return values


def check_against_model(cfg: Config, student: dict, teacher: dict | None) -> None:
    from .model import Data2Vec2

    with torch.device("meta"):
        model = Data2Vec2(cfg.model_spec())
        teacher_model = model.teacher_copy()
    for name, sd, module in (("student", student, model), ("teacher", teacher, teacher_model)):
        if sd is None:
            continue
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = sorted(set(expected) - set(sd))
        unknown = sorted(set(sd) - set(expected))
        if missing or unknown:
            raise KeyMappingError(f"{name}: missing keys {missing[:5]}, unknown keys {unknown[:5]} "
                                  "(the config does not describe these weights)")
        wrong = [f"{k}: {tuple(v.shape)} vs model {expected[k]}" for k, v in sd.items() if tuple(v.shape) != expected[k]]
        if wrong:
            raise KeyMappingError(f"{name}: shape mismatches (set the config to match): {'; '.join(wrong[:5])}")


CLS_REFERENCE = "model.cls_loss_reference_micro_batch"


def _cls_reference_note(cfg: Config, batch: int | None, overrides: list[str]) -> str | None:
    """What the CLS weighting was taken from, when the checkpoint does not say (one line), else None."""
    if cfg.model.cls_loss == 0 or batch is not None or _given(CLS_REFERENCE, overrides):
        return None
    return (f"{CLS_REFERENCE}={cfg.model.cls_loss_reference_micro_batch} (preset {cfg.preset}): the checkpoint does "
            "not record the per-GPU batch it was trained with (cfg.dataset.batch_size), which weights fairseq's CLS "
            f"loss; pass {CLS_REFERENCE}=N to continue another objective")


def convert_from_fairseq(path: str, out: str, preset: str | None, overrides: list[str],
                         trust: bool) -> tuple[Config, bool, str | None]:
    """Write a d2v2scale weights file; returns (config, whether it came from the checkpoint, a note
    on what was assumed for the CLS weighting or None). fairseq weighted the CLS loss by its per-GPU
    batch (``cfg.dataset.batch_size``): that becomes ``model.cls_loss_reference_micro_batch``."""
    state, cfg_model, batch = read_fairseq(path, trust)
    modality = detect_modality(state)
    if cfg_model is not None:
        values = config_values(cfg_model, modality)
        student, teacher = from_fairseq(state, modality, values["teacher.ema_encoder_only"])
        values.update(layout(modality).outside_config(student))  # e.g. text: the task's dictionary size
    else:
        student, teacher = from_fairseq(state, modality)
        values = _values_without_config(student, teacher, modality, preset, overrides)
    if batch is not None:
        values[CLS_REFERENCE] = batch
    cfg = load_config(preset or layout(modality).base_preset, overrides, values)
    check_against_model(cfg, student, teacher)
    _save(out, {"format": FORMAT, "config": cfg.to_dict(), "student": student, "teacher": teacher})
    return cfg, cfg_model is not None, _cls_reference_note(cfg, batch, overrides)


def _save(path: str, obj: Any) -> None:
    try:
        with atomic_output(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"cannot write {path} ({str(e).splitlines()[0]})") from None


def to_fairseq_cls_note(cfg: Config) -> str | None:
    """fairseq weights the CLS loss by its per-GPU batch: the setting that keeps this run's objective."""
    if cfg.model.cls_loss == 0:
        return None
    ref = cfg.model.cls_loss_reference_micro_batch or cfg.train.global_batch
    return (f"to continue this objective in fairseq, train with dataset.batch_size={ref} per GPU: fairseq weights "
            f"the CLS loss by its per-GPU batch, so at another batch_size its weight changes in proportion "
            f"(here: cls_loss × {ref} / global batch per view)")


def convert_to_fairseq(path: str, out: str) -> Config:
    cfg, student, teacher = read_weights(path)
    if teacher is not None:
        from .model import Data2Vec2

        with torch.device("meta"):
            names = set(Data2Vec2(cfg.model_spec()).teacher_copy().state_dict())
        teacher = {k: v for k, v in teacher.items() if k in names}
    state = to_fairseq(student, teacher, cfg.model.modality, cfg.teacher.ema_encoder_only)
    _save(out, {"model": state, "cfg": {"model": to_fairseq_config(cfg)}})
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="convert", description=__doc__.splitlines()[0],
                      epilog="examples:\n"
                             "  python -m d2v2scale.convert from-fairseq base_imagenet.pt d2v.pt --trust_checkpoint\n"
                             "  python -m d2v2scale.convert to-fairseq runs/vit_b/checkpoints/step_00375300 out.pt\n"
                             "(python -m d2v2scale.convert from-fairseq --help: the arguments of one direction)")
    sub = p.add_subparsers(dest="direction", required=True, parser_class=OneLineParser)
    a = sub.add_parser("from-fairseq", help="fairseq Data2VecMultiModel checkpoint → d2v2scale weights file",
                       description="example: python -m d2v2scale.convert from-fairseq base_libri.pt d2v.pt --trust_checkpoint")
    a.add_argument("input", help="fairseq .pt (state_dict under 'model', config under 'cfg'; or a bare state_dict)")
    a.add_argument("output", help="d2v2scale weights file to write")
    a.add_argument("--preset", default=None, help="preset for settings not in the checkpoint (default: the modality's base)")
    a.add_argument("--trust_checkpoint", action="store_true",
                   help="allow unpickling Python objects (omegaconf configs) from a file you trust")
    a.add_argument("overrides", nargs="*", help="section.key=value, applied last (e.g. model.num_heads=12)")
    b = sub.add_parser("to-fairseq", help="d2v2scale weights file or RUN/checkpoints/<tag> → fairseq checkpoint",
                       description="example: python -m d2v2scale.convert to-fairseq runs/x/checkpoints/latest_tag out.pt")
    b.add_argument("input", help="d2v2scale weights file or a training checkpoint directory (layout-free: any layout)")
    b.add_argument("output", help="fairseq .pt to write")
    args, extra = p.parse_known_args(argv)
    # options and key=value overrides mix in any order (argparse ends a nargs="*" positional at the first option)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or args.direction != "from-fairseq"]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.direction == "from-fairseq":
            cfg, from_ckpt, note = convert_from_fairseq(args.input, args.output, args.preset, args.overrides,
                                                        args.trust_checkpoint)
            source = "the checkpoint's cfg.model" if from_ckpt else f"tensor shapes + preset {cfg.preset}"
            print(f"converted {args.input} ({cfg.model.modality}, {cfg.model.depth} blocks, width "
                  f"{cfg.model.embed_dim}, {cfg.model.num_heads} heads; config from {source}) → {args.output}")
        else:
            cfg = convert_to_fairseq(args.input, args.output)
            note = to_fairseq_cls_note(cfg)
            print(f"exported {args.input} → {args.output} (fairseq Data2VecMultiModel: 'model' with the teacher "
                  "under _ema, 'cfg.model')")
        if note:
            print(f"note: {note}")
    except (ConfigError, KeyMappingError) as e:
        return fail("convert", e)
    return 0



def entry() -> None:
    """The ``d2v2scale-convert`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
