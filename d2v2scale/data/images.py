"""ImageNet-style images through NVIDIA DALI: decode (GPU ``mixed`` or CPU), random-resized crop,
flip, ImageNet normalisation, CHW.

The same pipeline graph runs with ``device="mixed"`` on a GPU (nvJPEG ROI decode of the crop
window only) and ``device="cpu"`` elsewhere, so CPU tests exercise what a GPU run uses.

Which file a rank reads at a step, *and* its augmentation, are pure functions of the sample's
global position: the crop (scale in [0.2, 1], aspect ratio in [3/4, 4/3], position) and the flip
come from the counter-based RNG keyed by (seed, position) and are fed to DALI with the encoded
bytes. So every layout of the same global batch sees identical pixels, two TP ranks get identical
batches, and a resumed run continues exactly — no loader state beyond the step.

The file list comes from a :class:`~d2v2scale.data.index.DataIndex` (built once per job; no image
is opened to build it). A file that cannot be read or decoded is found when a batch reads it:
it is logged once, counted, and the sample is replaced by another file chosen by the counter RNG
from (seed, position, attempt) — so the substitute is the same in every layout and after a resume.

Without DALI installed, a PIL + torch implementation of the same crop parameters is used, and
that is logged once.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import counter_rng
from ..logs import LOG
from .files import IMAGE_SUFFIXES, DataError, log_once, read_file
from .index import DataIndex
from .indexing import IndexRules, as_index
from .schedule import epoch_indices

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
_STREAM_AUGMENT = 11
_STREAM_SUBSTITUTE = 13
MAX_ATTEMPTS = 64  # substitutes tried for one position before the data set is declared unusable
# A row is only a file's name: an older index's unchanged folders are reused, and only 8 evenly spaced
# files are opened, to tell a wrong folder from a data set with some bad files.
IMAGE_INDEX = IndexRules("images", IMAGE_SUFFIXES, reuse_folders=True, sample=8)


def crop_params(seed: int, positions: torch.Tensor) -> np.ndarray:
    """(N, 5) float32 per sample: area fraction, log aspect ratio, x and y anchor in [0, 1), flip."""
    keys = counter_rng.combine(seed, positions.to(torch.int64))
    u = counter_rng.uniform(keys.reshape(-1), 5, _STREAM_AUGMENT).double()
    scale = SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, 0]
    log_ratio = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[:, 1]
    flip = (u[:, 4] < 0.5).double()
    return torch.stack([scale, log_ratio, u[:, 2], u[:, 3], flip], 1).float().numpy()


def relative_window(params: np.ndarray, height: float, width: float) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) of the crop as fractions of the image, clamped inside it (the DALI graph
    computes the same arithmetic with its math operators)."""
    scale, ratio = float(params[0]), math.exp(float(params[1]))
    w_rel = min(math.sqrt(scale * ratio * height / width), 1.0)
    h_rel = min(math.sqrt(scale / ratio * width / height), 1.0)
    return float(params[2]) * (1 - w_rel), float(params[3]) * (1 - h_rel), w_rel, h_rel


def _dali_pipeline(batch_size: int, size: int, device: str, device_id: int | None, threads: int):
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, exec_dynamic=True,
                  prefetch_queue_depth=1)
    def pipe():
        jpegs = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        params = fn.external_source(name="params", dtype=types.FLOAT, ndim=1)
        shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.FLOAT)
        h, w = shape[0], shape[1]
        scale, ratio = params[0], dmath.exp(params[1])
        w_rel = dmath.min(dmath.sqrt(scale * ratio * h / w), 1.0)
        h_rel = dmath.min(dmath.sqrt(scale / ratio * w / h), 1.0)
        start = fn.stack(params[2] * (1.0 - w_rel), params[3] * (1.0 - h_rel))
        images = fn.decoders.image_slice(jpegs, start, fn.stack(w_rel, h_rel), device=device,
                                         output_type=types.RGB, normalized_anchor=True, normalized_shape=True)
        images = fn.resize(images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(images, mirror=fn.cast(params[4], dtype=types.INT32), dtype=types.FLOAT,
                                        output_layout="CHW", mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD])

    p = pipe()
    p.build()
    return p


def _pil_decode(data: np.ndarray, params: np.ndarray, size: int) -> torch.Tensor:
    """The fallback path: same crop window and flip, PIL decode, bicubic resize in torch."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
    x0, y0, w, h = relative_window(params, img.height, img.width)
    box = (round(x0 * img.width), round(y0 * img.height), round((x0 + w) * img.width), round((y0 + h) * img.height))
    t = torch.from_numpy(np.asarray(img.crop(box), dtype=np.float32)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 255)
    if params[4] > 0.5:
        t = t.flip(-1)
    return _normalize(t)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    """(3, H, W) pixel values 0–255 → ImageNet-normalised, as the DALI graph's crop_mirror_normalize."""
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255
    std = torch.tensor(STD).view(3, 1, 1) * 255
    return (t - mean) / std


EVAL_CROP = 0.875  # center crop fraction of the resized image (224 of 256), as MAE/BEiT evaluation


