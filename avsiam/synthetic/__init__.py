"""Synthetic audio-visual data for the demo, the tests and the benchmarks: clips and label files
in the official VGGSound / AudioSet layouts that the real-data path stages unchanged
(``dataset.py``). Nothing in training or evaluation imports it."""

from avsiam.synthetic.dataset import SyntheticDataset, generate_synthetic_dataset

__all__ = ["SyntheticDataset", "generate_synthetic_dataset"]
