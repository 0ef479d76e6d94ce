"""Label/datafile readers: real examples parse; malformed input names file, entry and problem."""

import json

import pytest

from avsiam.data.formats import (
    ClassIndex,
    FormatError,
    class_labels_csv,
    read_audioset_segments,
    read_cavmae_datafile,
    read_class_labels,
    read_vggsound_csv,
    sniff_label_format,
)


def test_real_audioset_class_index(real_data):
    classes = read_class_labels(real_data / "class_labels_indices_as.csv")
    assert len(classes) == 527
    assert classes.mids[0] == "/m/09x0r" and classes.names[0] == "Speech"
    assert classes.names[1] == "Male speech, man speaking"


def test_real_cavmae_datafile(real_data):
    entries = read_cavmae_datafile(real_data / "sample_json_as.json")
    classes = read_class_labels(real_data / "class_labels_indices_as.csv")
    assert entries[0].video_id == "--4gqARaEJE"
    assert entries[0].labels == ("/m/068hy", "/m/07q6cd_", "/m/0bt9lr", "/m/0jbk")
    assert str(entries[0].frame_paths()[3]).endswith("image_mulframe/frame_3/--4gqARaEJE.jpg")
    for e in entries:  # every label of the sample resolves against the real class index
        classes.indices(e.labels, e.video_id)
    assert sniff_label_format(real_data / "sample_json_as.json") == "cavmae"


def test_class_index_round_trip_and_multi_hot_lookup(tmp_path):
    classes = ClassIndex(("/m/a", "/m/b", "/m/c"), ("A, quoted", "B", "C"))
    (tmp_path / "c.csv").write_text(class_labels_csv(classes))
    assert read_class_labels(tmp_path / "c.csv") == classes
    assert classes.indices(["/m/c", "/m/a"], "x") == [2, 0]
    with pytest.raises(FormatError, match="clip7: unknown label id '/m/zz'"):
        classes.indices(["/m/zz"], "clip7")


@pytest.mark.parametrize(("text", "expected"), [
    ("index,mid\n0,/m/a\n", "expected the header index,mid,display_name"),
    ("index,mid,display_name\n1,/m/a,A\n", "line 2: index '1' should be 0"),
    ("index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n", "line 3: duplicate mid '/m/a'"),
    ("index,mid,display_name\n0,/m/a\n", "line 2: expected 3 fields"),
    ("index,mid,display_name\n", "no classes"),
])
def test_bad_class_csv(tmp_path, text, expected):
    path = tmp_path / "classes.csv"
    path.write_text(text)
    with pytest.raises(FormatError, match=f"classes.csv: {expected}"):
        read_class_labels(path)


def _datafile(tmp_path, data):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": data}) if not isinstance(data, str) else data)
    return path


ENTRY = {"video_id": "abc", "wav": "/x/abc.flac", "video_path": "/x/frames/", "labels": "/m/a"}


@pytest.mark.parametrize(("data", "expected"), [
    ("{not json", "invalid JSON at line 1"),
    ('{"items": []}', 'expected an object {"data": \\[...\\]}'),
    ([ENTRY, ENTRY], r"data\[1\] \(video_id 'abc'\): duplicate video_id \(first at data\[0\]\)"),
    ([{**ENTRY, "labels": " , "}], r"data\[0\] \(video_id 'abc'\): empty label list"),
    ([{k: v for k, v in ENTRY.items() if k != "wav"}], r"data\[0\]: missing field\(s\) wav"),
    ([{**ENTRY, "labels": ["/m/a"]}], r"data\[0\]: field\(s\) labels must be strings"),
    ([], "the datafile lists no clips"),
])
def test_bad_cavmae_datafile(tmp_path, data, expected):
    with pytest.raises(FormatError, match=expected):
        read_cavmae_datafile(_datafile(tmp_path, data))


def test_cavmae_datafile_missing_files_are_named(tmp_path):
    path = _datafile(tmp_path, [{**ENTRY, "wav": str(tmp_path / "abc.wav")}])
    read_cavmae_datafile(path)  # paths are only checked on request
    with pytest.raises(FormatError, match=r"data\[0\] \(video_id 'abc'\): missing file .*abc.wav"):
        read_cavmae_datafile(path, check_files=True)


def test_vggsound_csv(tmp_path):
    path = tmp_path / "vggsound.csv"
    path.write_text("---g-f_I2yQ,1,people marching,test\nKlsG1EnBEjc,361,\"dog barking, growling\",train\n")
    rows = read_vggsound_csv(path)
    assert rows[0].vggsound_filename() == "---g-f_I2yQ_000001.mp4" and rows[0].split == "test"
    assert rows[1].labels == ("dog barking, growling",) and rows[1].vggsound_filename() == "KlsG1EnBEjc_000361.mp4"
    assert sniff_label_format(path) == "vggsound"


