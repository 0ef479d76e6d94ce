"""The one error type of media decoding, shared by audio and video."""

from __future__ import annotations

from pathlib import Path


class DecodeError(ValueError):
    """A media file that cannot be used: its message names the file and what is wrong.

    The published loaders replace such a clip with a constant tensor and carry on; here it is
    always an error, so a broken file is found, not trained on.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        # Both values go to ``args`` so the exception pickles (DataLoader workers re-raise it).
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
