"""The data2vec 2.0 model: student forward, teacher targets, conv decoder and losses.

Single-device PyTorch; parallelism is applied from outside. One call of :meth:`Data2Vec2.forward`
is one training step's forward for B samples:

1. local encoder once per sample (patch embed | wav CNN | token embedding);
2. teacher, no grad, once per sample on the *unmasked* input → per-block FFN outputs → targets;
3. the student encodes only the kept tokens of its B·M masked views (rows in repeat_interleave
   order), then the conv decoder predicts every position from the kept outputs plus N(0, σ) noise;
4. L2 loss on masked positions (× 1/sqrt(D) unless configured) and, for images, the CLS loss.

Losses and spread statistics come back as **sums** over this forward's positions and views, so
that any split of the global batch (ranks × micro-batches × steps) adds up to the same totals.
:func:`normalize_loss` turns them into the objective: the regression sum over the *global*
masked-token count, plus the CLS sum with a per-view weight that does not depend on the split
(:func:`cls_share`).
"""
from __future__ import annotations

import copy
import functools
import math
import struct
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .. import counter_rng
from .. import modality_registry
from ..config import ModelSpec
from .blocks import checkpointed, make_blocks, run_block
from .masking import MaskGenerator, MaskInfo
from .targets import make_targets, stack_top

_STREAM_LAYERDROP = 3
_NOOP = nullcontext()


def _no_phase(name: str) -> ContextManager:
    return _NOOP


@dataclass
class Targets:
    """What the student regresses: per-sample (B, T, D) fp32 targets, and the :func:`spread_moments`
    of each raw target layer (K, 3, D) for collapse diagnostics (None when made elsewhere)."""

    values: torch.Tensor
    layer_moments: torch.Tensor | None = None


# (source, the student's local features, valid mask, lengths) → targets: how the teacher reaches the model
TeacherFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], Targets]