@pytest.mark.parametrize(("text", "expected"), [
    ("a,1,dog\n", "line 1: expected 4 fields"),
    ("a,1,dog,holdout\n", "line 1: split 'holdout' is not one of train, val, test"),
    ("a,x,dog,train\n", "line 1: start/end seconds 'x' is not a number"),
    ("a,1,dog,train\na,1,cat,test\n", "line 2: duplicate clip"),
    ("a,1,,train\n", "line 1: empty label"),
])
def test_bad_vggsound_csv(tmp_path, text, expected):
    path = tmp_path / "vgg.csv"
    path.write_text(text)
    with pytest.raises(FormatError, match=f"vgg.csv: {expected}"):
        read_vggsound_csv(path)


AUDIOSET = """# Segments csv created Sun Mar  5 10:54:25 2017
# num_ytids=2, num_segs=2, num_unique_labels=3, num_positive_labels=3
# YTID, start_seconds, end_seconds, positive_labels
00W1lcxW-WU, 40.000, 50.000, "/m/09x0r,/m/05zppz"
--PJHxphWEs, 30.000, 40.000, "/m/0jbk"
"""


def test_audioset_segments(tmp_path):
    path = tmp_path / "balanced_train_segments.csv"
    path.write_text(AUDIOSET)
    rows = read_audioset_segments(path)
    assert rows[0].audioset_filename() == "00W1lcxW-WU_40.000.mp4"
    assert rows[0].labels == ("/m/09x0r", "/m/05zppz") and rows[1].labels == ("/m/0jbk",)
    assert sniff_label_format(path) == "audioset"


@pytest.mark.parametrize(("row", "expected"), [
    ('x, 40.000, 30.000, "/m/a"', "line 4: end_seconds 30.000 is not after start_seconds 40.000"),
    ('x, 40.000, 50.000, ""', "line 4: empty label list"),
    ("x, 40.000, 50.000", "line 4: expected 4 fields"),
])
def test_bad_audioset_segments(tmp_path, row, expected):
    path = tmp_path / "segments.csv"
    path.write_text("\n".join(AUDIOSET.splitlines()[:3] + [row]) + "\n")
    with pytest.raises(FormatError, match=f"segments.csv: {expected}"):
        read_audioset_segments(path)


BOM = "\ufeff"


@pytest.mark.parametrize("header", ["", "youtube_id,start_seconds,label,split\r\n", "# YTID,start,label,split\r\n"])
def test_vggsound_csv_saved_by_excel_with_bom_crlf_and_header(tmp_path, header):
    # Excel's "CSV UTF-8" writes a byte-order mark and CRLF line ends; re-saved copies often
    # gain a header line.
    path = tmp_path / "vggsound.csv"
    path.write_bytes((BOM + header + "2ogRTCEBL0p,469,dog barking,train\r\nx_y-z,3,cat,test\r\n").encode())
    rows = read_vggsound_csv(path)
    assert [r.youtube_id for r in rows] == ["2ogRTCEBL0p", "x_y-z"]
    assert rows[0].line == (2 if header else 1) and rows[0].split == "train"
    assert sniff_label_format(path) == "vggsound"


def test_audioset_segments_and_class_list_with_bom_are_read_as_audioset(tmp_path):
    path = tmp_path / "balanced_train_segments.csv"
    path.write_bytes((BOM + AUDIOSET).encode())
    assert sniff_label_format(path) == "audioset"
    assert read_audioset_segments(path)[0].youtube_id == "00W1lcxW-WU"
    classes = tmp_path / "class_labels_indices.csv"
    classes.write_bytes((BOM + "index,mid,display_name\n0,/m/a,A\n").encode())
    assert read_class_labels(classes).mids == ("/m/a",)


def test_cavmae_datafile_with_bom(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes((BOM + json.dumps({"data": [{"video_id": "a", "wav": "a.wav", "video_path": "f", "labels": "/m/x"}]})).encode())
    assert read_cavmae_datafile(path)[0].video_id == "a"


def test_label_file_in_a_legacy_code_page_names_the_line(tmp_path):
    path = tmp_path / "vgg.csv"
    path.write_bytes("a,1,dog,train\nb,2,caf\xe9,train\n".encode("latin-1"))
    with pytest.raises(FormatError, match=r"vgg.csv: line 2: byte 0xe9 is not UTF-8"):
        read_vggsound_csv(path)
