"""d2v2scale: data2vec 2.0 pretraining at scale (DeepSpeed ZeRO, tensor parallelism, sharded EMA teacher).

Importing the package registers the shipped modalities (as torchtitan's ``__init__`` imports its
models), so every entry point, tool and test finds them in :mod:`d2v2scale.modality_registry`.
"""
from . import modalities

__version__ = "0.1.0"
__all__ = ["modalities", "__version__"]
