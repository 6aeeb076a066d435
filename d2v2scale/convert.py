"""Convert checkpoints between fairseq's data2vec 2.0 layout and d2v2scale.

    python -m d2v2scale.convert from-fairseq IN.pt OUT.pt [--preset NAME|path.yaml] [--trust_checkpoint] [key=value ...]
    python -m d2v2scale.convert to-fairseq IN OUT.pt

``from-fairseq`` reads a ``Data2VecMultiModel`` state_dict (a released ``.pt`` wraps it under
``model``; a bare dict or one under ``state_dict`` works too), maps the keys, derives the model's
shape from the tensors (width, depths, decoder, patch grid) on top of the modality's base preset
(or ``--preset``) and the ``key=value`` overrides, and checks every tensor against the model it
builds — unknown keys, missing keys and shape mismatches are reported by name. The output is a
d2v2scale weights file: ``{"format", "config", "student", "teacher"}``.

``to-fairseq`` takes such a file or a training checkpoint directory (``RUN/checkpoints/<tag>``,
tp=1, ZeRO stage 0–2) and writes the fairseq state_dict with the teacher under ``_ema``.

Released fairseq checkpoints embed omegaconf objects, so ``torch.load`` can only read them with
``weights_only=False``, which executes pickled code from the file: that needs the explicit
``--trust_checkpoint`` opt-in, for files from a source you trust.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import Config, ConfigError, config_from_dict, load_config
from .interop.fairseq import KeyMappingError, detect_modality, from_fairseq, to_fairseq

FORMAT = "d2v2scale-weights-v1"
BASE_PRESET = {"image": "vit_b", "audio": "audio_base", "text": "text_base"}


def read_fairseq(path: str, trust: bool) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch reports disallowed globals with several exception types
        if not trust:
            raise ConfigError(f"{path} cannot be read as plain tensors ({type(e).__name__}); released fairseq files "
                              "embed omegaconf objects — rerun with --trust_checkpoint if you trust the file") from None
        blob = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(blob, dict):
        for key in ("model", "state_dict"):
            if isinstance(blob.get(key), dict):
                return blob[key]
    return blob


def derive_overrides(student: dict[str, torch.Tensor], modality: str) -> list[str]:
    """Shape values readable from the tensors themselves."""
    out = [f"model.modality={modality}"]
    out.append(f"model.embed_dim={student['blocks.0.norm1.weight'].shape[0]}")
    out.append(f"model.depth={len({k.split('.')[1] for k in student if k.startswith('blocks.')})}")
    prenet = {k.split(".")[3] for k in student if k.startswith("encoder.context_encoder.blocks.")}
    out.append(f"model.prenet_depth={len(prenet)}")
    decoder_convs = sorted(k for k in student if k.startswith("decoder.blocks.") and k.endswith(".0.weight"))
    if decoder_convs:
        w = student[decoder_convs[0]]
        out += [f"decoder.dim={w.shape[0]}", f"decoder.layers={len(decoder_convs)}", f"decoder.kernel={w.shape[-1]}",
                f"decoder.groups={student['blocks.0.norm1.weight'].shape[0] // w.shape[1]}"]
    if modality == "image":
        patch = student["encoder.local_encoder.proj.weight"]
        grid = int(round(student["encoder.fixed_positional_encoder.positions"].shape[1] ** 0.5))
        out += [f"model.patch_size={patch.shape[-1]}", f"model.in_chans={patch.shape[1]}",
                f"model.img_size={grid * patch.shape[-1]}"]
        if "encoder.extra_tokens" in student:
            out.append(f"model.num_extra_tokens={student['encoder.extra_tokens'].shape[1]}")
    if modality == "text":
        out.append(f"model.vocab_size={student['encoder.local_encoder.embed_tokens.weight'].shape[0]}")
    return out


def check_against_model(cfg: Config, student: dict, teacher: dict | None) -> None:
    from .model import Data2Vec2

    with torch.device("meta"):
        model = Data2Vec2(cfg)
        teacher_model = model.teacher_copy()
    for name, sd, module in (("student", student, model), ("teacher", teacher, teacher_model)):
        if sd is None:
            continue
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = sorted(set(expected) - set(sd))
        unknown = sorted(set(sd) - set(expected))
        if missing or unknown:
            raise KeyMappingError(f"{name}: missing keys {missing[:5]}, unknown keys {unknown[:5]}")
        wrong = [f"{k}: {tuple(v.shape)} vs model {expected[k]}" for k, v in sd.items() if tuple(v.shape) != expected[k]]
        if wrong:
            raise KeyMappingError(f"{name}: shape mismatches (set the config to match): {'; '.join(wrong[:5])}")


def convert_from_fairseq(path: str, out: str, preset: str | None, overrides: list[str], trust: bool) -> Config:
    state = read_fairseq(path, trust)
    modality = detect_modality(state)
    student, teacher = from_fairseq(state, modality)
    derived = derive_overrides(student, modality)
    depth = int(next(o for o in derived if o.startswith("model.depth=")).split("=")[1])
    base_k = load_config(preset or BASE_PRESET[modality]).model.average_top_k_layers
    derived.append(f"model.average_top_k_layers={min(base_k, depth)}")  # not in the weights; override to change
    cfg = load_config(preset or BASE_PRESET[modality], derived + list(overrides))
    check_against_model(cfg, student, teacher)
    torch.save({"format": FORMAT, "config": cfg.to_dict(), "student": student, "teacher": teacher}, out)
    return cfg


def read_weights(path: str) -> tuple[Config, dict, dict | None]:
    """A d2v2scale weights file, or a training checkpoint directory (tp=1; ZeRO stage 0–2)."""
    p = Path(path)
    if p.is_file():
        blob = torch.load(p, map_location="cpu", weights_only=True)
        if blob.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a d2v2scale weights file (format {blob.get('format')!r})")
        return config_from_dict(blob["config"]), blob["student"], blob["teacher"]
    from .train import checkpoint

    info = checkpoint.read_run_info(p)
    if info["layout"]["tp"] != 1 or info["layout"]["zero_stage"] == 3:
        raise ConfigError(f"{path}: layout {info['layout']}; export supports tp=1 and ZeRO stage 0-2 "
                          "(for ZeRO-3 consolidate with DeepSpeed's zero_to_fp32 first)")
    cfg = config_from_dict(info["config"])
    student = torch.load(p / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    shards = [torch.load(p / checkpoint.rank_file(0, d), map_location="cpu", weights_only=False)["teacher"]
              for d in range(info["layout"]["dp"])]
    return cfg, student, _assemble_teacher(shards, student)


def _assemble_teacher(shards: list[dict], student: dict) -> dict:
    """Concatenate every rank's fp32 master slices back into named tensors (shapes from the student)."""
    layout = shards[0]["layout"]
    out = {}
    for g, (names, offsets, _numel) in enumerate(layout):
        flat = torch.cat([s["masters"][g] for s in shards])
        for name, off in zip(names, offsets):
            if name in student:
                n = student[name].numel()
                out[name] = flat[off : off + n].view_as(student[name]).clone()
    for name, value in shards[0]["copied"].items():
        out[name] = value
    return out


