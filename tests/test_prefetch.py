"""Read-ahead of step batches: same batches as loading on demand, work done off the main thread."""
import threading
from concurrent.futures import wait

import pytest
import torch

from conftest import import_or_missing

from d2v2scale.config import load_config
from d2v2scale.data.loader import StepLoader
from d2v2scale.data.prefetch import StepPrefetcher
from d2v2scale.data.schedule import RankSchedule

from data_fixtures import make_jpegs


class Recorder:
    """produce(n) = n², remembering which thread produced which step."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, str]] = []
        self.started = {n: threading.Event() for n in range(20)}
        self.fail_at = fail_at

    def __call__(self, step: int) -> int:
        self.calls.append((step, threading.current_thread().name))
        self.started[step].set()
        if step == self.fail_at:
            raise ValueError(f"bad batch at step {step}")
        return step * step


def test_reads_ahead_on_one_background_thread_up_to_the_limit():
    rec = Recorder()
    pf = StepPrefetcher(rec, depth=2, limit=6)
    assert pf.get(0) == 0
    # steps 1 and 2 start without being asked for: the read-ahead runs while the caller computes
    assert rec.started[1].wait(10) and rec.started[2].wait(10)
    assert [pf.get(n) for n in range(1, 6)] == [1, 4, 9, 16, 25]
    pf.close()
    assert sorted(s for s, _ in rec.calls) == list(range(6))  # each step once, nothing past the limit
    assert {t for _, t in rec.calls} == {next(t for _, t in rec.calls)}
    assert rec.calls[0][1].startswith("d2v2scale-prefetch")


def test_out_of_order_request_is_answered_and_depth_zero_is_synchronous():
    rec = Recorder()
    pf = StepPrefetcher(rec, depth=1, limit=100)
    assert pf.get(0) == 0 and pf.get(7) == 49 and pf.get(8) == 64
    pf.close()
    sync = Recorder()
    assert StepPrefetcher(sync, depth=0, limit=100).get(3) == 9
    assert sync.calls == [(3, threading.current_thread().name)]


def test_a_failing_step_raises_when_that_step_is_requested():
    pf = StepPrefetcher(Recorder(fail_at=2), depth=1, limit=10)
    assert pf.get(0) == 0 and pf.get(1) == 1  # step 2 already failed in the background
    with pytest.raises(ValueError, match="bad batch at step 2"):
        pf.get(2)
    pf.close()
    with pytest.raises(ValueError):
        StepPrefetcher(Recorder(), depth=-1, limit=10)


def test_step_loader_batches_and_skip_counts_do_not_depend_on_read_ahead(tmp_path):
    """Images through DALI with unusable files (one fails only at decode time): the read-ahead loader
    hands out bit-identical tensors, and counts each file at the same step as the on-demand loader."""
    import_or_missing("nvidia.dali", "nvidia.dali is not installed (make test installs nvidia-dali-cuda130)")
    make_jpegs(tmp_path, 24, corrupt=4)
    cfg = load_config("tiny_image", [f"data.path={tmp_path}", "data.kind=images", "train.max_updates=4"])
    schedule = RankSchedule(global_batch=8, micro_batch=4, grad_accum=2, dp_rank=0, dp_size=1)
    loaders = [StepLoader(cfg, schedule, torch.device("cpu"), torch.bfloat16, verbose=False, prefetch_steps=k)
               for k in (0, 2)]
    counts = []
    for step in range(4):
        on_demand, ahead = (loader.step(step) for loader in loaders)
        for a, b in zip(on_demand, ahead, strict=True):
            assert a.source.dtype == b.source.dtype == torch.bfloat16
            assert torch.equal(a.source, b.source) and torch.equal(a.sample_ids, b.sample_ids)
        wait(list(loaders[1]._prefetcher._pending.values()))  # finish the read-ahead, so a leaked count shows
        assert loaders[0].skipped_files() == loaders[1].skipped_files()
        counts.append(len(loaders[1].skipped_files()))
    for loader in loaders:
        loader.close()
    # found as they are read (none at start-up): the 4 bad files are all met within the 32 positions
    assert counts == sorted(counts) and counts[0] < 4 and counts[-1] == 4, counts
