import importlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# fairseq reference data, made with fairseq's own code and kept in the repository (README.md there says
# what each file is; regenerate.py there remakes or checks them).
FAIRSEQ_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fairseq"
FIXTURE = FAIRSEQ_FIXTURES / "fairseq_d2v2_image_tiny.pt"
REGENERATE = ("FAIRSEQ_SRC=/path/to/fairseq python tests/fixtures/fairseq/regenerate.py "
              "(see tests/fixtures/fairseq/README.md)")


@pytest.fixture(scope="session")
def fairseq_fixture():
    import torch

    if not FIXTURE.exists():
        pytest.fail(f"fixture missing: {FIXTURE} (it is part of the repository; to remake it: {REGENERATE})")
    # The fixture is our own test data (a plain dict of tensors and floats), not a user checkpoint.
    return torch.load(FIXTURE, weights_only=False)


def fixture_config():
    """The configuration the fairseq fixture was made with (see tests/fixtures/fairseq/README.md)."""
    from d2v2scale.config import load_config

    return load_config(
        "tiny_image",
        [
            "model.img_size=224", "model.patch_size=16", "model.embed_dim=64", "model.depth=3",
            "model.prenet_depth=0", "model.num_heads=2", "model.norm_eps=1e-6", "model.clone_batch=4",
            "model.average_top_k_layers=3", "model.layer_norm_targets=true", "model.cls_loss=0.01",
            "model.num_extra_tokens=1", "model.mask_noise_std=0", "decoder.dim=64", "decoder.kernel=3",
            "decoder.layers=2", "decoder.groups=16", "decoder.residual=true",
            "masking.mask_prob=0.8", "masking.mask_prob_adjust=0.07", "masking.mask_length=3",
        ],
    )


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests are the only ones that may skip, and only where CUDA is absent.
    ``D2V2SCALE_TEST_ORDER=reverse`` runs the tests in reverse order: a test that passes only after
    another one has run fails there."""
    import torch

    order = os.environ.get("D2V2SCALE_TEST_ORDER", "")
    if order not in ("", "reverse"):
        raise pytest.UsageError(f"D2V2SCALE_TEST_ORDER={order!r}; allowed: reverse, or unset")
    if order == "reverse":
        items.reverse()
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run python bench/gpu_check.py on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Every test starts from the logging set-up the one before found: a test that sets up a run's
    logging (``setup_logging``: handlers, levels, no propagation, warnings captured) would
    otherwise decide what every later test sees on stderr and in ``caplog``."""
    import logging

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg, handlers, level, propagate, disabled in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled
    logging.captureWarnings(False)  # no test starts with Python warnings routed to a logger


@pytest.fixture
def run_logging():
    """The logging a run sets up on rank 0 (INFO on stdout, warnings on stderr), for tests of what a run shows."""
    from d2v2scale.logs import setup_logging

    setup_logging(0)


def missing_dependency(reason: str):
    """A test dependency is absent: under CI=true that fails (a skip would hide a broken install);
    elsewhere the test is skipped with the reason."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"missing test dependency under CI=true: {reason}")
    pytest.skip(reason)


def import_or_missing(module: str, reason: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        missing_dependency(reason)


@pytest.fixture
def dali():
    """For tests that exercise the DALI pipelines themselves (make test installs the CPU wheel)."""
    return import_or_missing("nvidia.dali", "nvidia.dali is not installed (make test installs nvidia-dali-cuda130)")
