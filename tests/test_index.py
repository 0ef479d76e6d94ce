"""The dataset index: it validates what it lists, its digest tracks the shards, and the start-up
check finds a missing or truncated shard by its name without looking at a single clip."""

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from avsiam.data.formats import FormatError
from avsiam.data.index import load_index


@pytest.fixture
def staged_copy(staged_single, tmp_path):
    root = tmp_path / "staged"
    shutil.copytree(staged_single, root)
    return root


def _edit_table(root, change):
    """Rewrite the clip table with ``change(columns)`` applied, keeping index.json consistent."""
    doc = json.loads((root / "index.json").read_text())
    path = root / doc["clips_table"]
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    change(columns)
    edited = pa.table({"id": pa.array(columns["id"], pa.string()), "split": pa.array(columns["split"], pa.int8()),
                       "labels": pa.array(columns["labels"], pa.list_(pa.int32())),
                       "shard": pa.array(columns["shard"], pa.int32()), "offset": pa.array(columns["offset"], pa.int64()),
                       "size": pa.array(columns["size"], pa.int32())})
    with pa.ipc.new_file(str(path), edited.schema) as writer:
        writer.write_table(edited)
    doc["clips_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "index.json").write_text(json.dumps(doc))


def test_index_loads_as_arrays_and_locations_of_every_form(staged_single):
    index = load_index(staged_single)
    assert isinstance(index.clips.split, np.ndarray) and index.clips.offset.dtype == np.int64
    assert len(index.clips.ids) == len(index.clips) == sum(s.num_samples for s in index.shards)
    assert load_index(staged_single / "index.json").dataset_digest == index.dataset_digest
    assert load_index(str(staged_single) + "/").dataset_digest == index.dataset_digest


def test_staging_never_writes_an_index_with_duplicate_ids(staged_single, tmp_path):
    from dataclasses import replace

    from avsiam.data.index import write_index
    from avsiam.storage.store import LocalStore

    index = load_index(staged_single)
    ids = index.clips.ids.to_pylist()
    clips = replace(index.clips, ids=pa.array([ids[0], *ids[1:-1], ids[0]], pa.string()))
    with pytest.raises(FormatError, match=f"index.json: clip '{ids[0]}': duplicate id"):
        write_index(LocalStore(tmp_path), index.classes, index.multi_label, index.shards, clips, {})


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c["labels"].__setitem__(0, [99]), "clip '.*': label index out of range"),
    (lambda c: c["labels"].__setitem__(0, []), "clip '.*': empty label list"),
    (lambda c: c["labels"].__setitem__(0, [0, 1]), "clip '.*': a single-label dataset needs exactly one label"),
    (lambda c: c["split"].__setitem__(0, 7), "clip '.*': split code is not one of train, val, test"),
    (lambda c: c["shard"].__setitem__(0, 99), "clip '.*': names a shard the index does not list"),
    (lambda c: [c[k].pop() for k in list(c)], r"shard val-\d+-\w+.tar holds 4 samples, the clip table puts 3 in it"),
])
def test_a_bad_clip_table_names_the_clip(staged_copy, change, expected):
    _edit_table(staged_copy, change)
    with pytest.raises(FormatError, match=f"index.json: {expected}"):
        load_index(staged_copy)


def test_hand_edits_are_caught(staged_copy):
    doc = json.loads((staged_copy / "index.json").read_text())
    table = staged_copy / doc["clips_table"]
    table.write_bytes(table.read_bytes()[:-1] + b"X")
    with pytest.raises(FormatError, match="does not match its recorded sha256"):
        load_index(staged_copy)
    doc["shards"][0]["sha256"] = "0" * 64
    (staged_copy / "index.json").write_text(json.dumps(doc))
    table.unlink()
    with pytest.raises(FormatError, match="clip table .* is missing"):
        load_index(staged_copy)
    (staged_copy / "index.json").write_text("{}")
    with pytest.raises(FormatError, match="not an avsiam dataset index"):
        load_index(staged_copy)


def test_a_digest_that_does_not_match_the_shards_is_refused(staged_copy):
    doc = json.loads((staged_copy / "index.json").read_text())
    doc["shards"][0]["sha256"] = "0" * 64
    (staged_copy / "index.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="dataset_digest does not match the shards it lists"):
        load_index(staged_copy)


def test_an_old_per_file_dataset_or_no_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FormatError, match="index.json does not exist: stage the dataset"):
        load_index(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FormatError, match="old one-file-per-clip layout .* stage it again"):
        load_index(tmp_path)


def test_start_up_check_names_a_missing_or_truncated_shard(staged_copy):
    index = load_index(staged_copy)
    index.check_shards()
    first, second = (staged_copy / s.path for s in index.shards[:2])
    intact = first.read_bytes()
    first.write_bytes(intact[:-512])
    with pytest.raises(FormatError, match=f"shard {first} has {index.shards[0].bytes - 512} bytes, the index records"):
        index.check_shards()
    first.write_bytes(intact)
    second.unlink()
    with pytest.raises(FormatError, match=f"shard {second} is missing"):
        index.check_shards()
