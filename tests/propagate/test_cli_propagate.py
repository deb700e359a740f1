"""``openseg propagate``: files in, labels and per-slice confidence out, atomically; errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_openseg.cli import main
from napari_openseg.io import read_image
from tests._blobs import disc_volume, largest_slice, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture
def volume_files(tmp_path):
    """A disc volume as NIfTI (slices on the file's last axis, i.e. array axis 0) and its prompt."""
    image, truth = disc_volume((12, 20, 22), first=2, last=9)
    z = largest_slice(truth)
    prompt = np.zeros_like(truth)
    prompt[z] = truth[z]
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (4, -7, 11)
    paths = tmp_path / "vol.nii.gz", tmp_path / "prompt.nii.gz"
    # io reverses NIfTI axes on read, so store the arrays reversed to read them back as (z, y, x).
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), str(paths[0]))
    nib.save(nib.Nifti1Image(prompt.transpose(2, 1, 0), affine), str(paths[1]))
    return paths, prompt, z


def test_propagate_writes_labels_with_the_image_geometry_and_a_confidence_report(
    tmp_path, volume_files, tiny_weights, capsys
):
    (image, prompt_path), prompt, z = volume_files
    out, report = tmp_path / "out.nii.gz", tmp_path / "conf.json"
    code = main(
        [
            "propagate",
            "--image",
            str(image),
            "--prompt",
            str(prompt_path),
            "--out",
            str(out),
            "--axis",
            "0",
            "--bank-size",
            "4",
            "--weights",
            str(tiny_weights),
            "--json",
            str(report),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    written, source = nib.load(str(out)), nib.load(str(image))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    labels = read_image(out).data
    assert np.array_equal(labels[z], prompt[z])
    data = json.loads(report.read_text())
    assert data["label_values"] == [1] and data["prompt_slices"] == {"1": [z]}
    assert len(data["slices"]) == 12 and data["slices"][z]["confidence"] is None
    weakest = data["least_confident_slice"]
    finite = [s["confidence"] for s in data["slices"] if s["confidence"] is not None]
    assert finite and data["slices"][weakest]["confidence"] == min(finite)
    printed = capsys.readouterr().out
    assert f"least confident slice {weakest}" in printed
    # the volume is a bright disc: its pixel classifier passes the half-split test and joins
    assert data["pixel_classifier"]["1"]["joined"] and data["pixel_classifier"]["1"]["half_split_dice"] > 0.65
    assert "Pixel classifier: label 1: joined the network (half-split Dice" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "conf.json",
        "out.nii.gz",
        "prompt.nii.gz",
        "tiny.pt",
        "vol.nii.gz",
    ]


def test_existing_outputs_are_refused_before_any_work(tmp_path, volume_files, tiny_weights, capsys):
    (image, prompt_path), _, _ = volume_files
    out, report = tmp_path / "out.nii.gz", tmp_path / "conf.json"
    report.write_text("keep me")
    args = [
        "propagate",
        "--image",
        str(image),
        "--prompt",
        str(prompt_path),
        "--out",
        str(out),
        "--weights",
        str(tiny_weights),
        "--json",
        str(report),
        "--device",
        "cpu",
    ]
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert report.read_text() == "keep me" and not out.exists()
    assert main([*args, "--overwrite", "--bank-size", "2"]) == 0
    assert json.loads(report.read_text())["label_values"] == [1]


def test_json_and_out_must_be_two_files_and_out_a_writable_type(tmp_path, volume_files, tiny_weights, capsys):
    (image, prompt_path), _, _ = volume_files
    out = tmp_path / "out.npy"
    args = [
        "propagate",
        "--image",
        str(image),
        "--prompt",
        str(prompt_path),
        "--weights",
        str(tiny_weights),
        "--device",
        "cpu",
        "--overwrite",
    ]
    assert main([*args, "--out", str(out), "--json", str(out)]) == 2
    assert "--json and --out name the same file" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "out.png")]) == 2
    assert "not pictures" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.png").exists()