def convert_to_fairseq(path: str, out: str) -> None:
    cfg, student, teacher = read_weights(path)
    if teacher is not None:
        from .model import Data2Vec2

        with torch.device("meta"):
            names = set(Data2Vec2(cfg).teacher_copy().state_dict())
        teacher = {k: v for k, v in teacher.items() if k in names}
    torch.save(to_fairseq(student, teacher, cfg.model.modality), out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("from-fairseq")
    a.add_argument("input")
    a.add_argument("output")
    a.add_argument("--preset", default=None)
    a.add_argument("--trust_checkpoint", action="store_true")
    a.add_argument("overrides", nargs="*")
    b = sub.add_parser("to-fairseq")
    b.add_argument("input")
    b.add_argument("output")
    args = p.parse_args(argv)
    try:
        if args.direction == "from-fairseq":
            cfg = convert_from_fairseq(args.input, args.output, args.preset, args.overrides, args.trust_checkpoint)
            print(f"converted {args.input} ({cfg.model.modality}, {cfg.model.depth} blocks, width "
                  f"{cfg.model.embed_dim}) → {args.output}")
        else:
            convert_to_fairseq(args.input, args.output)
            print(f"exported {args.input} → {args.output} (fairseq Data2VecMultiModel keys, teacher under _ema)")
    except (ConfigError, KeyMappingError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
