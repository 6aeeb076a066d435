"""The training loop: backends, the EMA teacher, checkpoints, recovery and the in-run bookkeeping."""
