"""The modalities d2v2scale ships, one module each; importing this package registers them
(:mod:`d2v2scale.modality_registry` is what a modality is and the registry)."""
from . import audio, image, text

__all__ = ["audio", "image", "text"]
