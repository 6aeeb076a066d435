"""Timers, FLOPs, GPU sampling and reports."""
