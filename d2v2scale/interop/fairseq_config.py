"""fairseq ``Data2VecMultiConfig`` (the ``cfg.model`` of a released checkpoint) ⇄ our :class:`Config`.

Every fairseq field is in exactly one of three tables:

- mapped: the value becomes one of our keys (``num_heads`` → ``model.num_heads``), and back;
- fixed: we implement one value only (e.g. ``layer_norm_first: false``, post-LN); any other value
  is refused by name, because converting it would silently change what the model computes;
- inert: no effect on the weights or on what our training computes (logging, init-only switches,
  other modalities' sections).

A field in none of them is refused as unknown, so a newer fairseq field cannot slip through.
The defaults are fairseq's dataclass defaults (``examples/data2vec/models/data2vec2.py`` and
``modalities/*.py``); they fill fields an older checkpoint lacks and the fields we do not model
when writing a config back. What is one modality's own (its section's defaults and tables) is in
that modality's :class:`~.fairseq.FairseqLayout`.
"""
from __future__ import annotations

import ast
import copy
import itertools
from typing import Any

from ..config import Config, ConfigError
from .fairseq import fairseq_tags, layout

# ------------------------------------------------------------------------------- fairseq defaults
_DECODER_DEFAULTS = {
    "decoder_dim": 384, "decoder_groups": 16, "decoder_kernel": 5, "decoder_layers": 5, "input_dropout": 0.1,
    "add_positions_masked": False, "add_positions_all": False, "decoder_residual": True,
    "projection_layers": 1, "projection_ratio": 2.0,
}
_MODALITY_DEFAULTS = {
    "prenet_depth": 4, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0, "start_drop_path_rate": 0.0,
    "end_drop_path_rate": 0.0, "num_extra_tokens": 0, "init_extra_token_zero": True, "mask_noise_std": 0.01,
    "mask_prob_min": None, "mask_prob": 0.7, "inverse_mask": False, "mask_prob_adjust": 0.0, "keep_masked_pct": 0.0,
    "mask_length": 5, "add_masks": False, "remove_masks": False, "mask_dropout": 0.0, "encoder_zero_mask": True,
    "mask_channel_prob": 0.0, "mask_channel_length": 64, "ema_local_encoder": False, "local_grad_mult": 1.0,
    "use_alibi_encoder": False, "alibi_scale": 1.0, "learned_alibi": False, "alibi_max_pos": None,
    "learned_alibi_scale": False, "learned_alibi_scale_per_head": False, "learned_alibi_scale_per_layer": False,
    "num_alibi_heads": 12, "model_depth": 8,  # II("model.num_heads"), II("model.depth")
    "decoder": _DECODER_DEFAULTS,
}
_TOP_DEFAULTS = {
    "_name": None, "loss_beta": 0.0, "loss_scale": None, "depth": 8, "start_drop_path_rate": 0.0,
    "end_drop_path_rate": 0.0, "num_heads": 12, "norm_eps": 1e-6, "norm_affine": True, "encoder_dropout": 0.1,
    "post_mlp_drop": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "dropout_input": 0.0,
    "layerdrop": 0.0, "embed_dim": 768, "mlp_ratio": 4.0, "layer_norm_first": False, "average_top_k_layers": 8,
    "end_of_block_targets": False, "clone_batch": 1, "layer_norm_target_layer": False,
    "batch_norm_target_layer": False, "instance_norm_target_layer": False, "instance_norm_targets": False,
    "layer_norm_targets": False, "ema_decay": 0.999, "ema_same_dtype": True, "log_norms": True,
    "ema_end_decay": 0.9999, "ema_anneal_end_step": 100_000, "ema_encoder_only": True, "max_update": 100_000,
    "shared_decoder": None, "min_target_var": 0.1, "min_pred_var": 0.01, "supported_modality": None,
    "mae_init": False, "seed": 1, "skip_ema": False, "cls_loss": 0.0, "recon_loss": 0.0, "d2v_loss": 1.0,
    "decoder_group": False,
}


