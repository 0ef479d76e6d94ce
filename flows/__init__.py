"""Prefect orchestration of the avsiam pipeline: stage data -> pretrain -> finetune -> evaluate.

The library (``avsiam``) knows nothing of Prefect; this package turns its commands into
cached, resumable, tracked stages of one flow named ``avsiam``.
"""
