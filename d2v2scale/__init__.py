"""d2v2scale: data2vec 2.0 pretraining at scale (DeepSpeed ZeRO, tensor parallelism, sharded EMA teacher)."""

__version__ = "0.1.0"