def spread_moments(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., 3, D) float64 sums ``[Σw, Σw·y, Σw·y²]`` over the weighted rows of ``y`` (..., N, D). Moments of
    disjoint rows add up, so the spread of a whole step (or log interval) is the same however its
    rows were split over micro-batches and ranks; float64 sums make the total order-independent."""
    w = weight.to(y.dtype).unsqueeze(-1)
    yw = y * w
    count = weight.sum(dtype=torch.float64).expand(*y.shape[:-2], y.shape[-1])
    return torch.stack([count, yw.sum(-2, dtype=torch.float64), (yw * y).sum(-2, dtype=torch.float64)], dim=-2)


def spread(moments: torch.Tensor) -> torch.Tensor:
    """fairseq ``compute_var`` from :func:`spread_moments` (..., 3, D): the per-channel std
    (unbiased, + 1e-6 under the root) averaged over channels."""
    count, s1, s2 = moments.unbind(-2)
    count = count.clamp_min(2.0)
    var = (s2 - s1 * s1 / count) / (count - 1)
    return torch.sqrt(var.clamp_min(0.0) + 1e-6).mean(-1)


@dataclass
class StepOutput:
    """Per-rank sums of one forward: ``loss_reg`` over masked positions, ``loss_cls`` (= cls_loss ×
    Σ over views) over views, ``sample_size`` = masked positions, and :func:`spread_moments` of the
    targets and predictions at masked positions (and of the raw target layers, (K, 3, D))."""

    loss_reg: torch.Tensor
    loss_cls: torch.Tensor
    sample_size: torch.Tensor
    target_moments: torch.Tensor
    pred_moments: torch.Tensor
    layer_moments: torch.Tensor | None = None

    @property
    def target_var(self) -> torch.Tensor:
        return spread(self.target_moments)

    @property
    def pred_var(self) -> torch.Tensor:
        return spread(self.pred_moments)

    @property
    def layer_target_var(self) -> torch.Tensor | None:
        return None if self.layer_moments is None else spread(self.layer_moments)

    def moments(self) -> torch.Tensor:
        """(2 + K, 3, D): the spread moments of the targets, the predictions, then the K target layers."""
        layers = [] if self.layer_moments is None else [self.layer_moments]
        return torch.cat([self.target_moments[None], self.pred_moments[None], *layers])


def cls_share(reference_micro_batch: int | None, global_batch: int) -> float:
    """The factor on ``cls_loss × Σ_views err`` in the objective: fairseq's ``sample_size_micro /
    sample_size_global`` at the split it ran (``reference_micro_batch`` samples per micro-batch of
    ``global_batch``; None: one micro-batch per update). Fixed per run, so every split of the
    global batch optimises the same objective."""
    return 1.0 if reference_micro_batch is None else reference_micro_batch / global_batch


def normalize_loss(out: StepOutput, global_sample_size: torch.Tensor | float | None = None,
                   cls_weight: float = 1.0) -> torch.Tensor:
    """The objective's share of this forward: the regression sum over the global masked-token count
    (the local count if None) plus the CLS sum × ``cls_weight`` (:func:`cls_share`)."""
    denom = out.sample_size if global_sample_size is None else global_sample_size
    return out.loss_reg / denom + out.loss_cls * cls_weight


class Data2Vec2(nn.Module):
    """Student (``encoder``, shared ``blocks``, ``decoder``); the teacher is a copy from :meth:`teacher_copy`
    whose targets reach :meth:`forward` as a callable (:meth:`teacher_fn`) or a precomputed :class:`Targets`."""

    # Phase timing from outside: a profiler sets ``model.phase = timer.phase``; off, a shared no-op.
    phase: Callable[[str], ContextManager] = staticmethod(_no_phase)
    # Methods that are pure tensor math (no parameters, no communication, no RNG): regional
    # compilation may compile each whole, like a block.
    TENSOR_MATH = ("targets_from", "layer_moments", "losses")

    def __init__(self, cfg: ModelSpec):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.modality = m.modality
        self.clones = m.clone_batch
        self.num_extra = m.num_extra_tokens
        modality = modality_registry.get(m.modality)
        self.encoder: modality_registry.Encoder = modality.encoder(m)
        self.blocks = make_blocks(m, m.depth)
        self.decoder: modality_registry.Decoder | None = modality.decoder(cfg, self.encoder)
        self.loss_scale = m.loss_scale if m.loss_scale is not None else 1.0 / math.sqrt(m.embed_dim)
        self.mask_generator = MaskGenerator(
            cfg.mask_kind(), cfg.masking.mask_prob, cfg.masking.mask_length, cfg.masking.mask_prob_adjust, m.clone_batch
        )
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """fairseq: BERT init (N(0, 0.02) Linear/Embedding, zero bias), then per-module overrides.
        A model on the meta device (the planner counts parameters that way) has no values to draw:
        skipped, since ``normal_`` on meta costs milliseconds per tensor."""
        if next(self.parameters()).is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
        self.encoder.reset_parameters()
        for module in self.decoder.proj.modules() if self.decoder is not None else ():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    # -------------------------------------------------------------------------------- teacher
    def teacher_copy(self) -> nn.Module:
        """A deep copy of the parts the EMA tracks, with the student's parameter names.

        Images: everything but the decoder. Audio: also without the CNN and its projection (the
        teacher consumes the student's local features). Text: the shared blocks only.
        """
        t = self.cfg.teacher
        excluded: list[tuple[object, str]] = [(self, "decoder")]
        if t.ema_encoder_only:
            excluded.append((self, "encoder"))
        elif not t.ema_local_encoder:
            excluded += [(self.encoder, name) for name in ("local_encoder", "project_features")
                         if hasattr(self.encoder, name)]
        saved = [(owner, name, getattr(owner, name)) for owner, name in excluded]
        try:
            for owner, name, _ in saved:
                setattr(owner, name, None)
            teacher = copy.deepcopy(self)
        finally:
            for owner, name, module in saved:
                setattr(owner, name, module)
        return teacher

    @torch.no_grad()
    def teacher_layers(
        self, teacher: nn.Module, source: torch.Tensor, local: torch.Tensor, valid: torch.Tensor | None,
        lengths: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        """The teacher's per-block FFN outputs (extra tokens removed) on the full, unmasked input."""
        t = self.cfg.teacher
        local = local.detach()
        if t.ema_encoder_only:
            x, bias = self.encoder(local, valid, None)
        elif t.ema_local_encoder:
            t_local, _ = teacher.encoder.local_features(source, lengths)
            x, bias = teacher.encoder(t_local, valid, None)
        else:
            x, bias = teacher.encoder(local, valid, None)
        layers = []
        for blk in teacher.blocks:
            x, ffn = blk(x, bias)
            layers.append(ffn[:, self.num_extra :])
        return layers

    def targets_from(self, top: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Targets from the stacked top-K layers (:func:`~.targets.stack_top`)."""
        m = self.cfg.model
        return make_targets(
            top,
            instance_norm_target_layer=m.instance_norm_target_layer,
            layer_norm_target_layer=m.layer_norm_target_layer,
            layer_norm_targets=m.layer_norm_targets,
            instance_norm_targets=m.instance_norm_targets,
            valid=valid,
        )

    @torch.no_grad()
    def teacher_targets(
        self, teacher: nn.Module, source: torch.Tensor, local: torch.Tensor, valid: torch.Tensor | None,
        lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, T, D) fp32 targets from the teacher on the full, unmasked input."""
        layers = self.teacher_layers(teacher, source, local, valid, lengths)
        return self.targets_from(stack_top(layers, self.cfg.model.average_top_k_layers), valid)

    def teacher_fn(self, teacher: nn.Module) -> TeacherFn:
        """The targets of ``teacher`` (this model's :meth:`teacher_copy`, EMA-updated) as the
        callable :meth:`forward` takes."""
        return functools.partial(self._teacher_output, teacher)

    @torch.no_grad()
    def _teacher_output(self, teacher: nn.Module, source: torch.Tensor, local: torch.Tensor,
                        valid: torch.Tensor | None, lengths: torch.Tensor | None) -> Targets:
        layers = self.teacher_layers(teacher, source, local, valid, lengths)
        top = stack_top(layers, self.cfg.model.average_top_k_layers)
        return Targets(self.targets_from(top, valid), self.layer_moments(top, valid))

    # -------------------------------------------------------------------------------- student
    def make_mask(
        self, seed: int, step: int, sample_ids: torch.Tensor, source: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> MaskInfo:
        """The B·M-row masks of a batch, a pure function of (seed, step, sample id) and each
        sample's real length; computed from shapes only, so it can run before (or apart from) the forward."""
        max_len, frame_lengths = self.encoder.num_positions(source, lengths)
        return self.mask_generator(seed, step, sample_ids.to(source.device), max_len, frame_lengths)

    def _layer_keep(self, layerdrop_key: int) -> list[bool]:
        p = self.cfg.model.layerdrop
        if not self.training or p == 0:
            return [True] * len(self.blocks)
        p32 = struct.unpack("f", struct.pack("f", p))[0]  # the float32 threshold a tensor comparison would use
        return [u >= p32 for u in counter_rng.uniform_row(layerdrop_key, len(self.blocks), _STREAM_LAYERDROP)]

    def _decoder_input(self, x: torch.Tensor, mask: MaskInfo) -> torch.Tensor:
        """Kept outputs scattered back to their positions; every other slot gets N(0, σ) noise."""
        p = self.cfg.decoder.input_dropout
        if p > 0:
            x = F.dropout(x, p, training=self.training)
        rows, length = mask.mask.shape
        noise = x.new_empty(rows, length, x.shape[-1]).normal_(0.0, self.cfg.model.mask_noise_std)
        idx = mask.keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return noise.scatter(1, idx, x)

    def forward(
        self,
        source: torch.Tensor,
        targets: TeacherFn | Targets,
        mask: MaskInfo,
        *,
        lengths: torch.Tensor | None = None,
        layerdrop_key: int = 0,
    ) -> StepOutput:
        """One training forward. ``targets``: the teacher as a callable (:meth:`teacher_fn`), run
        once per sample on the unmasked input, or precomputed :class:`Targets`; ``mask`` has B·M
        rows (see :meth:`make_mask`); ``lengths`` marks padding (audio: samples, text: tokens);
        ``layerdrop_key`` makes layerdrop identical on all ranks."""
        with self.phase("local_encoder"):
            local, valid = self.encoder.local_features(source, lengths)
        with self.phase("teacher"):
            target = targets if isinstance(targets, Targets) else targets(source, local, valid, lengths)
        with self.phase("student"):
            x, bias = self.encoder(local, valid, mask, self.clones)
            every = self.cfg.model.activation_checkpointing
            for i, (blk, keep) in enumerate(zip(self.blocks, self._layer_keep(layerdrop_key))):
                if keep:
                    x, _ = run_block(blk, x, bias, checkpointed(i, every))
        with self.phase("decoder_loss"):
            cls_pred = x[:, self.num_extra - 1] if self.num_extra else None
            pred = self.decoder(self._decoder_input(x[:, self.num_extra :], mask))
            out = self.losses(pred, cls_pred, target.values, mask)
            out.layer_moments = target.layer_moments
        return out

    @staticmethod
    @torch.no_grad()
    def layer_moments(top: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(K, 3, D) :func:`spread_moments` of the raw teacher FFN outputs per target layer (``top``:
        (K, B, T, D)): their spread is the first thing to shrink when representations collapse, long
        before normalised targets show it."""
        y = top.reshape(top.shape[0], -1, top.shape[-1])
        w = valid.reshape(-1) if valid is not None else torch.ones(y.shape[1], device=y.device)
        return spread_moments(y, w)

    def losses(self, pred: torch.Tensor, cls_pred: torch.Tensor | None, targets: torch.Tensor,
               mask: MaskInfo) -> StepOutput:
        sample = torch.arange(pred.shape[0], device=pred.device) // self.clones
        y = targets[sample]
        weight = mask.mask.to(torch.float32)
        err = self._elementwise_loss(pred.float(), y).sum(-1)
        loss_reg = (err * weight).sum()
        loss_cls = loss_reg.new_zeros(())
        m = self.cfg.model
        if cls_pred is not None and m.cls_loss > 0:
            # A sum over views; fairseq multiplies it by the micro-batch's masked count before the
            # global division, which made its weight depend on the split: see cls_share.
            loss_cls = self._elementwise_loss(cls_pred.float(), targets.mean(1)[sample]).sum() * m.cls_loss
        flat_w = weight.reshape(-1)
        with torch.no_grad():
            target_moments = spread_moments(y.reshape(-1, y.shape[-1]), flat_w)
            pred_moments = spread_moments(pred.detach().float().reshape(-1, pred.shape[-1]), flat_w)
        return StepOutput(loss_reg, loss_cls, weight.sum(), target_moments, pred_moments)

    def _elementwise_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        beta = self.cfg.model.loss_beta
        if beta > 0:
            return F.smooth_l1_loss(pred, target, reduction="none", beta=beta) * self.loss_scale
        return (pred - target) ** 2 * self.loss_scale

    # ------------------------------------------------------------------------------- features
    def check_layer(self, layer: int | str) -> None:
        """Raise ValueError unless ``layer`` names a shared block (negative from the last) or ``"mean"``."""
        depth = len(self.blocks)
        if layer != "mean" and not (isinstance(layer, int) and -depth <= layer < depth):
            raise ValueError(f"layer {layer!r}: this model has {depth} blocks; allowed values: "
                             f"-{depth}..{depth - 1} or 'mean'")

    def extract_features(
        self, source: torch.Tensor, lengths: torch.Tensor | None = None, layer: int | str = -1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Student features of the unmasked input and the (B, T) valid-position mask (None when
        nothing is padded). ``layer``: a shared block's index (negative counts from the last) or
        ``"mean"`` over all shared blocks; extra tokens are removed. Padding is hidden from
        attention, so a padded sample's features equal those it gets alone. Builds a graph (for
        fine-tuning); wrap in ``torch.inference_mode()`` to extract."""
        self.check_layer(layer)
        depth = len(self.blocks)
        local, valid = self.encoder.local_features(source, lengths)
        x, bias = self.encoder(local, valid, None)
        outputs = []
        for blk in self.blocks[: depth if layer == "mean" else layer % depth + 1]:
            x, _ = blk(x, bias)
            outputs.append(x[:, self.num_extra :])
        feats = torch.stack(outputs).mean(0) if layer == "mean" else outputs[-1]
        return feats, valid
