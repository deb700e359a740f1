"""napari reader, writers and sample data: NIfTI geometry, labels detection, support-set files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_openseg._widgets._io_contrib import (
    get_reader,
    has_label_name,
    sample_data,
    write_image,
    write_labels,
)
from napari_openseg._widgets._session import get_session
from napari_openseg.core.support import build_support_set
from napari_openseg.errors import OpenSegError
from tests.widgets.conftest import disc_volume

AFFINE = np.array([[1.5, 0, 0, -20], [0, 2.0, 0, 10], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def save_nifti(path, native: np.ndarray, intent: str | None = None):
    img = nib.Nifti1Image(native, AFFINE)
    if intent:
        img.header.set_intent(intent)
    nib.save(img, str(path))
    return path


def read(path):
    reader = get_reader(str(path))
    assert reader is not None
    return reader(str(path))


def test_image_volume_geometry(tmp_path):
    native = np.random.default_rng(0).normal(size=(10, 12, 14)).astype(np.float32)  # (i, j, k)
    [(data, kwargs, kind)] = read(save_nifti(tmp_path / "t1.nii.gz", native))
    assert kind == "image"
    assert data.shape == (14, 12, 10)  # (z, y, x)
    np.testing.assert_array_equal(data, native.transpose(2, 1, 0))
    assert kwargs["scale"] == (3.0, 2.0, 1.5)
    assert kwargs["name"] == "t1"
    np.testing.assert_array_equal(kwargs["metadata"]["nifti"]["affine"], AFFINE)


@pytest.mark.parametrize(
    ("name", "native", "intent", "kind"),
    [
        ("case_seg.nii.gz", np.arange(60, dtype=np.int16).reshape(3, 4, 5), None, "labels"),  # name hint
        ("anything.nii", np.tile(np.arange(3, dtype=np.uint8), (4, 5, 1)), None, "labels"),  # few values
        ("anything.nii", np.arange(60, dtype=np.int16).reshape(3, 4, 5), None, "image"),  # many values
        ("segment.nii", np.arange(60, dtype=np.int16).reshape(3, 4, 5), "label", "labels"),  # intent code
        ("mask.nii.gz", np.full((3, 4, 5), 0.5, np.float32), None, "image"),  # not whole numbers
        ("mask.nii.gz", np.ones((3, 4, 5), np.float32), None, "labels"),  # whole-number floats
        ("ct.nii.gz", -np.ones((3, 4, 5), np.int16), None, "image"),  # negative values
        ("segment.nii", np.full((3, 4, 5), 0.7, np.float32), "label", "image"),  # intent, yet fractions
    ],
)
def test_labels_or_image(tmp_path, name, native, intent, kind):
    [(data, _, got)] = read(save_nifti(tmp_path / name, native, intent))
    assert got == kind
    if kind == "labels":
        assert np.issubdtype(data.dtype, np.integer)


def test_label_name_hints():
    assert (
        has_label_name("sub-01_dseg.nii.gz") and has_label_name("Labels.nii") and has_label_name("x-mask.nii")
    )
    assert not has_label_name("t1_brain.nii.gz") and not has_label_name("measurement.nii")  # word starts only


def test_writer_gives_back_the_source_affine(tmp_path):
    native = np.zeros((10, 12, 14), np.uint8)
    native[2:5, 3:6, 4:9] = 2
    [(data, kwargs, kind)] = read(save_nifti(tmp_path / "labels.nii.gz", native))
    meta = {**kwargs, "translate": (0.0, 0.0, 0.0)}
    out = tmp_path / "out.nii.gz"
    assert write_labels(str(out), data, meta) == [str(out)]
    written = nib.load(str(out))
    np.testing.assert_array_equal(written.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(written.dataobj), native)
    assert written.get_data_dtype() == np.uint8


def test_writer_without_a_source_uses_scale_and_translate(tmp_path):
    data = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)  # (z, y, x)
    out = tmp_path / "image.nii"
    meta = {"scale": (3.0, 2.0, 0.5), "translate": (9.0, 8.0, 7.0), "metadata": {}}
    assert write_image(str(out), data, meta) == [str(out)]
    written = nib.load(str(out))
    assert written.shape == (6, 5, 4)
    np.testing.assert_allclose(written.header.get_zooms(), (0.5, 2.0, 3.0))
    np.testing.assert_allclose(written.affine[:3, 3], (7.0, 8.0, 9.0))
    np.testing.assert_allclose(np.asarray(written.dataobj).transpose(2, 1, 0), data)


def test_writer_refuses_rgb_and_other_suffixes(tmp_path, monkeypatch):
    from napari.utils import notifications

    shown = []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    with pytest.raises(OpenSegError, match="split the RGB channels"):
        write_image(str(tmp_path / "x.nii"), np.zeros((4, 4, 3)), {"rgb": True})
    # napari reports a writer's ValueError only as "not a valid writer": the reason is shown first
    assert shown and "split the RGB channels" in shown[-1] and not (tmp_path / "x.nii").exists()
    assert write_labels(str(tmp_path / "x.tif"), np.zeros((4, 4), np.uint8), {}) == []
    assert not (tmp_path / "x.tif").exists()


def test_napari_int64_labels_are_written_in_the_smallest_type(tmp_path):
    data = np.random.default_rng(0).integers(0, 3, (4, 5, 6))  # what add_labels(integers) holds: int64
    out = tmp_path / "labels.nii.gz"
    assert write_labels(str(out), data, {"scale": (1.0, 1.0, 1.0), "metadata": {}}) == [str(out)]
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), data)


def test_a_4d_layer_keeps_the_spacing_of_every_axis_and_a_rotation_is_flagged(tmp_path, monkeypatch):
    from napari.utils import notifications

    warned = []
    monkeypatch.setattr(notifications, "show_warning", warned.append)
    out = tmp_path / "t.nii.gz"
    meta = {"scale": (2.5, 3.0, 2.0, 0.5), "translate": (0, 0, 0, 0), "metadata": {}}
    write_image(str(out), np.zeros((2, 3, 4, 5), np.float32), meta)
    np.testing.assert_allclose(nib.load(str(out)).header.get_zooms(), (0.5, 2.0, 3.0, 2.5))
    assert not warned
    rotated = np.eye(3)
    rotated[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    write_image(
        str(out), np.zeros((3, 4), np.float32), {"scale": (1.0, 1.0), "rotate": rotated, "metadata": {}}
    )
    assert warned and "rotation, shear or affine is not written" in warned[-1]


def test_a_zero_spacing_on_a_4th_axis_opens_with_spacing_1(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), AFFINE)
    img.header.set_zooms((1.5, 2.0, 3.0, 0.0))
    nib.save(img, str(tmp_path / "fmri.nii.gz"))
    [(data, kwargs, _)] = read(tmp_path / "fmri.nii.gz")
    assert data.shape == (2, 6, 5, 4) and kwargs["scale"] == (1.0, 3.0, 2.0, 1.5)


def test_a_volume_with_one_time_point_opens_as_a_volume(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), AFFINE)
    img.header.set_zooms((1.5, 2.0, 3.0, 0.0))
    nib.save(img, str(tmp_path / "one_frame.nii.gz"))
    [(data, kwargs, _)] = read(tmp_path / "one_frame.nii.gz")
    assert data.shape == (6, 5, 4) and kwargs["scale"] == (3.0, 2.0, 1.5)


def test_foreign_npz_and_tiff_are_declined(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert get_reader(str(tmp_path / "other.npz")) is None
    assert get_reader(str(tmp_path / "broken.npz")) is None
    assert get_reader(str(tmp_path / "stack.tif")) is None
    assert get_reader([str(tmp_path / "other.npz")]) is None


def test_sample_data():
    (image, image_kwargs, image_kind), (labels, labels_kwargs, labels_kind) = sample_data()
    assert (image_kind, labels_kind) == ("image", "labels")
    assert image.shape == labels.shape == (79, 94, 76)
    assert image_kwargs["scale"] == labels_kwargs["scale"] == (2.0, 2.0, 2.0)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert list(labels_kwargs["features"]["tissue"]) == ["background", "grey matter", "white matter"]


@pytest.mark.qt
def test_support_file_opens_into_the_session(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image, mask = disc_volume()
    path = build_support_set(image, mask, slice_indices=[2, 5]).save(tmp_path / "support.npz")
    layers = viewer.open(str(path), plugin="napari-openseg")
    assert layers == [] and len(viewer.layers) == 0
    assert [e.slice_index for e in get_session(viewer).support.entries] == [2, 5]


@pytest.mark.qt
def test_viewer_opens_nifti_and_sample(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    native = np.zeros((10, 12, 14), np.uint8)
    native[1:4, 2:5, 3:6] = 1
    [layer] = viewer.open(str(save_nifti(tmp_path / "brain_mask.nii.gz", native)), plugin="napari-openseg")
    assert type(layer).__name__ == "Labels"
    np.testing.assert_array_equal(layer.scale, (3.0, 2.0, 1.5))
    viewer.open_sample("napari-openseg", "mni152")
    assert [layer.name for layer in viewer.layers][-2:] == ["MNI152 T1", "MNI152 GM-WM labels"]


def test_an_image_and_its_labels_under_one_name_open_as_x_and_x_labels(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    image = save_nifti(
        tmp_path / "imagesTr" / "case_001.nii.gz", rng.normal(100, 20, (6, 7, 8)).astype(np.float32)
    )
    labels = save_nifti(
        tmp_path / "labelsTr" / "case_001.nii.gz", (rng.random((6, 7, 8)) > 0.5).astype(np.uint8)
    )
    [(_, image_kwargs, image_kind)] = read(image)
    [(_, labels_kwargs, labels_kind)] = read(labels)
    assert (image_kind, image_kwargs["name"]) == ("image", "case_001")
    assert (labels_kind, labels_kwargs["name"]) == ("labels", "case_001 labels")
    [(_, hinted, _)] = read(save_nifti(tmp_path / "case_001_seg.nii.gz", np.zeros((3, 4, 5), np.uint8)))
    assert hinted["name"] == "case_001_seg"  # the name already says labels


def test_a_nifti_three_voxels_deep_on_x_opens_as_a_volume_not_as_rgb(tmp_path):
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((3, 8, 9)).astype(np.float32), AFFINE),
        str(tmp_path / "thin.nii.gz"),
    )
    [(data, kwargs, kind)] = read(tmp_path / "thin.nii.gz")
    assert kind == "image" and data.shape == (9, 8, 3) and kwargs["rgb"] is False