def modality_defaults(modality: str) -> dict[str, Any]:
    """fairseq's default ``modalities.<section>`` for our ``modality`` (the section is named after
    fairseq's tag, lower-cased)."""
    return copy.deepcopy({**_MODALITY_DEFAULTS, **layout(modality).defaults})


def fairseq_defaults() -> dict[str, Any]:
    """fairseq's default ``Data2VecMultiConfig`` as a plain dict."""
    out: dict[str, Any] = copy.deepcopy(_TOP_DEFAULTS)
    out["modalities"] = {"_name": None, **{tag.lower(): modality_defaults(name) for name, tag in fairseq_tags().items()}}
    return out


# ------------------------------------------------------------------------------------ the tables
_TOP_MAPPED = {
    "loss_beta": "model.loss_beta", "loss_scale": "model.loss_scale", "depth": "model.depth",
    "num_heads": "model.num_heads", "norm_eps": "model.norm_eps", "encoder_dropout": "model.encoder_dropout",
    "post_mlp_drop": "model.post_mlp_dropout", "attention_dropout": "model.attention_dropout",
    "activation_dropout": "model.activation_dropout", "layerdrop": "model.layerdrop", "embed_dim": "model.embed_dim",
    "mlp_ratio": "model.mlp_ratio", "average_top_k_layers": "model.average_top_k_layers",
    "clone_batch": "model.clone_batch", "layer_norm_target_layer": "model.layer_norm_target_layer",
    "instance_norm_target_layer": "model.instance_norm_target_layer",
    "instance_norm_targets": "model.instance_norm_targets", "layer_norm_targets": "model.layer_norm_targets",
    "cls_loss": "model.cls_loss", "ema_decay": "teacher.ema_decay", "ema_end_decay": "teacher.ema_end_decay",
    "ema_anneal_end_step": "teacher.ema_anneal_end_step", "ema_encoder_only": "teacher.ema_encoder_only",
    "max_update": "train.max_updates", "min_target_var": "train.warn_target_var",
    "min_pred_var": "train.warn_pred_var", "seed": "seed",
}
_TOP_FIXED = {
    "start_drop_path_rate": (0.0, "stochastic depth is not implemented"),
    "end_drop_path_rate": (0.0, "stochastic depth is not implemented"),
    "norm_affine": (True, "LayerNorms are affine"),
    "dropout_input": (0.0, "input dropout before the blocks is not implemented"),
    "layer_norm_first": (False, "blocks are post-LN, as in every data2vec 2.0 recipe"),
    "end_of_block_targets": (False, "targets are the blocks' FFN outputs"),
    "batch_norm_target_layer": (False, "batch-norm targets are not implemented"),
    "shared_decoder": (None, "a shared decoder is not implemented"),
    "recon_loss": (0.0, "the pixel reconstruction loss is not implemented"),
    "d2v_loss": (1.0, "the data2vec loss has weight 1"),
}
_TOP_INERT = {"_name", "ema_same_dtype", "log_norms", "mae_init", "skip_ema", "decoder_group", "supported_modality",
              "modalities"}

