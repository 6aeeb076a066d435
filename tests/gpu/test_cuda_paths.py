"""The CUDA paths, on a real GPU: bf16 step, DALI ``mixed`` decode, CUDA-event timers, NVML,
CUDA RNG resume and NCCL collectives. Marked ``gpu``: collected everywhere, skipped (with the
reason) only where CUDA is absent. ``python bench/gpu_check.py`` runs them and then calibrates
the planner."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v2scale.config import load_config
from d2v2scale.data.synthetic import synthetic_batch
from d2v2scale.model import Data2Vec2, normalize_loss
from d2v2scale.train.teacher import build_teacher

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def _step(cfg, device, dtype):
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).to(device).train()
    teacher = build_teacher(model, cfg)
    source = synthetic_batch(cfg, 4, torch.Generator().manual_seed(1)).to(device)
    mask = model.make_mask(0, 0, torch.arange(4), source)
    torch.manual_seed(2)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(source, model.teacher_fn(teacher.module), mask)
    loss = normalize_loss(out)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None])
    return out, loss, grads


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_bf16_cuda_step_matches_the_fp32_cpu_step(preset):
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 2e-3 per op); through a few blocks,
    the decoder and an L2 loss that compounds to ~1e-2. Targets and the loss stay fp32."""
    cfg = load_config(preset, ["model.mask_noise_std=0"])
    out_ref, loss_ref, g_ref = _step(cfg, torch.device("cpu"), torch.float32)
    out, loss, g = _step(cfg, torch.device("cuda"), torch.bfloat16)
    assert loss.dtype == torch.float32 and out.loss_reg.dtype == torch.float32
    assert abs(loss.item() - loss_ref.item()) <= 3e-2 * abs(loss_ref.item())
    cosine = torch.nn.functional.cosine_similarity(g, g_ref, dim=0).item()
    assert cosine > 0.98, cosine


def test_dali_mixed_decode_matches_cpu_decode(tmp_path):
    """nvJPEG and libjpeg-turbo round the IDCT and upsample chroma differently (libjpeg-turbo's
    "fancy" triangular filter): a level or two per pixel after the same crop, resize and
    normalisation (one level ≈ 0.017; measured on an H200: mean 0.022, i.e. 1.3 levels). A bound of
    2 levels on the mean, half a unit anywhere, and equal means (a swapped channel, a wrong scale or
    crop would shift it) tell a decoder difference from a pipeline one."""
    from PIL import Image

    from d2v2scale.data.images import ImageSource

    rng = np.random.default_rng(0)
    for k in range(8):
        base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize((160 + 8 * k, 120), Image.BICUBIC).save(tmp_path / f"{k}.jpg", quality=92)
    positions = torch.arange(8)
    cpu = ImageSource(str(tmp_path), 64, 3, 0, 8, torch.device("cpu"), verbose=False).batch(positions)[0]
    gpu = ImageSource(str(tmp_path), 64, 3, 0, 8, torch.device("cuda", 0), verbose=False).batch(positions)[0]
    assert gpu.is_cuda and gpu.shape == cpu.shape
    diff = (gpu.cpu() - cpu).abs()
    assert diff.mean().item() < 0.035 and diff.max().item() < 0.5
    assert abs(gpu.mean().item() - cpu.mean().item()) < 0.005  # no bias: same channels, scale and crop


def test_cuda_event_timers_measure_device_time():
    from d2v2scale.profiling.timers import StepTimer

    timer = StepTimer(torch.device("cuda"), enabled=True)
    with timer.phase("student"):
        torch.cuda._sleep(50_000_000)  # a device-side busy loop, no host involvement
    timer.end_step()
    start = time.perf_counter()
    torch.cuda.synchronize()
    (row,) = timer.resolve()
    assert row["student"] > 0.001 and time.perf_counter() - start < 60


def test_nvml_sampler_reads_this_gpu():
    from d2v2scale.profiling.gpu import GpuSampler

    sampler = GpuSampler(torch.cuda.current_device(), interval_s=0.05)
    assert sampler.available, sampler.reason
    sampler.start()
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        x = x @ x.T / 4096
    torch.cuda.synchronize()
    time.sleep(0.3)
    sampler.stop()
    summary = sampler.summary()
    assert summary["samples"] >= 2 and summary["max_mem_used_gb"] > 0.05


def test_cuda_rng_save_restore_is_bit_exact():
    from d2v2scale.train.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3)
    torch.rand(10, device="cuda")
    saved = rng_state()
    first = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
    torch.rand(1000, device="cuda")
    set_rng_state(saved)
    again = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
    assert torch.equal(first, again)


def test_nccl_collectives():
    """all-reduce, all-gather and reduce-scatter over NCCL on every visible GPU (one rank per GPU;
    a single GPU still initialises NCCL and runs the collectives over one rank)."""
    n = torch.cuda.device_count()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                           "--master_port=29741", str(ROOT / "tests" / "gpu" / "nccl_collectives.py")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("nccl ok") == n
