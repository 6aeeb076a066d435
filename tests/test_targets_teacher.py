"""Targets against a hand computation; the teacher sees the unmasked input and gets no gradient;
the EMA after k updates equals the closed form; sharded EMA equals unsharded."""
import functools
import threading

import pytest
import torch

from d2v2scale import modality_registry
from d2v2scale.config import load_config
from d2v2scale.data.synthetic import synthetic_batch
from d2v2scale.model import Data2Vec2, normalize_loss
from d2v2scale.model.data2vec2 import Targets
from d2v2scale.train.teacher import EMASchedule, FlatGroup, FlatGroupEMA, build_teacher


def _model(preset, *overrides):
    torch.manual_seed(0)
    cfg = load_config(preset, list(overrides))
    model = Data2Vec2(cfg.model_spec())
    return cfg, model, build_teacher(model, cfg)


def _by_hand(layers, k, final_ln):
    """IN (each channel over time, biased var, eps 1e-5) per layer → mean → optional LN, written out."""
    acc = 0
    for y in layers[-k:]:
        mu = y.mean(dim=1, keepdim=True)
        var = ((y - mu) ** 2).mean(dim=1, keepdim=True)
        acc = acc + (y - mu) / torch.sqrt(var + 1e-5)
    y = acc / k
    if final_ln:
        mu = y.mean(-1, keepdim=True)
        var = ((y - mu) ** 2).mean(-1, keepdim=True)
        y = (y - mu) / torch.sqrt(var + 1e-5)
    return y


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_targets_match_hand_computation_on_the_unmasked_input(preset):
    cfg, model, teacher = _model(preset)
    source = synthetic_batch(cfg, 3, torch.Generator().manual_seed(1))
    captured = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: captured.append(o.detach())) for b in teacher.module.blocks]
    model.train()
    mask = model.make_mask(0, 0, torch.arange(3), source)
    out = model(source, model.teacher_fn(teacher.module), mask)
    for h in hooks:
        h.remove()
    local, _ = model.encoder.local_features(source)
    targets = model.teacher_targets(teacher.module, source, local, None, None)
    # the teacher ran once per sample on the full sequence: B rows (not B·M) and all T positions
    T = local.shape[1]
    assert all(c.shape == (3, T + cfg.model.num_extra_tokens, cfg.model.embed_dim) for c in captured)
    layers = [c[:, cfg.model.num_extra_tokens :] for c in captured[: len(teacher.module.blocks)]]
    expected = _by_hand(layers, cfg.model.average_top_k_layers, cfg.model.layer_norm_targets)
    torch.testing.assert_close(targets, expected, atol=2e-5, rtol=0)
    assert torch.isfinite(normalize_loss(out))


def test_teacher_targets_do_not_depend_on_the_mask():
    cfg, model, teacher = _model("tiny_image")
    source = synthetic_batch(cfg, 2, torch.Generator().manual_seed(0))
    model.eval()
    local, _ = model.encoder.local_features(source)
    captured = []
    orig = model.teacher_layers

    def spy(*a, **k):
        captured.append(torch.stack(orig(*a, **k)))
        return list(captured[-1])

    model.teacher_layers = spy
    for step in (0, 1):
        model(source, model.teacher_fn(teacher.module), model.make_mask(0, step, torch.arange(2), source))
    torch.testing.assert_close(captured[0], captured[1], rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_gradients_never_reach_the_teacher(preset):
    cfg, model, teacher = _model(preset)
    source = synthetic_batch(cfg, 2, torch.Generator().manual_seed(0))
    model.train()
    out = model(source, model.teacher_fn(teacher.module), model.make_mask(0, 0, torch.arange(2), source))
    normalize_loss(out).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the teacher shares no storage with the student
    student_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not student_ptrs & {p.data_ptr() for p in teacher.module.parameters()}


def test_teacher_tracks_the_right_parts():
    _, img, t_img = _model("tiny_image")
    _, aud, t_aud = _model("tiny_audio")
    _, txt, t_txt = _model("tiny_text")

    def names(t):
        return {n for n, _ in t.module.named_parameters()}

    assert names(t_img) == {n for n, _ in img.named_parameters() if not n.startswith("decoder.")}
    assert not any(n.startswith(("decoder.", "encoder.local_encoder.", "encoder.project_features.")) for n in names(t_aud))
    assert "encoder.alibi_scale" in names(t_aud)
    assert names(t_txt) == {n for n, _ in txt.named_parameters() if n.startswith("blocks.")}
    # fixed positions are copied, not averaged
    assert "encoder.fixed_positional_encoder.positions" in t_img.copied_names


def test_ema_closed_form_and_freeze():
    """Student held at c: e_k = c + (e_0 - c)·Π d(i); then frozen once the decay reaches 1."""
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    teacher_net = torch.nn.Linear(3, 2)
    teacher_net.load_state_dict(student.state_dict())
    e0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    schedule = EMASchedule(0.5, 1.0, 4)  # decays 0.625, 0.75, 0.875, then 1.0
    ema = FlatGroupEMA(teacher_net, schedule)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(2.0)
    prod = 1.0
    for k in range(1, 7):
        d = ema.update(k, student)
        assert d == pytest.approx(0.5 + 0.5 * min(k, 4) / 4)
        if d < 1:
            prod *= d
        for n, p in ema.module.named_parameters():
            torch.testing.assert_close(p, 2.0 + (e0[n] - 2.0) * prod, atol=1e-6, rtol=0)
    # a repeated counter does not update again
    before = [p.clone() for p in ema.module.parameters()]
    ema.update(6, student)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))


