"""Support sets: building, validation, sampling, and the file format (atomic, versioned, no pickle)."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest

from napari_openseg.core import support as support_module
from napari_openseg.core.support import (
    SupportEntry,
    SupportSet,
    build_support_set,
    coverage_warning,
    entries_from_arrays,
)
from napari_openseg.errors import OpenSegError


def labelled_volume():
    """A 6-slice volume: label 1 on slices 1-2, label 2 on slice 4, label 3 on slices 2 and 5."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (6, 20, 24)).astype(np.float32)
    labels = np.zeros((6, 20, 24), np.uint8)
    labels[1, 2:6, 3:8] = 1
    labels[2, 4:9, 5:9] = 1
    labels[4, 10:15, 10:20] = 2
    labels[2, 15:18, 1:4] = 3
    labels[5, 0:2, 0:2] = 3
    return image, labels


def test_every_labelled_slice_becomes_an_entry_per_value():
    image, labels = labelled_volume()
    support = build_support_set(image, labels, source="vol")
    assert support.counts() == {1: 2, 2: 1, 3: 2}
    assert [(e.label, e.slice_index) for e in support.entries] == [(1, 1), (1, 2), (3, 2), (2, 4), (3, 5)]
    entry = support.entries[0]
    assert entry.source == "vol" and entry.axis == 0
    assert entry.image.dtype == np.float32 and 0.0 <= entry.image.min() and entry.image.max() <= 1.0
    assert np.array_equal(entry.mask, labels[1] == 1)


def test_slice_axis_label_values_and_slice_indices():
    image, labels = labelled_volume()
    along_rows = entries_from_arrays(image, labels, axis=1, label_values=[2])
    assert {e.slice_index for e in along_rows} == set(range(10, 15))
    assert all(e.image.shape == (6, 24) and e.axis == 1 for e in along_rows)
    only_two = entries_from_arrays(image, labels, slice_indices=[2])
    assert sorted(e.label for e in only_two) == [1, 3]


def test_two_dimensional_image():
    image = np.random.default_rng(1).random((30, 40))
    labels = np.zeros((30, 40), np.int32)
    labels[5:10, 5:10] = 7
    (entry,) = entries_from_arrays(image, labels)
    assert entry.label == 7 and entry.slice_index is None and entry.axis is None


def test_whole_number_float_labels_are_accepted():
    image, labels = labelled_volume()
    assert len(entries_from_arrays(image, labels.astype(np.float32))) == 5


@pytest.mark.parametrize(
    "image, labels, message",
    [
        (np.zeros(10), np.zeros(10), "expected a 2D image"),
        (np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)), "expected a 2D image"),
        (np.zeros((4, 8, 8)), np.ones((4, 8, 9), np.uint8), "do not match the image"),
        (np.zeros((8, 8)), np.full((8, 8), 0.5), "whole-number"),
        (np.zeros((8, 8)), np.full((8, 8), -1), "0 \\(background\\) or positive"),
        (np.zeros((8, 8)), np.zeros((8, 8), np.uint8), "no foreground"),
        (np.zeros((8, 8), complex), np.ones((8, 8), np.uint8), "real-valued"),
    ],
)
def test_bad_inputs_are_explained(image, labels, message):
    with pytest.raises(OpenSegError, match=message):
        entries_from_arrays(image, labels)


def test_missing_label_value_and_bad_slice_are_explained():
    image, labels = labelled_volume()
    with pytest.raises(OpenSegError, match="label value 9 does not occur"):
        entries_from_arrays(image, labels, label_values=[9])
    with pytest.raises(OpenSegError, match="outside 0..5"):
        entries_from_arrays(image, labels, slice_indices=[6])


def test_validate_names_empty_sets_and_empty_tasks():
    with pytest.raises(OpenSegError, match="support set is empty"):
        SupportSet().validate()
    empty_task = SupportSet([SupportEntry(np.zeros((4, 4), np.float32), np.zeros((4, 4), bool), 5)])
    with pytest.raises(OpenSegError, match="task 5 has no foreground"):
        empty_task.validate()
    image, labels = labelled_volume()
    with pytest.raises(OpenSegError, match="no entries for label 4"):
        build_support_set(image, labels).validate([4])


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (
            np.full((4, 4), np.nan, np.float32),
            np.ones((4, 4), bool),
            "has an image that holds NaN or infinite values",
        ),
        (np.zeros((4, 4), np.float32), np.ones((4, 5), bool), "has image (4, 4) and mask (4, 5)"),
    ],
)
def test_entries_made_by_hand_that_load_would_refuse_are_neither_saved_nor_used(
    tmp_path, image, mask, message
):
    good = SupportEntry(np.zeros((4, 4), np.float32), np.ones((4, 4), bool), 1)
    support = SupportSet([good, SupportEntry(image, mask, 2, source="script")])
    with pytest.raises(OpenSegError, match=re.escape(f"support entry 1 (label 2, from script) {message}")):
        support.save(tmp_path / "set.npz")
    assert not (tmp_path / "set.npz").exists()
    with pytest.raises(OpenSegError, match=re.escape(message)):
        support.validate()  # segmenting with it gave NaN probabilities
    assert support.validate([1]) == [1]  # the other task is still usable


