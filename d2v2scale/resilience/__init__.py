"""What keeps a long run going without a person: the per-rank hang watchdog, the job supervisor
that restarts, requeues or stops, the run's event log, and the goodput accounting built from it."""
