"""Mask generators: exact kept counts, block structure, determinism from (seed, step, index)."""
import pytest
import torch

from d2v2scale.config import load_config
from d2v2scale.model.masking import (
    MaskGenerator,
    block_mask_1d,
    inverse_block_mask_2d,
    mask_from_bool,
    random_mask,
    row_keys,
)


def _generator(preset: str) -> MaskGenerator:
    cfg = load_config(preset)
    mk = cfg.masking
    return MaskGenerator(cfg.mask_kind(), mk.mask_prob, mk.mask_length, mk.mask_prob_adjust, cfg.model.clone_batch)


def _check_consistent(info, length):
    kept = ~info.mask
    # keep_idx lists exactly the unmasked positions of each row, ascending
    rebuilt = torch.zeros_like(info.mask)
    rebuilt.scatter_(1, info.keep_idx, True)
    assert torch.equal(rebuilt, kept)
    assert bool((info.keep_idx[:, 1:] > info.keep_idx[:, :-1]).all())
    assert info.mask.shape[1] == length


def test_vit_b_masks_157_of_196_in_every_row():
    gen = _generator("vit_b")
    info = gen(seed=1, step=0, sample_ids=torch.arange(32), max_len=196)
    assert info.mask.shape == (32 * 16, 196)
    assert bool((info.mask.sum(1) == 157).all())
    assert info.num_kept == 39 == int(196 * (1 - 0.8))
    _check_consistent(info, 196)


@pytest.mark.parametrize("preset,length", [("vit_l", 196), ("vit_h", 196), ("tiny_image", 64)])
def test_kept_count_is_int_L_times_one_minus_R(preset, length):
    cfg = load_config(preset)
    info = _generator(preset)(seed=3, step=7, sample_ids=torch.arange(8), max_len=length)
    assert bool(((~info.mask).sum(1) == int(length * (1 - cfg.masking.mask_prob))).all())


def test_inverse_block_masks_are_block_structured():
    """Kept patches come in blocks: most have a kept 4-neighbour (random masking would give ~1-0.8^4)."""
    info = _generator("vit_b")(seed=0, step=0, sample_ids=torch.arange(64), max_len=196)
    kept = (~info.mask).view(-1, 14, 14)
    pad = torch.nn.functional.pad(kept.float(), (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    frac_with_neighbour = ((neighbours > 0) & kept).sum() / kept.sum()
    assert frac_with_neighbour > 0.8

    rand = random_mask(row_keys(0, 0, torch.arange(64), 16), torch.full((1024,), 196), 196, 0.8)
    kept_r = (~rand.mask).view(-1, 14, 14)
    pad_r = torch.nn.functional.pad(kept_r.float(), (1, 1, 1, 1))
    nb_r = pad_r[:, :-2, 1:-1] + pad_r[:, 2:, 1:-1] + pad_r[:, 1:-1, :-2] + pad_r[:, 1:-1, 2:]
    assert ((nb_r > 0) & kept_r).sum() / kept_r.sum() < 0.6 < frac_with_neighbour


def test_audio_base_masks_exactly_half():
    gen = _generator("audio_base")
    info = gen(seed=1, step=5, sample_ids=torch.arange(6), max_len=100)
    assert bool((info.mask.sum(1) == 50).all()) and bool(((~info.mask).sum(1) == 50).all())
    _check_consistent(info, 100)
    # spans of 5: most masked frames have a masked neighbour
    m = info.mask.float()
    nb = torch.nn.functional.pad(m, (1, 1))
    has_nb = ((nb[:, :-2] + nb[:, 2:]) > 0) & info.mask
    assert has_nb.sum() / info.mask.sum() > 0.8


def test_audio_masks_use_each_samples_real_length():
    """Padded rows: masks never touch padding, every row keeps the same count, computed on its length."""
    gen = _generator("audio_base")
    lengths = torch.tensor([100, 80, 61])
    info = gen(seed=2, step=1, sample_ids=torch.arange(3), max_len=100, lengths=lengths)
    row_len = lengths.repeat_interleave(8)
    valid = torch.arange(100)[None] < row_len[:, None]
    assert not bool((info.mask & ~valid).any())
    assert not bool((info.keep_idx >= row_len[:, None]).any())
    kept = (valid & ~info.mask).sum(1)
    assert bool((kept == int(61 * 0.5)).all())


def test_masks_are_a_function_of_seed_step_and_sample_index():
    gen = _generator("vit_b")
    a = gen(seed=5, step=10, sample_ids=torch.tensor([3, 4, 9]), max_len=196).mask.view(3, 16, -1)
    b = gen(seed=5, step=10, sample_ids=torch.tensor([9, 3]), max_len=196).mask.view(2, 16, -1)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])  # independent of batch composition
    c = gen(seed=5, step=11, sample_ids=torch.tensor([3]), max_len=196).mask.view(1, 16, -1)
    d = gen(seed=6, step=10, sample_ids=torch.tensor([3]), max_len=196).mask.view(1, 16, -1)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    # the M clones of one sample differ from each other
    assert len({tuple(r.tolist()) for r in a[0]}) == 16


def test_masks_are_made_where_the_sample_ids_are():
    """Keys (and so masks) live on the sample ids' device: a GPU caller of ``make_mask`` got CPU masks
    once, because the seed (a Python int) fixed the device. 'meta' stands in for CUDA here."""
    keys = row_keys(5, 10, torch.arange(3, device="meta"), 4)
    assert keys.device.type == "meta" and keys.shape == (12,)
    info = inverse_block_mask_2d(keys, (14, 14), 0.8, 3, 0.07)
    assert info.mask.device.type == "meta" and info.keep_idx.shape == (12, 39)


def test_text_random_masking_counts():
    gen = _generator("text_base")
    info = gen(seed=0, step=0, sample_ids=torch.arange(4), max_len=512)
    assert bool(((~info.mask).sum(1) == int(512 * (1 - 0.48))).all())


def test_2d_block_counts_match_reference_numbers():
    """Reference table: ViT-B samples 5 centres (39 kept), ViT-L/H 7 centres (49 kept)."""
    for prob, adjust, kept in [(0.8, 0.07, 39), (0.75, 0.1, 49)]:
        info = inverse_block_mask_2d(row_keys(0, 0, torch.arange(4), 1), (14, 14), prob, 3, adjust)
        assert info.num_kept == kept


def test_precomputed_mask_must_have_equal_counts():
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[0, :3] = True
    m[1, :4] = True
    with pytest.raises(ValueError, match="different counts"):
        mask_from_bool(m)


def test_1d_block_mask_spans_are_clamped_inside_the_sequence():
    keys = row_keys(0, 0, torch.arange(50), 1)
    info = block_mask_1d(keys, torch.full((50,), 20), 20, 0.5, 5, 0.05)
    assert bool(((~info.mask).sum(1) == 10).all())
