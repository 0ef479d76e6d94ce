"""Dataset sources: a local folder in place, or an S3 prefix fetched with only the named clips."""

import os

import pytest

from avsiam.data.sources import SourceError, materialize_source, source_fingerprint
from avsiam.data.staging import plan_clips
from avsiam.storage.s3 import s3_client

BUCKET = "avsiam-data"
VGGSOUND_ROWS = "abc,10,dog barking,train\ndef,0,cat meowing,train\nghi,30,dog barking,test\n"
VGGSOUND_CLIPS = ["abc_000010.mp4", "def_000000.mp4", "ghi_000030.mp4"]
AUDIOSET_SEGMENTS = (
    "# YTID, start_seconds, end_seconds, positive_labels\n"
    'abc, 10.000, 20.000, "/m/dog"\n'
    'xyz, 2.500, 12.500, "/m/cat,/m/dog"\n'
)
AUDIOSET_CLASSES = "index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat,Cat\n"


def _fake_clip(name: str) -> bytes:
    """Bytes standing in for an mp4: nothing here decodes them."""
    return f"not really an mp4: {name}".encode() + os.urandom(64)


def _local_vggsound(root):
    (root / "videos").mkdir(parents=True)
    (root / "labels.csv").write_text(VGGSOUND_ROWS)
    for name in VGGSOUND_CLIPS:
        (root / "videos" / name).write_bytes(_fake_clip(name))
    return root


def _put_tree(client, prefix: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)


@pytest.fixture
def bucket(s3_env):
    client = s3_client()
    client.create_bucket(Bucket=BUCKET)
    return client


def test_local_folder_is_checked_and_used_in_place(tmp_path):
    root = _local_vggsound(tmp_path / "vggsound")
    local = materialize_source(str(root), tmp_path / "work", label_files=["labels.csv"], classes_csv=None)
    assert (local.root, local.videos_dir, local.classes_csv) == (root, root / "videos", None)
    assert local.label_files == [root / "labels.csv"]
    assert not (tmp_path / "work").exists()


def test_local_folder_problems_name_the_folder_and_file(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        materialize_source(str(tmp_path / "nowhere"), tmp_path, label_files=["labels.csv"], classes_csv=None)
    root = _local_vggsound(tmp_path / "vggsound")
    with pytest.raises(SourceError, match=f"{root} has no train.csv"):
        materialize_source(str(root), tmp_path, label_files=["train.csv"], classes_csv=None)
    with pytest.raises(SourceError, match="has no class_labels_indices.csv"):
        materialize_source(str(root), tmp_path, label_files=["labels.csv"], classes_csv="class_labels_indices.csv")
    for clip in (root / "videos").iterdir():
        clip.unlink()
    (root / "videos").rmdir()
    with pytest.raises(SourceError, match="csv label files name clips"):
        materialize_source(str(root), tmp_path, label_files=["labels.csv"], classes_csv=None)


def test_a_cavmae_datafile_needs_no_videos_folder(tmp_path):
    (tmp_path / "train.json").write_text('{"data": []}')
    (tmp_path / "classes.csv").write_text(AUDIOSET_CLASSES)
    local = materialize_source(str(tmp_path), tmp_path / "work", label_files=["train.json"], classes_csv="classes.csv")
    assert local.videos_dir is None and local.classes_csv == tmp_path / "classes.csv"


def test_s3_vggsound_prefix_fetches_only_the_named_clips(bucket, tmp_path):
    clips = {f"videos/{name}": _fake_clip(name) for name in VGGSOUND_CLIPS[:2]}  # ghi_000030 was never downloaded
    _put_tree(bucket, "datasets/vggsound", {"labels.csv": VGGSOUND_ROWS.encode(), **clips,
                                            "videos/unlisted_000001.mp4": b"x", "notes.txt": b"y"})
    work = tmp_path / "work"
    local = materialize_source(f"s3://{BUCKET}/datasets/vggsound/", work, label_files=["labels.csv"], classes_csv=None, workers=2)

    assert local.root == work.resolve() and local.label_files == [work.resolve() / "labels.csv"]
    assert sorted(p.name for p in local.videos_dir.iterdir()) == VGGSOUND_CLIPS[:2]
    assert all((local.root / rel).read_bytes() == data for rel, data in clips.items())
    _, _, planned = plan_clips(local.videos_dir, local.label_files, local.classes_csv)
    assert [os.path.exists(c.video) for c in planned] == [True, True, False]  # staging quarantines the third

    stamps = {p.name: p.stat().st_mtime_ns for p in local.videos_dir.iterdir()}
    again = materialize_source(f"s3://{BUCKET}/datasets/vggsound", work, label_files=["labels.csv"], classes_csv=None, workers=2)
    assert {p.name: p.stat().st_mtime_ns for p in again.videos_dir.iterdir()} == stamps  # resumed: nothing re-fetched


def test_s3_audioset_prefix_uses_audioset_clip_names(bucket, tmp_path):
    names = ["abc_10.000.mp4", "xyz_2.500.mp4"]
    _put_tree(bucket, "as", {"meta/balanced_train_segments.csv": AUDIOSET_SEGMENTS.encode(),
                             "meta/class_labels_indices.csv": AUDIOSET_CLASSES.encode(),
                             **{f"videos/{name}": _fake_clip(name) for name in names}})
    local = materialize_source(f"s3://{BUCKET}/as", tmp_path, label_files=["meta/balanced_train_segments.csv"],
                               classes_csv="meta/class_labels_indices.csv", workers=2)
    assert sorted(p.name for p in local.videos_dir.iterdir()) == names
    assert local.classes_csv.read_text() == AUDIOSET_CLASSES


def test_s3_missing_label_file_names_the_uri(bucket, tmp_path):
    _put_tree(bucket, "ds", {"videos/abc_000010.mp4": b"x"})
    with pytest.raises(SourceError, match=f"label file s3://{BUCKET}/ds/labels.csv does not exist"):
        materialize_source(f"s3://{BUCKET}/ds", tmp_path, label_files=["labels.csv"], classes_csv=None)
    with pytest.raises(SourceError, match="must be a path relative to"):
        materialize_source(f"s3://{BUCKET}/ds", tmp_path, label_files=["../labels.csv"], classes_csv=None)


def test_local_fingerprint_follows_labels_and_clips(tmp_path):
    root = _local_vggsound(tmp_path / "vggsound")
    (root / "unrelated.txt").write_text("a")

    def digest():
        return source_fingerprint(str(root), ["labels.csv"], None)

    before = digest()
    (root / "unrelated.txt").write_text("changed")
    assert digest() == before
    (root / "videos" / "new_000001.mp4").write_bytes(b"new clip")
    with_clip = digest()
    assert with_clip != before
    (root / "labels.csv").write_text(VGGSOUND_ROWS + "new,1,cat meowing,train\n")
    assert digest() != with_clip


def test_s3_fingerprint_follows_labels_and_clips(bucket):
    _put_tree(bucket, "ds", {"labels.csv": VGGSOUND_ROWS.encode(), "videos/abc_000010.mp4": b"1"})
    uri = f"s3://{BUCKET}/ds"
    before = source_fingerprint(uri, ["labels.csv"], None)
    _put_tree(bucket, "ds", {"notes.txt": b"unrelated"})
    assert source_fingerprint(uri, ["labels.csv"], None) == before
    _put_tree(bucket, "ds", {"videos/abc_000010.mp4": b"2"})
    assert source_fingerprint(uri, ["labels.csv"], None) != before