@pytest.mark.parametrize("flag", ["host", "device"])
def test_a_skipped_step_leaves_the_ema_and_an_applied_one_moves_it(flag):
    """The optimizer's "applied" as a host bool (lerp) or a device bool (device-scalar multiplies:
    no read back): the closed form e·d + s·(1 - d) when applied, the EMA unchanged when skipped.
    fp32, one update of O(1) values: 1e-6."""
    torch.manual_seed(0)
    student, teacher_net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = FlatGroupEMA(teacher_net, EMASchedule(0.75, 0.75, 0))
    e0 = [p.detach().clone() for p in ema.module.parameters()]
    for k, applied in ((1, False), (2, True)):
        ema.update(k, student, applied=torch.tensor(applied) if flag == "device" else applied)
        for p, e, s in zip(ema.module.parameters(), e0, student.parameters()):
            torch.testing.assert_close(p, e * 0.75 + s.detach() * 0.25 if applied else e, atol=1e-6, rtol=0)


def test_sharded_ema_equals_unsharded():
    """Two shards (odd numel, so the flat vector is padded) with a local all_gather equal one full EMA."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 3))
    full = FlatGroupEMA(_copy(student), EMASchedule(0.9, 0.99, 10))
    shards: list[FlatGroupEMA] = []

    def gather(out, _shard):
        out.copy_(torch.cat([s.masters[0] for s in shards]))

    shards += [FlatGroupEMA(_copy(student), EMASchedule(0.9, 0.99, 10), shard_rank=r, shard_count=2, all_gather=gather)
               for r in range(2)]
    assert sum(s.masters[0].numel() for s in shards) >= full.masters[0].numel()
    for step in range(1, 6):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        full.update(step, student)
        for s in shards:
            s.update(step, student)
    for s in shards:
        s.publish()  # both masters are final now
        for a, b in zip(full.module.parameters(), s.module.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bucketed_refresh_equals_unsharded_with_one_gather_per_bucket():
    """ZeRO-3-like layout (one padded group per parameter) over 3 shards, each shard on its own
    thread with a barrier-based all_gather: buckets of several groups, and a group larger than the
    bucket on its own, must give exactly the unsharded EMA, with fewer collectives than groups."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 40), torch.nn.Linear(40, 1))
    names = [n for n, _ in student.named_parameters()]
    count = 3
    groups = [FlatGroup((n,), (0,), -(-p.numel() // count) * count) for n, p in student.named_parameters()]
    full = FlatGroupEMA(_copy(student), EMASchedule(0.9, 0.99, 10))
    slots, barrier, calls = [None] * count, threading.Barrier(count, timeout=60), []  # a failing shard cannot hang the test

    def gather_for(rank):
        def gather(out, shard):
            slots[rank] = shard.clone()
            barrier.wait()
            out.copy_(torch.cat(slots))
            calls.append(rank)
            barrier.wait()
        return gather

    shards = [FlatGroupEMA(_copy(student), EMASchedule(0.9, 0.99, 10), groups=groups, shard_rank=r, shard_count=count,
                         all_gather=gather_for(r), bucket_numel=90) for r in range(count)]
    assert shards[0].buckets == [[0, 1], [2], [3, 4, 5]]  # padded numels 36+6 | 201 (> 90) alone | 42+42+3
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    full.update(1, student)
    threads = [threading.Thread(target=s.update, args=(1, student)) for s in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == count * len(shards[0].buckets) < count * len(groups)
    for s in shards:
        for n in names:
            torch.testing.assert_close(dict(s.module.named_parameters())[n], dict(full.module.named_parameters())[n],
                                       rtol=0, atol=0)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_teacher_state_round_trip():
    cfg, model, teacher = _model("tiny_image")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    teacher.update(3, model)
    state = teacher.state_dict()
    _, model2, teacher2 = _model("tiny_image")
    teacher2.load_state_dict(state)
    assert teacher2.num_updates == 3
    for a, b in zip(teacher.module.parameters(), teacher2.module.parameters()):
        assert torch.equal(a, b)
    bad = dict(state, shard_count=2)
    with pytest.raises(ValueError, match="layout mismatch"):
        teacher2.load_state_dict(bad)


@pytest.mark.parametrize("preset", ["tiny_audio", "tiny_text"])
def test_padding_does_not_change_targets_of_real_positions(preset):
    """A short sample padded into a longer batch gets the same targets as on its own: padding is
    hidden from attention, zeroed before the conv positions and left out of instance-norm stats."""
    cfg, model, teacher = _model(preset)
    model.eval()
    src = synthetic_batch(cfg, 2, torch.Generator().manual_seed(3))
    full = src.shape[1]
    short = full * 3 // 4
    lengths = torch.tensor([full, short])
    padded = src.clone()
    padded[1, short:] = modality_registry.get(cfg.model.modality).pad_value(cfg.model)
    local, valid = model.encoder.local_features(padded, lengths)
    both = model.teacher_targets(teacher.module, padded, local, valid, lengths)
    alone_src = src[1:, :short]
    local1, _ = model.encoder.local_features(alone_src)
    alone = model.teacher_targets(teacher.module, alone_src, local1, None, None)
    n = alone.shape[1]
    assert int(valid[1].sum()) == n
    torch.testing.assert_close(both[1, :n], alone[0], atol=1e-4, rtol=0)

    mask = model.make_mask(0, 0, torch.arange(2), padded, lengths)
    assert not bool((mask.mask & ~valid.repeat_interleave(cfg.model.clone_batch, 0)).any())
    model.train()
    out = model(padded, model.teacher_fn(teacher.module), mask, lengths=lengths)
    assert torch.isfinite(normalize_loss(out))


def test_targets_reach_the_model_as_a_callable_or_precomputed():
    """The model boundary: forward takes the teacher's targets, never the teacher module; targets
    made outside (as a sharded teacher of another backend would) give the same step."""
    from d2v2scale.model import Targets

    cfg = load_config("tiny_audio", ["model.mask_noise_std=0"])
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).train()
    teacher = build_teacher(model, cfg)
    source = synthetic_batch(cfg, 2, torch.Generator().manual_seed(0))
    mask = model.make_mask(0, 0, torch.arange(2), source)
    fn = model.teacher_fn(teacher.module)
    via_callable = model(source, fn, mask)
    with torch.no_grad():
        local, valid = model.encoder.local_features(source, None)
        made_outside = fn(source, local, valid, None)
    precomputed = model(source, Targets(made_outside.values, made_outside.layer_moments), mask)
    assert torch.equal(via_callable.loss_reg, precomputed.loss_reg)
    assert made_outside.values.dtype == torch.float32 and not made_outside.values.requires_grad


def test_model_code_imports_no_training_profiling_or_distributed_code():
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "d2v2scale"
    for path in [*(package / "model").glob("*.py"), *(package / "modalities").glob("*.py")]:  # encoders live in both
        if path.name == "parallelize.py":  # the TP plan: applied from outside, imports distributed's layers
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert not any(part in name.split(".") for part in ("train", "profiling", "distributed", "deepspeed")), \
                    (path.name, name)
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "deepspeed" for a in node.names), path.name
            if isinstance(node, ast.ImportFrom) and node.module == "config":  # the model-only section, not Config
                assert path.parent.name == "modalities" or \
                    {a.name for a in node.names} <= {"ModelSpec", "ModelConfig", "DecoderConfig"}, path.name


def test_the_model_reads_only_its_config_section():
    """A ModelSpec without data/train/parallel keys builds the same model as the full Config's."""
    from d2v2scale.config import ModelSpec

    cfg = load_config("tiny_image")
    spec = cfg.model_spec()
    assert set(spec.__dataclass_fields__) == {"model", "decoder", "masking", "teacher"}
    torch.manual_seed(0)
    a = Data2Vec2(spec)
    torch.manual_seed(0)
    b = Data2Vec2(ModelSpec(cfg.model, cfg.decoder, cfg.masking, cfg.teacher))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not hasattr(a.cfg, "train") and not hasattr(a.cfg, "data")


def test_a_bound_ema_update_lerps_views_and_allocates_nothing():
    """build_teacher binds the student once: every update lerps the same views of the student's own
    parameter storage into views of the masters (no per-step buffers, no copies)."""
    cfg = load_config("tiny_image")
    model = Data2Vec2(cfg.model_spec())
    teacher = build_teacher(model, cfg)
    targets, sources = teacher.pairs()
    assert teacher.pairs()[1] is sources
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(s.untyped_storage().data_ptr() in storages for s in sources)
    masters = {m.untyped_storage().data_ptr() for m in teacher.masters}
    assert all(t.untyped_storage().data_ptr() in masters for t in targets)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    expected = [t.clone().lerp_(s, 1 - teacher.decay(1)) for t, s in zip(targets, sources)]
    teacher.update(1)
    assert all(torch.equal(t, e) for t, e in zip(teacher.pairs()[0], expected))


def _per_layer_teacher(model, cfg):
    """fairseq's loop, one layer at a time (F.instance_norm / F.layer_norm per layer, a running sum,
    a division; moments as plain sums per layer): the formulation the stacked one replaced."""
    m = cfg.model

    def output(teacher, source, local, valid, lengths):
        layers = model.teacher_layers(teacher, source, local, valid, lengths)
        layers = [y.float() for y in layers[-m.average_top_k_layers:]]
        acc = 0
        for y in layers:
            if m.instance_norm_target_layer:
                y = torch.nn.functional.instance_norm(y.transpose(1, 2), eps=1e-5).transpose(1, 2)
            elif m.layer_norm_target_layer:
                y = torch.nn.functional.layer_norm(y, y.shape[-1:], eps=1e-5)
            acc = acc + y
        y = acc / len(layers)
        if m.layer_norm_targets:
            y = torch.nn.functional.layer_norm(y, y.shape[-1:], eps=1e-5)
        if m.instance_norm_targets:
            y = torch.nn.functional.instance_norm(y.transpose(1, 2), eps=1e-5).transpose(1, 2)
        moments = torch.stack([torch.stack([torch.full((z.shape[-1],), z[..., 0].numel(), dtype=torch.float64),
                                            z.double().sum((0, 1)), (z.double() ** 2).sum((0, 1))]) for z in layers])
        return Targets(y, moments)
    return output


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_the_stacked_targets_give_the_per_layer_step(preset):
    """The teacher's K layers normalised and averaged as one (K, B, T, D) tensor: the step's losses
    and layer moments equal those of the per-layer loop (fp32; 1e-5, summation order only)."""
    cfg, model, teacher = _model(preset)
    model.train()
    source = synthetic_batch(cfg, 3, torch.Generator().manual_seed(2))
    mask = model.make_mask(0, 0, torch.arange(3), source)
    with torch.no_grad():
        torch.manual_seed(3)  # the same decoder-input noise for both
        ours = model(source, model.teacher_fn(teacher.module), mask)
        torch.manual_seed(3)
        theirs = model(source, functools.partial(_per_layer_teacher(model, cfg), teacher.module), mask)
    assert ours.loss_reg.item() == pytest.approx(theirs.loss_reg.item(), rel=1e-5)
    assert normalize_loss(ours).item() == pytest.approx(normalize_loss(theirs).item(), rel=1e-5)
    torch.testing.assert_close(ours.layer_moments, theirs.layer_moments, rtol=1e-5, atol=1e-3)
    assert ours.layer_moments.shape == (cfg.model.average_top_k_layers, 3, cfg.model.embed_dim)
