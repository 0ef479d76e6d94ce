"""Shared test setup."""

from pathlib import Path

import pytest
from helpers import stage_synthetic
from hypothesis import settings
from s3_fixtures import moto_server, s3_env  # noqa: F401  (moto S3 server for the storage tests)

# Test timings on a shared 2-core machine vary too much for per-example deadlines.
settings.register_profile("avsiam", deadline=None, max_examples=60)
settings.load_profile("avsiam")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real clips, label index and CAV-MAE datafile shipped beside the repository."""
    if not REAL_DATA.is_dir():
        pytest.fail(f"the real sample data is expected at {REAL_DATA} (../shared/data/real)")
    return REAL_DATA


@pytest.fixture(scope="session")
def synthetic_single(tmp_path_factory):
    """A small single-label synthetic dataset in the VGGSound layout (4 classes, 40 clips)."""
    from avsiam.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "single", 4, 40, seed=1, workers=2, progress=False)


@pytest.fixture(scope="session")
def synthetic_multi(tmp_path_factory):
    """A small multi-label synthetic dataset in the AudioSet layout (5 classes, 40 clips)."""
    from avsiam.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "multi", 5, 40, multi_label=True, seed=2, workers=2, progress=False)


@pytest.fixture(scope="session")
def staged_single(synthetic_single, tmp_path_factory) -> Path:
    """``synthetic_single`` staged (its folder)."""
    return stage_synthetic(synthetic_single, tmp_path_factory.mktemp("staged") / "single")


@pytest.fixture(scope="session")
def staged_multi(synthetic_multi, tmp_path_factory) -> Path:
    """``synthetic_multi`` staged (train and eval segments; its folder)."""
    return stage_synthetic(synthetic_multi, tmp_path_factory.mktemp("staged") / "multi")