_MOD_MAPPED = {
    "prenet_depth": "model.prenet_depth", "prenet_dropout": "model.prenet_dropout",
    "num_extra_tokens": "model.num_extra_tokens", "mask_noise_std": "model.mask_noise_std",
    "mask_prob": "masking.mask_prob", "inverse_mask": "masking.inverse_mask",
    "mask_prob_adjust": "masking.mask_prob_adjust", "mask_length": "masking.mask_length",
    "ema_local_encoder": "teacher.ema_local_encoder", "use_alibi_encoder": "model.use_alibi",
    "alibi_scale": "model.alibi_scale",
}
_MOD_FIXED = {
    "prenet_layerdrop": (0.0, "prenet layerdrop is not implemented"),
    "start_drop_path_rate": (0.0, "stochastic depth is not implemented"),
    "end_drop_path_rate": (0.0, "stochastic depth is not implemented"),
    "mask_prob_min": (None, "a random mask ratio range is not implemented"),
    "keep_masked_pct": (0.0, "keeping masked tokens is not implemented"),
    "add_masks": (False, "mask count adjustment uses mask_prob_adjust only"),
    "remove_masks": (False, "mask count adjustment uses mask_prob_adjust only"),
    "mask_dropout": (0.0, "mask dropout is not implemented"),
    "encoder_zero_mask": (True, "masked frames are zeroed before the conv positions"),
    "mask_channel_prob": (0.0, "channel masking is not implemented"),
    "local_grad_mult": (1.0, "the local encoder's gradient is not rescaled"),
    "learned_alibi": (False, "ALiBi uses fixed slopes"),
    "alibi_max_pos": (None, "ALiBi is computed for every length"),
    "learned_alibi_scale_per_layer": (False, "one ALiBi scale serves all blocks"),
}
_MOD_INERT = {"type", "init_extra_token_zero", "mask_channel_length", "num_alibi_heads", "model_depth", "decoder",
              "learned_alibi_scale", "learned_alibi_scale_per_head"}  # the last four are checked explicitly
_DECODER_MAPPED = {
    "decoder_dim": "decoder.dim", "decoder_groups": "decoder.groups", "decoder_kernel": "decoder.kernel",
    "decoder_layers": "decoder.layers", "input_dropout": "decoder.input_dropout",
    "decoder_residual": "decoder.residual", "projection_layers": "decoder.projection_layers",
    "projection_ratio": "decoder.projection_ratio",
}
_DECODER_FIXED = {
    "add_positions_masked": (False, "the decoder adds no positions"),
    "add_positions_all": (False, "the decoder adds no positions"),
}
# --------------------------------------------------------------------------- helpers
def parse_conv_spec(spec: str) -> list[list[int]]:
    """fairseq's ``feature_encoder_spec`` ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...") without eval."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(ast.dump(node))

    try:
        layers = ev(ast.parse(str(spec), mode="eval"))
        if isinstance(layers, list) and all(isinstance(x, list) and len(x) == 3 for x in layers):
            return [[int(v) for v in layer] for layer in layers]
    except (SyntaxError, ValueError, TypeError):
        pass
    raise ConfigError(f"cfg.model.modalities.audio.feature_encoder_spec={spec!r} is not a list of (dim, kernel, stride)")


def format_conv_spec(layers: list) -> str:
    """The inverse of :func:`parse_conv_spec`, run-length grouped as fairseq writes it."""
    parts = []
    for layer, run in itertools.groupby(tuple(int(v) for v in x) for x in layers):
        n = len(list(run))
        parts.append(f"[{layer}]" + (f" * {n}" if n > 1 else ""))
    return " + ".join(parts)


def _type_name(value: Any) -> str:
    """'IMAGE' from a plain string or from fairseq's ``Modality`` enum."""
    return str(getattr(value, "name", value)).split(".")[-1].upper()


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _refuse_fixed(section: dict, fixed: dict, where: str) -> None:
    for key, (allowed, why) in fixed.items():
        if key in section and not _equal(section[key], allowed):
            raise ConfigError(f"{where}.{key}={section[key]!r} is not supported ({why}); d2v2scale needs {allowed!r}")


def _refuse_unknown(section: dict, known: set, where: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown fairseq field(s) {', '.join(unknown)}; d2v2scale cannot tell what they "
                          "change, so it does not convert this checkpoint (remove them from the config if harmless)")


