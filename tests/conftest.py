"""Shared test setup."""

from pathlib import Path

import pytest
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


def _stage(raw, out, label_files, classes=None):
    from avsiam.data.staging import stage_dataset

    stage_dataset(label_files, out, videos_dir=raw / "videos", classes_csv=classes, workers=2, progress=False)
    return out / "manifest.json"


@pytest.fixture(scope="session")
def synthetic_single(tmp_path_factory):
    """A small single-label synthetic dataset in the VGGSound layout (4 classes, 40 clips)."""
    from avsiam.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "single", 4, 40, seed=1, workers=2, progress=False)


@pytest.fixture(scope="session")
def synthetic_multi(tmp_path_factory):
    """A small multi-label synthetic dataset in the AudioSet layout (5 classes, 40 clips)."""
    from avsiam.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "multi", 5, 40, multi_label=True, seed=2, workers=2, progress=False)


@pytest.fixture(scope="session")
def staged_single(synthetic_single, tmp_path_factory) -> Path:
    """manifest.json of ``synthetic_single`` staged."""
    return _stage(synthetic_single.root, tmp_path_factory.mktemp("staged") / "single", [synthetic_single.labels_csv])


@pytest.fixture(scope="session")
def staged_multi(synthetic_multi, tmp_path_factory) -> Path:
    """manifest.json of ``synthetic_multi`` staged (train and eval segments)."""
    ds = synthetic_multi
    return _stage(ds.root, tmp_path_factory.mktemp("staged") / "multi", [ds.train_segments_csv, ds.eval_segments_csv], ds.class_labels_indices_csv)