def test_sampling_is_seeded_and_without_replacement():
    image, labels = labelled_volume()
    support = build_support_set(np.repeat(image, 3, axis=0), np.repeat(labels, 3, axis=0))
    first = support.sample(1, 4, np.random.default_rng(3))
    again = support.sample(1, 4, np.random.default_rng(3))
    assert [e.slice_index for e in first] == [e.slice_index for e in again]
    assert len({e.slice_index for e in first}) == 4
    assert len(support.sample(1, 100, np.random.default_rng(0))) == len(support.task(1))


def test_save_and_load_round_trip(tmp_path):
    image, labels = labelled_volume()
    support = build_support_set(image, labels, source="vol")
    support.metadata["note"] = "hand painted"
    path = support.save(tmp_path / "set.npz")
    loaded = SupportSet.load(path)
    assert loaded.counts() == support.counts() and loaded.metadata == {"note": "hand painted"}
    for a, b in zip(support.entries, loaded.entries):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        assert (a.label, a.source, a.slice_index, a.axis) == (b.label, b.source, b.slice_index, b.axis)


def test_existing_file_is_not_overwritten_without_asking(tmp_path):
    image, labels = labelled_volume()
    support = build_support_set(image, labels)
    path = support.save(tmp_path / "set.npz")
    with pytest.raises(OpenSegError, match="exists"):
        support.save(path)
    support.save(path, overwrite=True)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    image, labels = labelled_volume()
    support = build_support_set(image, labels)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(support_module.np, "savez_compressed", broken)
    with pytest.raises(OpenSegError, match=r"could not write .*set.npz \(disk full\); nothing was written"):
        support.save(tmp_path / "set.npz")
    assert os.listdir(tmp_path) == []


def test_foreign_and_damaged_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(OpenSegError, match="not a napari-openseg support-set file"):
        SupportSet.load(foreign)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(OpenSegError, match="not a readable"):
        SupportSet.load(damaged)
    with pytest.raises(OpenSegError, match="no such"):
        SupportSet.load(tmp_path / "missing.npz")


def test_newer_format_version_is_refused(tmp_path):
    meta = {"format": support_module.FORMAT_NAME, "version": 99, "entries": []}
    path = tmp_path / "future.npz"
    np.savez(path, openseg_support=np.array(json.dumps(meta)))
    with pytest.raises(OpenSegError, match="upgrade napari-openseg"):
        SupportSet.load(path)


def hand_made(path, image, label=1, metadata=None, version=None):
    meta = {
        "format": support_module.FORMAT_NAME,
        "version": support_module.FORMAT_VERSION if version is None else version,
        "entries": [{"label": label}],
        "metadata": {} if metadata is None else metadata,
    }
    np.savez(
        path, openseg_support=np.array(json.dumps(meta)), image_0=image, mask_0=np.ones(image.shape, bool)
    )
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": np.full((4, 4), np.nan, np.float32)}, "NaN or infinite"),
        ({"label": -3}, "task labels are positive"),
        ({"metadata": [1, 2]}, "metadata is not a mapping"),
        ({"version": "1"}, "no valid format version ('1')"),
    ],
)
def test_hand_made_files_with_impossible_content_are_refused(tmp_path, change, message):
    arguments = {"image": np.zeros((4, 4), np.float32), **change}
    with pytest.raises(OpenSegError, match=re.escape(message)):
        SupportSet.load(hand_made(tmp_path / "made.npz", **arguments))
    assert SupportSet.load(hand_made(tmp_path / "fine.npz", np.zeros((4, 4), np.float32))).counts() == {1: 1}


def test_a_damaged_compressed_array_is_refused(tmp_path):
    path = build_support_set(*labelled_volume()).save(tmp_path / "s.npz")
    raw = bytearray(path.read_bytes())
    for i in range(200, 600):  # flip the bytes of the first member's compressed data
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(OpenSegError, match="not a readable"):
        SupportSet.load(path)


class WritesMarker:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    # an npz whose metadata array holds a pickled object
    payload = np.empty(1, dtype=object)
    payload[0] = WritesMarker(marker)
    crafted = tmp_path / "crafted.npz"
    np.savez(crafted, openseg_support=payload)
    with pytest.raises(OpenSegError):
        SupportSet.load(crafted)
    # a bare pickle with the support-set suffix
    bare = tmp_path / "bare.npz"
    bare.write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(OpenSegError):
        SupportSet.load(bare)
    assert not marker.exists()


def test_a_file_that_is_not_an_archive_is_named_for_what_it_is(tmp_path):
    nifti = tmp_path / "scan.nii.gz"
    nifti.write_bytes(b"\x1f\x8b" + bytes(30))
    with pytest.raises(OpenSegError, match="is a NIfTI image, not a support-set file") as info:
        SupportSet.load(nifti)
    assert "pickle" not in str(info.value)
    array = tmp_path / "array.npz"
    np.save(tmp_path / "array.npy", np.zeros(3))
    array.write_bytes((tmp_path / "array.npy").read_bytes())
    with pytest.raises(OpenSegError, match=r"is a single numpy array \(\.npy\), not a support-set file"):
        SupportSet.load(array)


