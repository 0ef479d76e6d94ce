"""Audio-visual data: formats, decoding, datasets, staging."""
