"""data2vec 2.0 model code: single-device PyTorch, no process groups; its tensor-parallel plan
(:mod:`.parallelize`) is applied to a built model from outside."""
from .data2vec2 import Data2Vec2, StepOutput, Targets, TeacherFn, cls_share, normalize_loss
from .masking import MaskGenerator, MaskInfo

__all__ = ["Data2Vec2", "StepOutput", "Targets", "TeacherFn", "cls_share", "normalize_loss", "MaskGenerator", "MaskInfo"]
