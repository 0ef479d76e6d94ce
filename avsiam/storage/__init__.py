"""Object storage: S3 (or an S3-compatible endpoint) for datasets, checkpoints and caches."""
