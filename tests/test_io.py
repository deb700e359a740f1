"""Image files: NIfTI keeps geometry (with reversed axes), TIFF keeps spacing, writes are atomic."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from napari_openseg import io
from napari_openseg.errors import OpenSegError


def nifti_volume(path, shape=(10, 12, 14), dtype=np.int16):
    data = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    affine = np.array([[0, 0, 1.5, 3], [0, 2.0, 0, -4], [-0.8, 0, 0, 7], [0, 0, 0, 1]], float)
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((0.8, 2.0, 1.5))
    nib.save(img, str(path))
    return data, affine


def test_nifti_is_read_slice_first_and_written_back_identically(tmp_path):
    data, affine = nifti_volume(tmp_path / "in.nii.gz")
    image = io.read_image(tmp_path / "in.nii.gz")
    assert image.data.shape == (14, 12, 10)
    assert np.array_equal(image.data, data.transpose(2, 1, 0))
    assert np.allclose(image.spacing, (1.5, 2.0, 0.8))
    assert np.allclose(image.affine, affine) and image.name == "in"
    labels = (image.data > 500).astype(np.uint8)
    io.write_image(tmp_path / "out.nii.gz", labels, image)
    written = nib.load(str(tmp_path / "out.nii.gz"))
    assert written.shape == data.shape and np.allclose(written.affine, affine)
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), labels.transpose(2, 1, 0))


def test_tiff_keeps_spacing(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (5, 6, 7)).astype(np.uint16)
    reference = io.ImageData(data, spacing=(3.0, 0.5, 0.25))
    io.write_image(tmp_path / "stack.tif", data, reference)
    back = io.read_image(tmp_path / "stack.tif")
    assert np.array_equal(back.data, data)
    assert np.allclose(back.spacing, (3.0, 0.5, 0.25))


def test_per_task_probabilities_in_tiff_keep_the_z_spacing(tmp_path):
    reference = io.ImageData(np.zeros((5, 6, 7), np.float32), spacing=(3.0, 0.5, 0.25))
    probabilities = np.random.default_rng(0).random((2, 5, 6, 7)).astype(np.float32)
    io.write_image(tmp_path / "prob.tif", probabilities, reference)
    back = io.read_image(tmp_path / "prob.tif")
    assert np.array_equal(back.data, probabilities)
    assert np.allclose(back.spacing[-3:], (3.0, 0.5, 0.25))


def test_outputs_get_the_mode_a_plain_open_would_give(tmp_path):
    io.write_image(tmp_path / "a.npy", np.zeros(3))
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == io.NEW_FILE_MODE
    os.chmod(tmp_path / "a.npy", 0o640)  # a replaced file keeps the mode its owner gave it
    io.write_image(tmp_path / "a.npy", np.ones(3), overwrite=True)
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == 0o640


def test_an_image_output_of_a_type_that_cannot_be_written_is_refused_up_front(tmp_path):
    with pytest.raises(OpenSegError, match="not pictures"):
        io.check_writable(tmp_path / "out.png", image=True)
    with pytest.raises(OpenSegError, match="unsupported file type"):
        io.check_writable(tmp_path / "out.xyz", image=True)
    assert io.check_writable(tmp_path / "out.tif", image=True) == tmp_path / "out.tif"


@pytest.mark.parametrize("dtype", [np.uint32, np.int32, bool, np.float64])
def test_tiff_keeps_the_z_spacing_for_types_imagej_cannot_read(tmp_path, dtype):
    data = (np.arange(5 * 6 * 7).reshape(5, 6, 7) % 3).astype(dtype)
    io.write_image(tmp_path / "out.tif", data, io.ImageData(data, spacing=(3.0, 0.25, 0.5)))
    back = io.read_image(tmp_path / "out.tif")
    assert np.array_equal(back.data, data) and np.allclose(back.spacing, (3.0, 0.25, 0.5))


def test_an_rgb_tiff_has_its_pixel_size_on_the_image_axes(tmp_path):
    import tifffile

    tifffile.imwrite(
        tmp_path / "rgb.tif", np.zeros((6, 7, 3), np.uint8), photometric="rgb", resolution=(1 / 0.5, 1 / 0.25)
    )
    assert np.allclose(io.read_image(tmp_path / "rgb.tif").spacing, (0.25, 0.5, 1.0))


@pytest.mark.parametrize("dtype, stored", [(bool, np.uint8), (np.float16, np.float32), (np.int64, np.uint8)])
def test_nifti_stores_types_that_nifti_tools_read(tmp_path, dtype, stored):
    data = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 2).astype(dtype)
    nifti_volume(tmp_path / "ref.nii.gz", (6, 5, 4))  # read back as (4, 5, 6)
    for reference in (None, io.read_image(tmp_path / "ref.nii.gz")):
        path = io.write_image(tmp_path / "out.nii.gz", data, reference, overwrite=True)
        assert nib.load(str(path)).get_data_dtype() == stored
        assert np.array_equal(io.read_image(path).data, data.astype(stored))
    huge = np.array([[[0, 2**40]]], np.int64)  # beyond 32 bits: kept, and written all the same
    assert np.array_equal(io.read_image(io.write_image(tmp_path / "huge.nii.gz", huge)).data, huge)


def test_npy_round_trip_without_pickle(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    io.write_image(tmp_path / "a.npy", data)
    assert np.array_equal(io.read_image(tmp_path / "a.npy").data, data)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(OpenSegError, match=r"holds Python objects \(pickles\), which are never loaded"):
        io.read_image(tmp_path / "obj.npy")


def test_existing_outputs_and_missing_folders_are_refused(tmp_path):
    io.write_image(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(OpenSegError, match="exists; choose another name or pass --overwrite"):
        io.write_image(tmp_path / "a.npy", np.ones(3))
    io.write_image(tmp_path / "a.npy", np.ones(3), overwrite=True)
    with pytest.raises(OpenSegError, match="does not exist"):
        io.write_image(tmp_path / "nowhere" / "a.npy", np.zeros(3))


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "out.nii.gz") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("cancelled")
    assert os.listdir(tmp_path) == []


def test_unknown_and_damaged_files(tmp_path):
    with pytest.raises(OpenSegError, match="unsupported file type"):
        io.read_image(__file__)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(OpenSegError, match="could not be read as nifti"):
        io.read_image(broken)
    assert io.strip_suffix("a/b/scan.nii.gz") == "scan"


def test_a_volume_saved_with_one_time_point_is_read_as_a_volume_and_written_back_3d(tmp_path):
    data = np.random.default_rng(1).random((10, 12, 8, 1)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    img.header.set_zooms((2.0, 3.0, 4.0, 0.0))
    nib.save(img, str(tmp_path / "one_frame.nii.gz"))
    image = io.read_image(tmp_path / "one_frame.nii.gz")
    assert image.data.shape == (8, 12, 10) and np.allclose(image.spacing, (4.0, 3.0, 2.0))
    assert np.array_equal(image.data, data[..., 0].transpose(2, 1, 0))
    io.write_image(tmp_path / "labels.nii.gz", (image.data > 0.5).astype(np.uint8), image)
    written = nib.load(str(tmp_path / "labels.nii.gz"))
    assert written.shape == (10, 12, 8) and np.allclose(written.header.get_zooms(), (2.0, 3.0, 4.0))
    # a real series keeps its 4th axis
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), str(tmp_path / "series.nii.gz"))
    assert io.read_image(tmp_path / "series.nii.gz").data.shape == (2, 6, 5, 4)


def test_scaled_16_bit_nifti_is_read_as_float32_with_its_scale_applied(tmp_path):
    stored = np.random.default_rng(2).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    img = nib.Nifti1Image(stored, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    image = io.read_image(tmp_path / "scaled.nii.gz")
    assert image.data.dtype == np.float32
    assert np.array_equal(image.data, (stored * 0.5 + 10.0).transpose(2, 1, 0).astype(np.float32))
    nib.save(nib.Nifti1Image(stored, np.eye(4)), str(tmp_path / "plain.nii.gz"))
    assert io.read_image(tmp_path / "plain.nii.gz").data.dtype == np.int16  # unscaled: the stored type


def test_a_result_of_an_rgb_tiff_gets_the_pixel_size_of_the_image_axes(tmp_path):
    import tifffile

    tifffile.imwrite(
        str(tmp_path / "rgb.tif"),
        np.zeros((20, 30, 3), np.uint8),
        photometric="rgb",
        resolution=(1 / 0.5, 1 / 0.25),
    )
    reference = io.read_image(tmp_path / "rgb.tif")
    labels = io.write_image(tmp_path / "labels.tif", np.zeros((20, 30), np.uint8), reference)
    assert np.allclose(io.read_image(labels).spacing, (0.25, 0.5))  # was (0.5, 1.0): colour taken as x
    probabilities = io.write_image(tmp_path / "probs.tif", np.zeros((2, 20, 30), np.float32), reference)
    assert np.allclose(io.read_image(probabilities).spacing[-2:], (0.25, 0.5))


def test_ome_tiff_pixel_sizes_are_read_and_an_imagej_unit_is_kept(tmp_path):
    import tifffile

    volume = np.zeros((5, 6, 7), np.float32)
    tifffile.imwrite(
        str(tmp_path / "scan.ome.tif"),
        volume,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": 3.0, "PhysicalSizeY": 0.25, "PhysicalSizeX": 0.5},
    )
    assert np.allclose(io.read_image(tmp_path / "scan.ome.tif").spacing, (3.0, 0.25, 0.5))
    tifffile.imwrite(
        str(tmp_path / "ij.tif"),
        volume,
        imagej=True,
        resolution=(2.0, 4.0),
        metadata={"spacing": 3.0, "unit": "um", "axes": "ZYX"},
    )
    out = io.write_image(
        tmp_path / "out.tif", np.zeros(volume.shape, np.uint8), io.read_image(tmp_path / "ij.tif")
    )
    with tifffile.TiffFile(str(out)) as tif:
        assert tif.imagej_metadata["unit"] == "um" and tif.imagej_metadata["spacing"] == 3.0