def test_painted_across_finds_a_slice_that_cuts_through_painted_slices():
    from napari_openseg.core.support import painted_across

    labels = np.zeros((20, 30, 40), np.uint8)
    labels[5, 5:20, 5:30] = 1
    labels[12, 5:20, 5:30] = 1
    assert painted_across(labels, 2, 10, [1]) == (1, 0, [5, 12])  # two lines one voxel wide
    assert painted_across(labels, 1, 10, [1]) == (1, 0, [5, 12])
    assert painted_across(labels, 0, 5, [1]) is None  # the painted slice itself
    assert painted_across(labels, 2, 2, [1]) is None  # the value is not in this slice
    block = np.zeros_like(labels)
    block[3:15, 5:20, 5:30] = 2  # labelled in 3D (a file, not strokes): any slice is an example
    assert painted_across(block, 2, 10, [2]) is None


def test_strokes_with_a_background_label_keep_their_painted_pixels_through_a_file(tmp_path):
    image, _ = labelled_volume()
    strokes = np.zeros(image.shape, np.uint8)
    strokes[2, 5, 4:9] = 1  # a stroke on the structure
    strokes[2, 15, 2:20] = 3  # background
    strokes[2, 10, 10:14] = 2  # another structure, painted on the same slice
    support = build_support_set(image, strokes, background_label=3)
    assert support.labels == [1, 2]  # the background is no task
    for entry in support.entries:
        assert np.array_equal(entry.known, strokes[2] != 0)
        assert np.array_equal(entry.mask, strokes[2] == entry.label)
    path = support.save(tmp_path / "strokes.npz")
    loaded = SupportSet.load(path)
    assert [np.array_equal(a.known, b.known) for a, b in zip(support.entries, loaded.entries)] == [True, True]
    with np.load(path) as archive:
        assert json.loads(str(archive["openseg_support"]))["version"] == 2
        assert json.loads(str(archive["openseg_support"]))["entries"][0]["painted"] == int(
            (strokes[2] != 0).sum()
        )


def test_sets_without_strokes_or_colour_stay_version_1_and_version_1_files_are_read(tmp_path):
    image, labels = labelled_volume()
    path = build_support_set(image, labels).save(tmp_path / "plain.npz")
    with np.load(path) as archive:
        meta = json.loads(str(archive["openseg_support"]))
        assert meta["version"] == 1 and not any(k.startswith(("known_", "colour_")) for k in archive.files)
    loaded = SupportSet.load(path)  # what a version-1 writer wrote reads as whole masks without colour
    assert all(e.known is None and e.colour is None for e in loaded.entries)


def test_colour_is_kept_for_the_pixel_classifier(tmp_path):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (20, 24, 3)).astype(np.uint8)
    labels = np.zeros((20, 24), np.uint8)
    labels[5:10, 5:10] = 1
    entry = build_support_set(picture, labels).entries[0]
    assert entry.colour.shape == (20, 24, 3) and entry.colour.min() >= 0 and entry.colour.max() <= 1
    assert entry.image.shape == (20, 24)
    loaded = SupportSet.load(SupportSet([entry]).save(tmp_path / "colour.npz")).entries[0]
    assert np.allclose(loaded.colour, entry.colour, atol=1e-3)  # stored as float16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(background_label=9), "background label 9 is not painted"),
        (dict(background_label=0), "0 marks unpainted pixels"),
        (dict(background_label=2, label_values=[2]), "label 2 is the background label"),
    ],
)
def test_bad_background_labels_are_explained(kwargs, message):
    image, labels = labelled_volume()
    with pytest.raises(OpenSegError, match=message):
        build_support_set(image, labels, **kwargs)


def test_a_background_label_with_no_background_painted_on_the_chosen_slices_is_refused():
    image, _ = labelled_volume()
    strokes = np.zeros(image.shape, np.uint8)
    strokes[2, 5, 4:9] = 1
    strokes[4, 15, 2:20] = 3
    with pytest.raises(OpenSegError, match="no background is painted"):
        build_support_set(image, strokes, background_label=3, slice_indices=[2])


def test_masks_that_look_like_strokes_get_a_warning_that_says_how_to_annotate():
    image, labels = labelled_volume()
    assert coverage_warning(build_support_set(image, labels).entries) is None  # filled boxes
    scribble = np.zeros(image.shape, np.uint8)
    idx = np.arange(3, 17)
    scribble[2, idx, idx] = 1  # a diagonal line: about 7 % of its bounding box
    warning = coverage_warning(build_support_set(image, scribble).entries)
    assert "label 1 on 1 slice" in warning and "background label" in warning
    strokes = scribble.copy()
    strokes[2, 0, :] = 2
    assert coverage_warning(build_support_set(image, strokes, background_label=2).entries) is None
