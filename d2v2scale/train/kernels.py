"""Optional NVIDIA apex kernels, chosen in this one place and logged at start.

apex is never required. On a GPU where ``apex`` is importable, every affine ``nn.LayerNorm`` of
the model (the blocks' two, the encoders' input norms) becomes apex's ``FusedLayerNorm`` — one
fused CUDA kernel forward and backward — with the same parameters under the same names, so
checkpoints, tensor parallelism and the teacher copy are unaffected. Anywhere else (CPU, no apex,
``model.kernels=torch``) the model keeps torch's kernels. apex is installed by hand on GPU
clusters (see docs/install.md); it ships no wheel for every CUDA/torch pair.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn


@dataclass(frozen=True)
class Kernels:
    layer_norm: type | None  # the replacement for nn.LayerNorm, None: torch's
    why: str

    def describe(self) -> str:
        name = "torch" if self.layer_norm is None else f"{self.layer_norm.__module__}.{self.layer_norm.__name__}"
        return f"layer norm kernel: {name} ({self.why})"


def _import_apex() -> ModuleType | None:
    try:
        return importlib.import_module("apex.normalization")
    except ImportError:
        return None


def select_kernels(choice: str, device: torch.device, apex_normalization: ModuleType | None = None) -> Kernels:
    """``apex_normalization``: the ``apex.normalization`` module (tests pass a stand-in); imported when None."""
    if choice == "torch":
        return Kernels(None, "model.kernels=torch")
    if device.type != "cuda":
        return Kernels(None, f"apex kernels are for CUDA devices; this is {device.type}")
    module = apex_normalization or _import_apex()
    fused = getattr(module, "FusedLayerNorm", None)
    if fused is None:
        return Kernels(None, "apex is not installed")
    return Kernels(fused, "apex is installed")


def apply_kernels(model: nn.Module, kernels: Kernels) -> int:
    """Swap every affine ``nn.LayerNorm`` of ``model`` for ``kernels.layer_norm``, in place, keeping
    the parameter tensors; returns how many were swapped."""
    if kernels.layer_norm is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm and child.elementwise_affine:
                fused = kernels.layer_norm(child.normalized_shape, eps=child.eps, elementwise_affine=True)
                fused.weight, fused.bias = child.weight, child.bias
                setattr(parent, name, fused.to(child.weight.device))
                swapped += 1
    return swapped
