"""Launching training processes: local ranks through the deepspeed launcher, supervised as
one process group (streamed output, whole-group kill on cancellation, wall-clock limit); and,
inside a launched rank, joining its process group (``distributed``)."""
