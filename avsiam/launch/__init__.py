"""Launching training processes: local ranks started directly (or through DeepSpeed's or
torch's launcher), supervised as one unit (streamed output, the first failure's status, every
process group killed on cancellation, wall-clock limit); and, inside a launched rank,
joining its process group (``distributed``)."""
