"""Student-encoder features of real files, for downstream work.

    python -m d2v2scale.features WEIGHTS INPUTS OUT [--layer N|-1|mean] [--pool mean|none] [--batch 16]

``WEIGHTS``: a d2v2scale weights file (``python -m d2v2scale.convert``) or a training checkpoint
directory. ``INPUTS``, by the model's modality:

- image: a folder (searched recursively) or a list file of .jpg/.jpeg/.png — evaluation transform
  (shorter side to size/0.875, center crop, ImageNet normalisation);
- audio: a folder of .wav/.flac, a fairseq ``.tsv`` manifest or a list file — decoded as in
  training (:func:`d2v2scale.data.audio.load_audio`: 16 kHz mono, normalised per utterance);
- text: a ``.txt`` file with one item per line as space-separated token ids;
- any modality: a ``.npy`` array of model-ready inputs (N, C, H, W) | (N, S) | (N, T).

Items are sorted by length and batched, padding is masked out of attention and out of mean
pooling, and nothing builds an autograd graph. Files that fail to decode are skipped with one
line each. ``OUT.npz`` holds ``names``, ``lengths`` (positions per item) and ``features``: (N, D)
with ``--pool mean``, (sum of lengths, D) with ``--pool none`` (item i is the i-th run of
``lengths[i]`` rows). ``OUT.npy`` holds the stacked (N, D) or (N, T, D) array when every item has
the same length. In Python: ``load_student(path).extract_features(x, lengths, layer)``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from . import modality_registry
from .cli import OneLineParser, fail, positive_int
from .config import ConfigError, ModelSpec
from .data.files import DataError
from .modality_registry import FeatureItem
from .model import Data2Vec2
from .weights import read_weights


def load_student(path: str) -> Data2Vec2:
    cfg, student, _ = read_weights(path)
    model = Data2Vec2(cfg.model_spec())
    model.load_state_dict(student, strict=True)
    return model.eval()


def _npy_items(path: Path) -> list[FeatureItem]:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npy array ({e})") from None
    x = torch.from_numpy(array)
    x = x.float() if x.is_floating_point() else x.long()
    return [FeatureItem(f"{path.name}[{i}]", x[i].numel(), lambda i=i: x[i]) for i in range(len(x))]


def find_items(path: str, cfg: ModelSpec) -> list[FeatureItem]:
    """The inputs under ``path`` for a model of ``cfg``'s modality."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path} does not exist")
    if p.suffix == ".npy":
        items = _npy_items(p)
    else:
        items = modality_registry.get(cfg.model.modality).feature_items(p, cfg.model)
    if not items:
        raise DataError(f"{path} holds no inputs")
    return items


def _pad(xs: list[torch.Tensor], pad_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(x) for x in xs])
    out = xs[0].new_full((len(xs), int(lengths.max())), pad_value)
    for i, x in enumerate(xs):
        out[i, : len(x)] = x
    return out, lengths


@torch.inference_mode()
def extract(model: Data2Vec2, items: list[FeatureItem], layer: int | str = -1, pool: str = "mean", batch: int = 16,
            device: str = "cpu", progress: bool = True) -> tuple[list[str], list[torch.Tensor], list[str]]:
    """(names, per-item features (T, D) or (D,), skipped names) in input order."""
    from tqdm import tqdm

    model = model.to(device)
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    results: dict[int, torch.Tensor] = {}
    skipped = []
    bar = tqdm(total=len(items), desc="features", unit="item", disable=not progress or None, file=sys.stderr)
    for start in range(0, len(order), batch):
        loaded = []
        for i in order[start : start + batch]:
            try:
                loaded.append((i, items[i].load()))
            except (DataError, OSError, ValueError) as e:
                bar.write(f"[d2v2scale] skipping {items[i].name}: {e}", file=sys.stderr)
                skipped.append(items[i].name)
        if loaded:
            idx, xs = zip(*loaded)
            if xs[0].dim() == 1:  # waveforms or token ids: pad and pass the lengths
                source, lengths = _pad(list(xs), modality_registry.get(model.modality).pad_value(model.cfg.model))
                feats, valid = model.extract_features(source.to(device), lengths.to(device), layer)
            else:
                feats, valid = model.extract_features(torch.stack(xs).to(device), None, layer)
            if valid is None:
                valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            for j, i in enumerate(idx):
                f = feats[j, valid[j]].float().cpu()
                results[i] = f.mean(0) if pool == "mean" else f
        bar.update(len(order[start : start + batch]))
    bar.close()
    kept = sorted(results)
    return [items[i].name for i in kept], [results[i] for i in kept], skipped


def save(path: str, names: list[str], feats: list[torch.Tensor], pool: str) -> None:
    lengths = np.array([1 if pool == "mean" else len(f) for f in feats], dtype=np.int64)
    if path.endswith(".npy"):
        if len({tuple(f.shape) for f in feats}) != 1:
            raise DataError(f"{path}: items have different lengths; write .npz (or use --pool mean)")
        np.save(path, torch.stack(feats).numpy())
        return
    stacked = torch.stack(feats) if pool == "mean" else torch.cat(feats)
    np.savez(path, names=np.array(names), lengths=lengths, features=stacked.numpy())


def _layer(text: str) -> int | str:
    if text == "mean":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--layer {text!r}: allowed values: a block index (e.g. -1 for the last) or 'mean'") from None


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="features", description=__doc__.splitlines()[0],
                      epilog="example: python -m d2v2scale.features d2v.pt dev-clean.tsv feats.npz --layer -1 --pool mean")
    p.add_argument("weights", help="d2v2scale weights file or RUN/checkpoints/<tag>")
    p.add_argument("inputs", help="image folder/list | audio folder, .tsv manifest or list | .txt token ids | .npy")
    p.add_argument("output", help="OUT.npz (names, lengths, features) or OUT.npy (stacked)")
    p.add_argument("--layer", default="-1", help="shared block index (negative from the last) or 'mean' (default -1)")
    p.add_argument("--pool", choices=("mean", "none"), default="mean", help="mean over valid positions, or none")
    p.add_argument("--batch", type=positive_int, default=16, help="items per forward, after sorting by length (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    args = p.parse_args(argv)
    if not args.output.endswith((".npz", ".npy")):
        return fail("features", ConfigError(f"OUT {args.output!r} must end in .npz or .npy"))
    try:
        layer = _layer(args.layer)
        model = load_student(args.weights)
        try:
            model.check_layer(layer)
        except ValueError as e:
            raise ConfigError(f"--{e}") from None
        items = find_items(args.inputs, model.cfg)
        names, feats, skipped = extract(model, items, layer, args.pool, args.batch, args.device)
        if not feats:
            raise DataError(f"none of the {len(items)} inputs could be read")
        save(args.output, names, feats, args.pool)
    except (ConfigError, DataError) as e:
        return fail("features", e)
    print(f"{len(feats)} items ({len(skipped)} skipped), features of dimension {feats[0].shape[-1]} → {args.output}")
    return 0



def entry() -> None:
    """The ``d2v2scale-features`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
