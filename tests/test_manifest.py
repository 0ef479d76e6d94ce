"""The manifest validates what it lists and its digest tracks clips and labels."""

import json

import pytest

from avsiam.data.formats import FormatError
from avsiam.data.manifest import load_manifest


def _edit(staged, tmp_path, change):
    doc = json.loads(staged.read_text())
    change(doc)
    doc.pop("dataset_digest")
    path = staged.parent / "edited.json"
    path.write_text(json.dumps(doc))
    return path


def test_digest_changes_with_labels_and_clips(staged_single, tmp_path):
    m = load_manifest(staged_single)
    relabelled = _edit(staged_single, tmp_path, lambda d: d["clips"][0].update(labels=[d["classes"][1]["mid"] if d["clips"][0]["labels"][0] != d["classes"][1]["mid"] else d["classes"][0]["mid"]]))
    assert load_manifest(relabelled).dataset_digest != m.dataset_digest
    fewer = _edit(staged_single, tmp_path, lambda d: d["clips"].pop())
    assert load_manifest(fewer).dataset_digest != m.dataset_digest
    assert load_manifest(staged_single.parent).dataset_digest == m.dataset_digest


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["clips"][1].update(id=d["clips"][0]["id"]), "duplicate id"),
    (lambda d: d["clips"][0].update(labels=["/m/unknown"]), "unknown label id '/m/unknown'"),
    (lambda d: d["clips"][0].update(labels=[]), "empty label list"),
    (lambda d: d["clips"][0].update(audio="audio/none.wav"), "missing file .*none.wav"),
    (lambda d: d["clips"][0].update(split="holdout"), "split 'holdout'"),
])
def test_bad_manifests_name_the_clip(staged_single, tmp_path, change, expected):
    with pytest.raises(FormatError, match=f"clip '.*': {expected}"):
        load_manifest(_edit(staged_single, tmp_path, change))


def test_hand_edits_are_caught_by_the_recorded_digest(staged_single, tmp_path):
    doc = json.loads(staged_single.read_text())
    doc["clips"].pop()
    path = staged_single.parent / "tampered.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="dataset_digest does not match"):
        load_manifest(path)
    path.write_text("{}")
    with pytest.raises(FormatError, match="not an avsiam manifest"):
        load_manifest(path)
