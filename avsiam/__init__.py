"""avsiam: the production training workflow for AVSiam (Siamese ViTs as audio-visual learners)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("avsiam")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
