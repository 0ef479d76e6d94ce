"""Dataset sources: a local folder in place, or an S3 prefix whose label files alone are fetched."""

import os

import pytest

from avsiam.data.sources import SourceError, local_copy, resolve_source, source_fingerprint
from avsiam.data.staging import plan_clips, with_identities
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
    local = resolve_source(str(root), tmp_path / "work", label_files=["labels.csv"], classes_csv=None)
    assert (local.videos, local.classes_csv) == (str(root / "videos"), None)
    assert local.label_files == [root / "labels.csv"]
    assert not (tmp_path / "work").exists()


def test_local_folder_problems_name_the_folder_and_file(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "nowhere"), tmp_path, label_files=["labels.csv"], classes_csv=None)
    root = _local_vggsound(tmp_path / "vggsound")
    with pytest.raises(SourceError, match=f"{root} has no train.csv"):
        resolve_source(str(root), tmp_path, label_files=["train.csv"], classes_csv=None)
    with pytest.raises(SourceError, match="has no class_labels_indices.csv"):
        resolve_source(str(root), tmp_path, label_files=["labels.csv"], classes_csv="class_labels_indices.csv")
    for clip in (root / "videos").iterdir():
        clip.unlink()
    (root / "videos").rmdir()
    with pytest.raises(SourceError, match="csv label files name clips"):
        resolve_source(str(root), tmp_path, label_files=["labels.csv"], classes_csv=None)


def test_a_cavmae_datafile_needs_no_videos_folder(tmp_path):
    (tmp_path / "train.json").write_text('{"data": []}')
    (tmp_path / "classes.csv").write_text(AUDIOSET_CLASSES)
    local = resolve_source(str(tmp_path), tmp_path / "work", label_files=["train.json"], classes_csv="classes.csv")
    assert local.videos is None and local.classes_csv == tmp_path / "classes.csv"


def test_s3_prefix_fetches_the_label_files_and_leaves_the_clips_in_s3(bucket, tmp_path):
    clips = {f"videos/{name}": _fake_clip(name) for name in VGGSOUND_CLIPS[:2]}  # ghi_000030 was never downloaded
    _put_tree(bucket, "datasets/vggsound", {"labels.csv": VGGSOUND_ROWS.encode(), **clips, "notes.txt": b"y"})
    work = tmp_path / "work"
    layout = resolve_source(f"s3://{BUCKET}/datasets/vggsound/", work, label_files=["labels.csv"], classes_csv=None)
    assert layout.videos == f"s3://{BUCKET}/datasets/vggsound/videos"
    assert layout.label_files == [work / "labels.csv"] and (work / "labels.csv").read_text() == VGGSOUND_ROWS
    assert sorted(p.name for p in work.rglob("*")) == ["labels.csv"]  # no clip was downloaded
    _, _, planned = plan_clips(layout.videos, layout.label_files, layout.classes_csv)
    assert [c.video for c in planned] == [f"{layout.videos}/{name}" for name in VGGSOUND_CLIPS]
    # One listing gives each clip its identity (ETag and size); the absent one is missing.
    identities = [c.identity for c in with_identities(planned, layout.videos)]
    assert identities[0].startswith("etag:") and identities[0].endswith(f":{len(clips['videos/abc_000010.mp4'])}")
    assert identities[2] is None


def test_s3_audioset_prefix_uses_audioset_clip_names(bucket, tmp_path):
    names = ["abc_10.000.mp4", "xyz_2.500.mp4"]
    _put_tree(bucket, "as", {"meta/balanced_train_segments.csv": AUDIOSET_SEGMENTS.encode(),
                             "meta/class_labels_indices.csv": AUDIOSET_CLASSES.encode(),
                             **{f"videos/{name}": _fake_clip(name) for name in names}})
    layout = resolve_source(f"s3://{BUCKET}/as", tmp_path, label_files=["meta/balanced_train_segments.csv"],
                            classes_csv="meta/class_labels_indices.csv")
    _, _, planned = plan_clips(layout.videos, layout.label_files, layout.classes_csv)
    assert [c.video.rsplit("/", 1)[1] for c in planned] == names
    assert layout.classes_csv.read_text() == AUDIOSET_CLASSES


def test_local_copy_of_a_path_or_an_object(bucket, tmp_path):
    assert local_copy(tmp_path / "x.csv", tmp_path / "work") == tmp_path / "x.csv"
    _put_tree(bucket, "meta", {"labels.csv": b"a,1,b,train\n"})
    assert local_copy(f"s3://{BUCKET}/meta/labels.csv", tmp_path).read_bytes() == b"a,1,b,train\n"
    with pytest.raises(SourceError, match="does not exist"):
        local_copy(f"s3://{BUCKET}/meta/absent.csv", tmp_path)


def test_s3_missing_label_file_names_the_uri(bucket, tmp_path):
    _put_tree(bucket, "ds", {"videos/abc_000010.mp4": b"x"})
    with pytest.raises(SourceError, match=f"label file s3://{BUCKET}/ds/labels.csv does not exist"):
        resolve_source(f"s3://{BUCKET}/ds", tmp_path, label_files=["labels.csv"], classes_csv=None)
    with pytest.raises(SourceError, match="must be a path relative to"):
        resolve_source(f"s3://{BUCKET}/ds", tmp_path, label_files=["../labels.csv"], classes_csv=None)


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
