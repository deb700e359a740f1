"""The ``openseg`` command line: support build, segment, info, weights, and its error handling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_openseg.cli import main
from napari_openseg.training.splits import shared_data_dir
from tests.conftest import needs_shared


@pytest.fixture
def nifti_pair(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(50, 10, (20, 24, 6)).astype(np.float32)
    labels = np.zeros((20, 24, 6), np.uint8)
    labels[4:10, 5:15, :] = 1
    labels[12:18, 3:9, 2:5] = 2
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[:3, 3] = (10, -5, 2)
    paths = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(paths[0]))
    nib.save(nib.Nifti1Image(labels, affine), str(paths[1]))
    return paths


def test_support_build_then_segment_keeps_shape_and_affine(tmp_path, nifti_pair, tiny_weights, capsys):
    image, labels = nifti_pair
    support = tmp_path / "support.npz"
    assert (
        main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)]) == 0
    )
    assert "label 1: 6, label 2: 3" in capsys.readouterr().out
    out = tmp_path / "seg.nii.gz"
    code = main(
        [
            "segment",
            str(image),
            "--support",
            str(support),
            "--out",
            str(out),
            "--weights",
            str(tiny_weights),
            "--support-size",
            "2",
            "--probabilities",
        ]
    )
    assert code == 0
    written, source = nib.load(str(out)), nib.load(str(image))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    assert nib.load(str(tmp_path / "seg_prob.nii.gz")).shape == (*source.shape, 2)


def test_several_inputs_go_to_an_output_folder(tmp_path, nifti_pair, tiny_weights):
    image, labels = nifti_pair
    support = tmp_path / "support.npz"
    main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)])
    second = tmp_path / "second.nii.gz"
    second.write_bytes(image.read_bytes())
    outdir = tmp_path / "out"
    outdir.mkdir()
    assert (
        main(
            [
                "segment",
                str(image),
                str(second),
                "--support",
                str(support),
                "--out-dir",
                str(outdir),
                "--weights",
                str(tiny_weights),
                "--label-values",
                "1",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in outdir.iterdir()) == ["img_openseg.nii.gz", "second_openseg.nii.gz"]


def test_existing_output_is_refused_before_any_work(tmp_path, nifti_pair, tiny_weights, capsys):
    image, labels = nifti_pair
    support = tmp_path / "support.npz"
    main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)])
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"precious")
    args = [
        "segment",
        str(image),
        "--support",
        str(support),
        "--out",
        str(out),
        "--weights",
        str(tiny_weights),
    ]
    assert main(args) == 2
    assert "exists; choose another name or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["support", "build", "--image", "IMG", "--labels", "IMG", "--out", "OUT"],
            "whole-number label values",
        ),
        (
            ["support", "build", "--image", "IMG", "--labels", "IMG", "--labels", "LAB", "--out", "OUT"],
            "give one --labels per --image",
        ),
        (["segment", "IMG", "--support", "IMG", "--out", "OUT"], "is a NIfTI image, not a support-set file"),
        (["segment", "IMG", "--support", "SUP", "--out", "OUT", "--weights", "nope"], "neither a known"),
        (["segment", "IMG", "--support", "SUP", "--out", "OUT", "--device", "cuda:3"], "cuda"),
    ],
)
def test_mistakes_exit_2_with_a_message(tmp_path, nifti_pair, args, message, capsys):
    image, labels = nifti_pair
    support = tmp_path / "s.npz"
    main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)])
    capsys.readouterr()
    names = {"IMG": str(image), "LAB": str(labels), "SUP": str(support), "OUT": str(tmp_path / "o.nii.gz")}
    assert main([names.get(a, a) for a in args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_inputs_that_would_share_an_output_name_are_refused(tmp_path, nifti_pair, tiny_weights, capsys):
    image, labels = nifti_pair
    support = tmp_path / "support.npz"
    main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "out").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "img.nii.gz").write_bytes(image.read_bytes())
    args = [
        "segment",
        str(tmp_path / "a" / "img.nii.gz"),
        str(tmp_path / "b" / "img.nii.gz"),
        "--support",
        str(support),
        "--out-dir",
        str(tmp_path / "out"),
        "--weights",
        str(tiny_weights),
    ]
    assert main(args + ["--overwrite"]) == 2
    assert "would share the output" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_a_missing_output_folder_is_made_and_every_input_is_checked_first(
    tmp_path, nifti_pair, tiny_weights, capsys
):
    image, labels = nifti_pair
    support = tmp_path / "support.npz"
    main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)])
    second = tmp_path / "second.nii.gz"
    second.write_bytes(image.read_bytes())
    outdir = tmp_path / "results" / "run 1"
    base = ["segment", "--support", str(support), "--out-dir", str(outdir), "--weights", str(tiny_weights)]
    capsys.readouterr()
    # the missing file is the second of three: found before the first is segmented
    assert main([*base, str(image), str(tmp_path / "missing.nii.gz"), str(second)]) == 2
    assert "1 input file not found: " in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    # a run that fails before writing anything leaves no folder behind
    assert main([*base, str(image), "--batch-size", "-3"]) == 2
    assert not (tmp_path / "results").exists()
    capsys.readouterr()
    assert main([*base, str(image), str(second), "--label-values", "1"]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["img_openseg.nii.gz", "second_openseg.nii.gz"]
    err = capsys.readouterr().err  # the expected time, said before each run
    assert err.count("expected about ") == 2 and "per slice (1 task, S=16 (here 6), K=1" in err
    # the one engine checks the support once, before the first image
    assert err.count("once to check the support (1 task)") == 1
    first, second = [line for line in err.splitlines() if "expected about" in line]
    assert "once" in first and "once" not in second


def test_a_nifti_passed_as_support_is_named_for_what_it_is(tmp_path, nifti_pair, capsys):
    image, _ = nifti_pair
    assert main(["segment", str(image), "--support", str(image), "--out", str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "is a NIfTI image, not a support-set file" in err and "openseg support build" in err
    assert "pickle" not in err


def test_help_shows_each_default_once():
    import argparse

    from napari_openseg.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    segment = commands["segment"].format_help()
    assert "(default: 16)" in segment and "(default: 0.5)" in segment and "(default: auto" in segment
    assert "array order: 0 is the NIfTI file's third axis (default: 0)" in " ".join(segment.split())
    for name in ("segment", "demo", "evaluate", "propagate"):
        text = " ".join(commands[name].format_help().split())
        for option in text.split(" --")[1:]:  # one default per option, never "(default x) (default: x)"
            assert option.count("(default") <= 1, (name, option)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--batch-size", "-3"], "batch size must be >= 1"),
        (["--out", "OUT.png"], "not pictures"),
    ],
)
def test_bad_segment_options_are_refused_before_any_work(
    tmp_path, nifti_pair, tiny_weights, capsys, monkeypatch, option, message
):
    image, labels = nifti_pair
    support = tmp_path / "support.npz"
    main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)])
    capsys.readouterr()
    before = sorted(tmp_path.iterdir())
    out = str(tmp_path / "seg.nii.gz")
    args = ["segment", str(image), "--support", str(support), "--weights", str(tiny_weights)]
    option = [str(tmp_path / "seg.png") if o == "OUT.png" else o for o in option]
    assert main(args + (option if "--out" in option else ["--out", out, *option])) == 2
    assert message in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before


def test_demo_refuses_a_bad_axis_and_a_failed_demo_leaves_nothing(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d1"), "--axis", "5"]) == 2
    assert "--axis must be 0, 1 or 2" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d2"), "--support-size", "0"]) == 2
    assert "support size and ensemble must be >= 1" in capsys.readouterr().err
    assert list((tmp_path / "d2").iterdir()) == []  # so a corrected rerun is not refused


def test_train_refuses_shares_outside_0_1_and_leaves_no_folder_for_a_refused_run(tmp_path, capsys):
    assert main(["train", str(tmp_path / "r1"), "--real-fraction", "1.5", "--steps", "1"]) == 2
    assert "--real-fraction is a share of episodes, between 0 and 1" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                str(tmp_path / "r2"),
                "--init-weights",
                str(tmp_path / "none.pt"),
                "--steps",
                "1",
                "--real-fraction",
                "0",
            ]
        )
        == 2
    )
    capsys.readouterr()
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--steps", "0"], "--steps must be 1 or more"),
        (["--val-every", "0"], "--val-every must be 1 or more"),
        (["--batch-size", "0"], "--batch-size must be 1 or more"),
        (["--grid", "36"], "the grid must be a multiple of 8 with 4 encoder widths"),
        (["--widths", "8"], "a network needs at least 2 encoder widths"),
        (["--lr", "-1"], "--lr must be above 0"),
        (["--workers", "-1"], "--workers must be 0 or more"),
    ],
)
def test_train_settings_that_cannot_train_are_refused_before_anything_is_written(
    tmp_path, capsys, options, message
):
    assert main(["train", str(tmp_path / "run"), "--real-fraction", "0", *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_into_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "run").write_text("x")
    assert main(["train", str(tmp_path / "run"), "--real-fraction", "0", "--steps", "1"]) == 2
    assert "is a file; the run folder must be a folder" in capsys.readouterr().err


def test_a_downloaded_file_that_is_not_the_weights_is_not_installed(tmp_path, capsys, monkeypatch):
    from napari_openseg.model import registry

    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "junk.pt").write_text("garbage")
    assert main(["weights", "download", "universeg-v1", "--url", (tmp_path / "junk.pt").as_uri()]) == 2
    assert "is not the universeg-v1 weights" in capsys.readouterr().err
    assert not registry.is_available("universeg-v1") and list((tmp_path / "cache").iterdir()) == []
    assert main(["weights", "download", "no-such-name"]) == 2
    assert "no weights are named 'no-such-name'" in capsys.readouterr().err


def test_support_outputs_must_be_npz_files_not_folders(tmp_path, nifti_pair, capsys):
    image, labels = nifti_pair
    build = ["support", "build", "--image", str(image), "--labels", str(labels), "--overwrite"]
    assert main([*build, "--out", str(tmp_path / "set.png")]) == 2
    assert "a support set is saved as a .npz file" in capsys.readouterr().err
    (tmp_path / "folder.npz").mkdir()
    assert main([*build, "--out", str(tmp_path / "folder.npz")]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert not (tmp_path / "set.png").exists()


def test_info_and_weights_list(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "napari-openseg" in out and "universeg-v1" in out and "research use only" in out


@needs_shared
def test_hippocampus_volume_from_shared_data(tmp_path, tiny_weights):
    data = shared_data_dir() / "msd_task04_hippocampus"
    image, labels = data / "imagesTr" / "hippocampus_001.nii.gz", data / "labelsTr" / "hippocampus_001.nii.gz"
    query = data / "imagesTr" / "hippocampus_003.nii.gz"
    support, out = tmp_path / "hippo.npz", tmp_path / "hippo_003.nii.gz"
    assert (
        main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)]) == 0
    )
    assert (
        main(
            [
                "segment",
                str(query),
                "--support",
                str(support),
                "--out",
                str(out),
                "--weights",
                str(tiny_weights),
                "--support-size",
                "4",
            ]
        )
        == 0
    )
    written, source = nib.load(str(out)), nib.load(str(query))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)


def test_a_volume_four_voxels_deep_on_its_x_axis_is_a_volume_not_rgb(tmp_path, tiny_weights, capsys):
    rng = np.random.default_rng(1)
    image = rng.normal(50, 10, (4, 16, 10)).astype(np.float32)  # read as "10 16 4": it looked like RGBA
    labels = np.zeros(image.shape, np.uint8)
    labels[1:3, 4:10, 2:8] = 1
    paths = tmp_path / "thin.nii.gz", tmp_path / "thin_labels.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(paths[0]))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(paths[1]))
    support = tmp_path / "support.npz"
    assert (
        main(["support", "build", "--image", str(paths[0]), "--labels", str(paths[1]), "--out", str(support)])
        == 0
    )
    out = tmp_path / "seg.nii.gz"
    assert (
        main(
            [
                "segment",
                str(paths[0]),
                "--support",
                str(support),
                "--out",
                str(out),
                "--weights",
                str(tiny_weights),
            ]
        )
        == 0
    )
    assert nib.load(str(out)).shape == (4, 16, 10)


def test_support_build_takes_each_requested_label_from_the_images_that_hold_it(tmp_path, capsys):
    rng = np.random.default_rng(2)
    paths = []
    for name, values in (("a", (1, 3)), ("b", (2, 3))):
        labels = np.zeros((6, 12, 12), np.uint8)
        for k, value in enumerate(values):
            labels[1 + 2 * k, 2:6, 2:6] = value
        for kind, data in (("img", rng.random((6, 12, 12)).astype(np.float32)), ("lab", labels)):
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}_{kind}.nii.gz"))
        paths += [
            "--image",
            str(tmp_path / f"{name}_img.nii.gz"),
            "--labels",
            str(tmp_path / f"{name}_lab.nii.gz"),
        ]
    out = tmp_path / "set.npz"
    assert main(["support", "build", *paths, "--label-values", "1", "2", "--out", str(out)]) == 0
    assert "label 1: 4, label 2: 4" in capsys.readouterr().out  # 1 from a alone, 2 from b alone
    assert (
        main(["support", "build", *paths, "--label-values", "1", "4", "--out", str(tmp_path / "x.npz")]) == 2
    )
    assert "label value 4 occurs in none of the --labels files" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_a_negative_seed_a_bad_axis_and_a_demo_into_a_file_get_messages(
    tmp_path, nifti_pair, tiny_weights, capsys
):
    image, labels = nifti_pair
    support = tmp_path / "support.npz"
    main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)])
    capsys.readouterr()
    base = ["segment", str(image), "--support", str(support), "--weights", str(tiny_weights)]
    assert main(base + ["--out", str(tmp_path / "s.nii.gz"), "--seed", "-1"]) == 2
    assert "the seed must be 0 or more" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "s.nii.gz"), "--axis", "3"]) == 2
    assert "--axis must be 0, 1 or 2" in capsys.readouterr().err
    assert not (tmp_path / "s.nii.gz").exists()
    (tmp_path / "taken").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "taken")]) == 2
    assert "is a file; --out names the folder" in capsys.readouterr().err


def test_segment_a_slice_range_and_the_auto_extent(tmp_path, nifti_pair, tiny_weights, capsys):
    image, labels = nifti_pair  # the NIfTI's third axis (6 slices) is the slice axis 0
    support = tmp_path / "support.npz"
    main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)])
    base = [
        "segment",
        str(image),
        "--support",
        str(support),
        "--weights",
        str(tiny_weights),
        "--support-size",
        "2",
    ]
    out = tmp_path / "range.nii.gz"
    assert main([*base, "--out", str(out), "--slices", "1:3", "--probabilities"]) == 0
    written = np.asarray(nib.load(str(out)).dataobj)
    probabilities = np.asarray(nib.load(str(tmp_path / "range_prob.nii.gz")).dataobj)
    assert not written[:, :, [0, 3, 4, 5]].any() and not probabilities[:, :, [0, 3, 4, 5]].any()
    assert probabilities[:, :, 1:3].any()
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "auto.nii.gz"), "--extent", "auto"]) == 0
    assert "slices kept per label (A:B, B not included): 1: " in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "bad.nii.gz"), "--slices", "2-4"]) == 2
    assert "written A:B" in capsys.readouterr().err and not (tmp_path / "bad.nii.gz").exists()


def test_support_build_with_a_background_label_then_segment_writes_the_estimate(
    tmp_path, tiny_weights, capsys
):
    import json

    rng = np.random.default_rng(0)
    image = rng.normal(50, 5, (6, 24, 24)).astype(np.float32)
    truth = np.zeros(image.shape, np.uint8)
    truth[:, 6:16, 6:16] = 1
    image[truth == 1] += 40
    strokes = np.zeros(image.shape, np.uint8)
    strokes[:, 10, 8:14] = 1  # a stroke through each structure
    strokes[:, 20, 2:22] = 2  # and one over the background
    paths = [tmp_path / f"{name}.npy" for name in ("img", "strokes")]
    for array, path in zip((image, strokes), paths):
        np.save(path, array)
    support = tmp_path / "support.npz"
    assert (
        main(
            [
                "support",
                "build",
                "--image",
                str(paths[0]),
                "--labels",
                str(paths[1]),
                "--out",
                str(support),
                "--background-label",
                "2",
            ]
        )
        == 0
    )
    assert "label 1: 6" in capsys.readouterr().out
    assert main(["support", "show", str(support)]) == 0
    assert "strokes (background label 2)" in capsys.readouterr().out
    out, report = tmp_path / "seg.npy", tmp_path / "seg.json"
    assert (
        main(
            [
                "segment",
                str(paths[0]),
                "--support",
                str(support),
                "--out",
                str(out),
                "--weights",
                str(tiny_weights),
                "--method",
                "pixel-classifier",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "label 1: expected Dice" in printed and "method: pixel-classifier" in printed
    task = json.loads(report.read_text())["outputs"][0]["tasks"]["1"]
    assert task["method"] == "pixel-classifier" and task["examples"] == 6 and task["expected_dice"] > 0.9
    segmented = np.load(out)
    assert (segmented == truth).mean() > 0.95  # unpainted structure pixels are found, not taken as background


def test_support_build_warns_when_masks_look_like_strokes(tmp_path, capsys):
    image = np.random.default_rng(0).normal(50, 5, (4, 24, 24)).astype(np.float32)
    scribble = np.zeros(image.shape, np.uint8)
    idx = np.arange(2, 22)
    scribble[:, idx, idx] = 1
    paths = [tmp_path / f"{name}.npy" for name in ("img", "scribble")]
    for array, path in zip((image, scribble), paths):
        np.save(path, array)
    assert (
        main(
            [
                "support",
                "build",
                "--image",
                str(paths[0]),
                "--labels",
                str(paths[1]),
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    assert "--background-label" in capsys.readouterr().err
