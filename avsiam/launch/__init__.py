"""Launching training processes: local ranks through the deepspeed launcher, supervised as
one process group (streamed output, whole-group kill on cancellation, wall-clock limit)."""