def test_a_prompt_of_another_shape_is_an_error_that_says_so(tmp_path, volume_files, tiny_weights, capsys):
    (image, _), prompt, _ = volume_files
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, prompt[:, :-1])
    out = tmp_path / "out.tif"
    code = main(
        [
            "propagate",
            "--image",
            str(image),
            "--prompt",
            str(wrong),
            "--out",
            str(out),
            "--weights",
            str(tiny_weights),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    assert "do not match" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "prompt.nii.gz",
        "tiny.pt",
        "vol.nii.gz",
        "wrong.npy",
    ]


def test_stop_confidence_one_leaves_only_the_painted_slice(tmp_path, volume_files, tiny_weights, capsys):
    (image, prompt_path), prompt, _ = volume_files
    out = tmp_path / "out.npy"
    args = [
        "propagate",
        "--image",
        str(image),
        "--prompt",
        str(prompt_path),
        "--out",
        str(out),
        "--weights",
        str(tiny_weights),
        "--device",
        "cpu",
    ]
    # (the blob's pixel classifier joins: --classifier-stop 0 keeps the confidence rule for it)
    assert main([*args, "--stop-confidence", "1.0", "--stop-ratio", "0", "--classifier-stop", "0"]) == 0
    assert np.array_equal(np.load(out), prompt)  # every front ended on its first two, undone, slices
    printed = capsys.readouterr().out
    assert "Fronts ended on low confidence (label" in printed and "lower --stop-confidence and" in printed
    assert main([*args, "--stop-confidence", "1.5", "--overwrite"]) == 2
    assert main([*args, "--stop-ratio", "1.0", "--overwrite"]) == 2  # a ratio must be below 1
    assert (
        "stop_ratio (of the confidence of a front's first slice) must lie in [0, 1)"
        in capsys.readouterr().err
    )


def test_the_cli_shows_the_library_defaults_without_importing_torch():
    import subprocess
    import sys

    from napari_openseg.core.propagate.settings import (
        DEFAULT_CAPACITY,
        DEFAULT_STOP_CONFIDENCE,
        DEFAULT_STOP_RATIO,
    )

    code = (
        "import sys; from napari_openseg.cli import build_parser; parser = build_parser(); "
        "print('torch' in sys.modules); parser.parse_args(['propagate', '--help'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.startswith("False")
    assert (
        f"(default {DEFAULT_CAPACITY})" in out.stdout and f"(default {DEFAULT_STOP_CONFIDENCE};" in out.stdout
    )
    assert f"(default {DEFAULT_STOP_RATIO};" in " ".join(out.stdout.split())  # argparse wraps lines


def test_unordered_stack_from_tiff(tmp_path, tiny_weights):
    import tifffile

    image, truth = disc_volume((6, 16, 16), first=0, last=5)
    prompt = np.zeros_like(truth)
    prompt[3] = truth[3]
    tifffile.imwrite(tmp_path / "stack.tif", image)
    tifffile.imwrite(tmp_path / "prompt.tif", prompt)
    out = tmp_path / "out.tif"
    code = main(
        [
            "propagate",
            "--image",
            str(tmp_path / "stack.tif"),
            "--prompt",
            str(tmp_path / "prompt.tif"),
            "--out",
            str(out),
            "--unordered",
            "--weights",
            str(tiny_weights),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    labels = tifffile.imread(out)
    assert labels.shape == image.shape and np.array_equal(labels[3], prompt[3])


def test_without_weights_the_propagation_default_carries_the_disc(tmp_path, volume_files):
    """No --weights: the bundled openseg-propagate weights run, and they follow a plain bright disc."""
    (image, prompt_path), _, _ = volume_files
    out, report = tmp_path / "out.nii.gz", tmp_path / "conf.json"
    assert (
        main(
            [
                "propagate",
                "--image",
                str(image),
                "--prompt",
                str(prompt_path),
                "--out",
                str(out),
                "--json",
                str(report),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads(report.read_text())["weights"] == "openseg-propagate"
    _, truth = disc_volume((12, 20, 22), first=2, last=9)
    labels = read_image(out).data > 0
    z = largest_slice(truth)
    for s in (z - 1, z + 1):  # the painted disc is carried to both neighbours
        assert 2 * (labels[s] & truth[s]).sum() / (labels[s].sum() + truth[s].sum()) > 0.9
    # Nothing off the disc's slices. The default stop (0.7 x a front's first slice) ends each front
    # where the network's confidence fades, at the disc's thin ends (slices 2-3 and 8-9 here).
    assert not labels[:2].any() and not labels[10:].any()
    assert 2 * (labels & truth).sum() / (labels.sum() + truth.sum()) > 0.7
