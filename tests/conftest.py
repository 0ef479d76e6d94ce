"""Shared test setup."""

from pathlib import Path

import pytest
from hypothesis import settings

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
