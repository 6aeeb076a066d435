"""What a DeepSpeed JSON asks of a node: GPU-only features, DeepSpeed ops to build, bf16.

The node doctor asks these of a JSON nobody has validated yet, so each reads defensively
(a section that is not an object counts as absent).
"""
from __future__ import annotations

from collections.abc import Mapping

from .spec import json_sections, read_offload


def gpu_only_keys(ds: dict, pin_memory_default: bool = True) -> list[tuple[str, str]]:
    """The keys of a DeepSpeed JSON that ask for a GPU, each as (``key=value``, why), in the order
    the JSON's sections are read. ``pin_memory_default``: what DeepSpeed assumes for an offload
    section without ``pin_memory``."""
    section = json_sections(ds)
    found: list[tuple[str, str]] = []
    if section("fp16").get("enabled") is True:
        found.append(("fp16.enabled=true", "fp16 with loss scaling is GPU mixed precision (d2v2scale trains fp32 "
                      "or bf16 on a CPU; FSDP2 refuses fp16 everywhere)"))
    if section("amp").get("enabled") is True:
        found.append(("amp.enabled=true", "apex AMP runs on CUDA only"))
    zero = section("zero_optimization")
    if zero.get("overlap_comm") is True:
        found.append(("zero_optimization.overlap_comm=true", "it overlaps the gradient reduction with the backward "
                      "on a second CUDA stream; DeepSpeed's CPU accelerator has no streams"))
    for part in ("offload_optimizer", "offload_param"):
        offload = read_offload(zero.get(part))
        if offload.device not in ("cpu", "nvme"):
            continue
        if (offload.pin_memory if offload.pin_memory is not None else pin_memory_default) is True:
            default = "" if offload.pin_memory is not None else " (DeepSpeed's default)"
            found.append((f"zero_optimization.{part}.pin_memory=true{default}", "pinned host buffers exist for copies "
                          "to and from a GPU, and offloading moves state out of GPU memory"))
    for key in ("zero_quantized_weights", "zero_quantized_gradients", "zero_quantized_nontrainable_weights"):
        if zero.get(key) is True:
            found.append((f"zero_optimization.{key}=true", "ZeRO++ quantization runs CUDA kernels that DeepSpeed's "
                          "CPU accelerator lacks"))
    return found


def ops_needed(ds: dict) -> list[tuple[str, str]]:
    """The DeepSpeed ops the DeepSpeed backend's engine builds for this JSON, each with the
    key that asks for it. torch's AdamW (``torch_adam: true``, all shipped JSONs) needs none;
    otherwise DeepSpeed's FusedAdam, or its CPU Adam when the optimizer is offloaded; NVMe offload
    needs async I/O."""
    section = json_sections(ds)
    params = section("optimizer").get("params", {})
    params = params if isinstance(params, Mapping) else {}
    zero = section("zero_optimization")
    device = {part: read_offload(zero.get(part)).device for part in ("offload_optimizer", "offload_param")}
    needed = []
    if params.get("torch_adam") is not True:
        key = "optimizer.params.torch_adam" + ("=false" if "torch_adam" in params else " (absent)")
        needed.append(("cpu_adam" if device["offload_optimizer"] in ("cpu", "nvme") else "fused_adam", key))
    for part in ("offload_optimizer", "offload_param"):
        if device[part] == "nvme":
            needed.append(("async_io", f"zero_optimization.{part}.device=nvme"))
    return needed


def bf16_enabled(ds: dict) -> bool:
    """``bf16.enabled`` of a JSON nobody validated yet (the doctor's check of the GPUs)."""
    return json_sections(ds)("bf16").get("enabled") is True