def eval_transform(path, size: int) -> torch.Tensor:
    """An image file as the model sees it at evaluation: shorter side resized to size/0.875
    (bicubic, antialiased), center ``size``² crop, ImageNet normalisation, (3, size, size) fp32."""
    from PIL import Image

    with Image.open(path) as im:
        img = im.convert("RGB")
    t = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    short = round(size / EVAL_CROP)
    h, w = t.shape[-2:]
    new = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    t = F.interpolate(t, size=new, mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 255)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return _normalize(t[:, top : top + size, left : left + size])


def substitute(seed: int, position: int, attempt: int, num_files: int) -> int:
    """The file read in place of an unusable one at ``position`` (``attempt`` = 1, 2, ...): a pure
    function of the position, so every layout and every resume reads the same substitute."""
    return int(counter_rng.combine(seed, _STREAM_SUBSTITUTE, position, attempt)) % num_files


class ImageSource:
    """Batches of augmented images for given global positions (see :mod:`d2v2scale.data.schedule`)."""

    def __init__(self, index: DataIndex | str, img_size: int, in_chans: int, seed: int, batch_size: int,
                 device: torch.device, threads: int = 2, verbose: bool = True):
        if in_chans != 3:
            raise ValueError(f"data.kind=images produces RGB; model.in_chans={in_chans}")
        self.index = as_index(index, IMAGE_INDEX)
        self.size, self.seed, self.batch_size, self.verbose = img_size, seed, batch_size, verbose
        self.bad: dict[int, str] = {}  # file → why it is unusable (found by this rank, at read time)
        self.logged: set[str] = set()  # paths already logged in this run (by this rank, or rank 0 for others)
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            self.pipe = None
            if verbose:
                LOG.warning("NVIDIA DALI is not installed: decoding images with PIL on the CPU (slow)")
        else:
            on_gpu = device.type == "cuda"
            self._pipe_args = (batch_size, img_size, "mixed" if on_gpu else "cpu", device.index if on_gpu else None, threads)
            self.pipe = _dali_pipeline(*self._pipe_args)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def skipped(self) -> int:
        """Files this rank found unusable so far."""
        return len(self.bad)

    def skipped_files(self) -> dict[str, str]:
        """path → why, of the files this rank found unusable."""
        return {str(self.index.path(i)): why for i, why in self.bad.items()}

    def mark_bad(self, i: int, reason: str) -> None:
        """Never read file ``i`` again; one log line per file (other ranks' finds: rank 0, at log steps)."""
        if i not in self.bad:
            self.bad[i] = reason
            log_once(self.logged, str(self.index.path(i)), reason, self.verbose)

    def _read(self, position: int, index: int) -> tuple[int, np.ndarray]:
        """(file, bytes) for ``position``: its own file, or the first readable substitute."""
        for attempt in range(MAX_ATTEMPTS):
            i = index if attempt == 0 else substitute(self.seed, position, attempt, len(self))
            if i not in self.bad:
                data, problem = read_file(self.index.path(i))
                if problem is None:
                    return i, data
                self.mark_bad(i, problem)
        raise DataError(f"{MAX_ATTEMPTS} files in a row were unusable for position {position} "
                           f"({len(self.bad)} found so far under {self.index.root}): is the data set damaged?")

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, None]:
        indices = epoch_indices(positions, len(self), self.seed).tolist()
        params = crop_params(self.seed, positions)
        files, data = zip(*(self._read(p, i) for p, i in zip(positions.tolist(), indices)))
        if self.pipe is None:
            return torch.stack([self._pil(*args) for args in zip(positions.tolist(), files, data, params)]), None
        while True:
            try:
                return self._run_dali(list(data), params), None
            except RuntimeError:
                # A file passed the byte checks but does not decode: find it with DALI itself, one
                # sample at a time, never read it again, read its position's substitute, retry.
                self.pipe = _dali_pipeline(*self._pipe_args)  # a pipeline that raised is no longer usable
                newly = [k for k, d in enumerate(data) if not self._decodes(d, params[k])]
                if not newly:
                    raise
                files, data = list(files), list(data)
                for k in newly:
                    self.mark_bad(files[k], "failed to decode")
                    files[k], data[k] = self._read(positions[k].item(), files[k])

    def _decodes(self, data: np.ndarray, params: np.ndarray) -> bool:
        """Whether DALI decodes this one file (a batch of one; the pipeline is rebuilt if not)."""
        try:
            self._run_dali([data], params[None])
            return True
        except RuntimeError:
            self.pipe = _dali_pipeline(*self._pipe_args)
            return False

    def _pil(self, position: int, file: int, data: np.ndarray, params: np.ndarray) -> torch.Tensor:
        while True:
            try:
                return _pil_decode(data, params, self.size)
            except Exception:  # noqa: BLE001 - any decoder failure means the file is unusable
                self.mark_bad(file, "failed to decode")
                file, data = self._read(position, file)

    def _run_dali(self, data: list[np.ndarray], params: np.ndarray) -> torch.Tensor:
        self.pipe.feed_input("encoded", data)
        self.pipe.feed_input("params", list(params))
        (out,) = self.pipe.run()
        return _to_torch(out)


def _to_torch(out) -> torch.Tensor:
    if hasattr(out, "as_cpu") and type(out).__name__.endswith("GPU"):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out.as_tensor()
        result = torch.empty(tensor.shape(), dtype=torch.float32, device="cuda")
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream())
        return result
    return torch.from_numpy(np.array(out.as_tensor()))
