"""The training loop, DeepSpeed configuration and checkpoints."""