# ------------------------------------------------------------------------------ fairseq → ours
def config_values(cfg_model: dict, modality: str) -> dict[str, Any]:
    """``{'section.key': value}`` our config takes from a fairseq ``cfg.model`` dict; refuses by
    name every field whose value d2v2scale cannot honour."""
    top = {**_TOP_DEFAULTS, **cfg_model}
    where = "cfg.model"
    _refuse_unknown(top, set(_TOP_MAPPED) | set(_TOP_FIXED) | _TOP_INERT, where)
    _refuse_fixed(top, _TOP_FIXED, where)
    own = layout(modality)
    tag = own.tag
    if top.get("supported_modality") is not None and _type_name(top["supported_modality"]) != tag:
        raise ConfigError(f"{where}.supported_modality={_type_name(top['supported_modality'])} but the weights are {tag}")
    mods = top.get("modalities") or {}
    mod = {**modality_defaults(modality), **(mods.get(tag.lower()) or {})}
    mwhere = f"{where}.modalities.{tag.lower()}"
    if _type_name(mod["type"]) != tag:
        raise ConfigError(f"{mwhere}.type={_type_name(mod['type'])}; expected {tag}")
    known = set(_MOD_MAPPED) | set(_MOD_FIXED) | _MOD_INERT | set(own.mapped) | set(own.fixed) | own.inert
    _refuse_unknown(mod, known, mwhere)
    _refuse_fixed(mod, {**_MOD_FIXED, **own.fixed}, mwhere)

    out = {ours: top[theirs] for theirs, ours in _TOP_MAPPED.items()}
    out["model.modality"] = modality
    out.update({ours: mod[theirs] for theirs, ours in {**_MOD_MAPPED, **own.mapped}.items()})
    out.update(own.values_in(mod, top, mwhere))
    if mod["use_alibi_encoder"]:
        if not own.alibi:
            supported = [name for name in fairseq_tags() if layout(name).alibi]
            raise ConfigError(f"{mwhere}.use_alibi_encoder=true is supported for {', '.join(supported)} only")
        if not (mod["learned_alibi_scale"] and mod["learned_alibi_scale_per_head"]):
            raise ConfigError(f"{mwhere}: ALiBi needs learned_alibi_scale=true and learned_alibi_scale_per_head=true "
                              "(d2v2scale learns one scale per head, as the speech recipes do)")
    if mod.get("num_alibi_heads", top["num_heads"]) != top["num_heads"]:
        raise ConfigError(f"{mwhere}.num_alibi_heads={mod['num_alibi_heads']} must equal num_heads={top['num_heads']}")
    dec = mod.get("decoder")
    if dec is None:
        raise ConfigError(f"{mwhere}.decoder is null; d2v2scale always trains the convolutional decoder")
    dec = {**_DECODER_DEFAULTS, **dec}
    _refuse_unknown(dec, set(_DECODER_MAPPED) | set(_DECODER_FIXED), f"{mwhere}.decoder")
    _refuse_fixed(dec, _DECODER_FIXED, f"{mwhere}.decoder")
    out.update({ours: dec[theirs] for theirs, ours in _DECODER_MAPPED.items()})
    return out


# ------------------------------------------------------------------------------ ours → fairseq
def _get(cfg: Config, dotted: str) -> Any:
    return copy.deepcopy(cfg.value(dotted))


def to_fairseq_config(cfg: Config) -> dict[str, Any]:
    """The ``cfg.model`` dict that rebuilds this model in fairseq's ``Data2VecMultiModel``."""
    modality = cfg.model.modality
    out = fairseq_defaults()
    out.update({theirs: _get(cfg, ours) for theirs, ours in _TOP_MAPPED.items()})
    out.update({key: allowed for key, (allowed, _) in _TOP_FIXED.items()})
    own = layout(modality)
    out["supported_modality"] = own.tag
    mod = out["modalities"][own.tag.lower()]
    mod.update({theirs: _get(cfg, ours) for theirs, ours in {**_MOD_MAPPED, **own.mapped}.items()})
    mod.update({key: allowed for key, (allowed, _) in {**_MOD_FIXED, **own.fixed}.items()})
    own.values_out(cfg, mod)
    for section in out["modalities"].values():
        if isinstance(section, dict):
            section["num_alibi_heads"], section["model_depth"] = cfg.model.num_heads, cfg.model.depth
    mod["decoder"].update({theirs: _get(cfg, ours) for theirs, ours in _DECODER_MAPPED.items()})
    return out
