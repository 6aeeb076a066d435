"""Published presets reproduce the reference parameter counts (student / EMA teacher) within 0.1 %."""
import pytest
import torch

from d2v2scale.config import load_config
from d2v2scale.model import Data2Vec2

REFERENCE_M = {
    "vit_b": (88.38, 85.80),
    "vit_l": (309.27, 303.30),
    "vit_h": (637.56, 630.92),
    "audio_base": (93.78, 88.56),
    "audio_large": (315.18, 308.54),
    "text_base": (152.96, 85.05),
}


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("preset", sorted(REFERENCE_M))
def test_parameter_counts(preset):
    cfg = load_config(preset)
    with torch.device("meta"):
        model = Data2Vec2(cfg.model_spec())
        teacher = model.teacher_copy()
    student_ref, teacher_ref = REFERENCE_M[preset]
    # The reference table is rounded to 0.01 M; allow that on top of the 0.1 % tolerance.
    assert abs(_count(model) - student_ref) <= 0.001 * student_ref + 0.005, _count(model)
    assert abs(_count(teacher) - teacher_ref) <= 0.001 * teacher_ref + 0.005, _count(teacher)
    assert not any(n.startswith("decoder.") for n, _ in teacher.named_parameters())
