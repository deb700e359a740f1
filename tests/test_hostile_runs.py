"""Runs against bad luck and bad inputs (issue 23, items 4-8): racing writers, outputs that are inputs,
long thin slices, empty and non-numeric arrays, failed writes, SIGTERM, NaN volumes, damaged support
entries, and novelty inputs checked before any work."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from napari_openseg import io
from napari_openseg.cli import main
from napari_openseg.core.novelty import free as novelty_free
from napari_openseg.core.novelty import volume_map as novelty_map
from napari_openseg.core.novelty.model import check_volume
from napari_openseg.core.propagate.propagation import propagate
from napari_openseg.core.segment.inference import segment
from napari_openseg.core.support import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SupportEntry,
    SupportSet,
    build_support_set,
    check_labels,
)
from napari_openseg.errors import OpenSegError
from tests._hostile import measure


@pytest.fixture
def volume_pair(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(50, 10, (24, 20, 6)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[4:12, 5:15, :] = 1
    paths = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([0.7, 0.7, 3.0, 1.0])), str(paths[0]))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(paths[1]))
    return paths


@pytest.fixture
def small_support():
    image = np.random.default_rng(1).random((4, 24, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[:, 6:16, 8:18] = 1
    return build_support_set(image, labels)


def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".partial-" in name or ".probe-" in name)


# ---------------------------------------------------------------- 4. the no-overwrite promise


def test_an_output_that_appears_during_the_run_is_never_replaced(
    tmp_path, volume_pair, tiny_weights, monkeypatch, capsys
):
    image, labels = volume_pair
    support, out = tmp_path / "s.npz", tmp_path / "seg.nii.gz"
    assert (
        main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)]) == 0
    )
    write_nifti = io._write_nifti

    def rival_first(tmp, data, reference):  # another run finishes the same output while this one writes
        out.write_bytes(b"the other run's result")
        write_nifti(tmp, data, reference)

    monkeypatch.setattr(io, "_write_nifti", rival_first)
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
        ]
    )
    assert code == 2 and "appeared while this run was writing it" in capsys.readouterr().err
    assert out.read_bytes() == b"the other run's result" and leftovers(tmp_path) == []


def test_two_processes_racing_for_one_output_cannot_both_win(tmp_path):
    out = tmp_path / "out.npy"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import numpy as np
        from napari_openseg import io
        from napari_openseg.errors import OpenSegError
        save = np.save
        def slow_save(handle, data, **kwargs):  # both runs pass the check before either finishes
            Path({str(tmp_path)!r}, sys.argv[1]).touch()
            while len(list(Path({str(tmp_path)!r}).glob("ready-*"))) < 2:
                time.sleep(0.01)
            save(handle, data, **kwargs)
        np.save = slow_save
        try:
            io.write_image({str(out)!r}, np.full(3, int(sys.argv[2])))
            print("wrote")
        except OpenSegError as err:
            print("refused", err)
    """)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"ready-{i}", str(i)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        for i in (1, 2)
    ]
    said = [run.communicate(timeout=300)[0] for run in runs]
    assert sorted(s.split()[0] for s in said) == ["refused", "wrote"]
    winner = 1 if said[0].startswith("wrote") else 2
    assert np.array_equal(np.load(out), np.full(3, winner)) and leftovers(tmp_path) == []


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, volume_pair, capsys):
    image, labels = volume_pair
    original = image.read_bytes()
    os.link(image, tmp_path / "hard.nii.gz")
    os.symlink(image, tmp_path / "soft.nii.gz")
    for out in (image, tmp_path / "hard.nii.gz", tmp_path / "soft.nii.gz"):
        code = main(
            ["propagate", "--image", str(image), "--prompt", str(labels), "--out", str(out), "--overwrite"]
        )
        assert code == 2 and f"is the input {image}" in capsys.readouterr().err
    code = main(
        [
            "support",
            "build",
            "--image",
            str(image),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "hard.nii.gz"),
            "--overwrite",
        ]
    )
    assert code == 2 and "the output must not replace an input" in capsys.readouterr().err
    assert image.read_bytes() == original and (tmp_path / "soft.nii.gz").is_symlink()


def test_a_dangling_link_counts_as_an_existing_output(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "link.npy")
    with pytest.raises(OpenSegError, match="exists; choose another name or pass --overwrite"):
        io.write_image(tmp_path / "link.npy", np.zeros(3))
    io.write_image(tmp_path / "link.npy", np.zeros(3), overwrite=True)  # replaces the link, not its target
    assert not (tmp_path / "link.npy").is_symlink() and not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------- 5. long thin slices


def test_a_4_by_20000_image_is_segmented_without_a_20000_square(tmp_path):
    import tifffile

    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((4, 20000)).astype(np.float32))
    setup = f"""
        import numpy as np, torch
        from napari_openseg.core.segment.inference import segment
        from napari_openseg.core.support import build_support_set
        from napari_openseg.io import read_image
        from napari_openseg.model.universeg import build_network
        torch.manual_seed(0)
        net = build_network((8, 8, 8), grid_size=32).eval()
        image = np.random.default_rng(1).random((2, 8, 40)).astype(np.float32)
        labels = np.zeros(image.shape, np.uint8)
        labels[:, 2:6, 10:30] = 1
        support = build_support_set(image, labels)
        strip = read_image({str(path)!r}).data
        segment(image[0], support, net, device="cpu")  # warm-up on 8 x 40: first-call allocations do not count
    """
    outcome = measure("result = list(segment(strip, support, net, device='cpu').labels.shape)", setup)
    assert outcome["error"] is None and outcome["result"] == [4, 20000]
    assert outcome["growth_mib"] < 128  # 3.5 GB before (a 20000 x 20000 padded square)


# ---------------------------------------------------------------- 6. empty and non-numeric arrays


def test_empty_arrays_and_strings_get_messages_at_the_boundary(tmp_path, small_support, tiny_net):
    nib.save(nib.Nifti1Image(np.zeros((0, 5, 5), np.float32), np.eye(4)), str(tmp_path / "empty.nii.gz"))
    with pytest.raises(OpenSegError, match="holds no voxels"):
        io.read_image(tmp_path / "empty.nii.gz")
    with pytest.raises(OpenSegError, match=re.escape("the image is empty (shape (0, 16))")):
        segment(np.zeros((0, 16), np.float32), small_support, tiny_net, device="cpu")
    with pytest.raises(OpenSegError, match="the image is empty"):
        propagate(np.zeros((3, 0, 8), np.float32), np.zeros((3, 0, 8), np.uint8), tiny_net, device="cpu")
    with pytest.raises(OpenSegError, match="the image is empty"):
        build_support_set(np.zeros((0, 8)), np.zeros((0, 8), np.uint8))
    with pytest.raises(OpenSegError, match="the volume is empty"):
        check_volume(np.zeros((4, 0, 4)))
    with pytest.raises(OpenSegError, match="images must hold real-valued numbers, got <U1 values"):
        segment(np.full((8, 8), "a"), small_support, tiny_net, device="cpu")
    with pytest.raises(OpenSegError, match="got <U1 values"):
        build_support_set(np.full((8, 8, 3), "a"), np.ones((8, 8), np.uint8))


def test_segment_takes_a_support_file_and_names_what_it_cannot_take(tmp_path, small_support, tiny_net):
    path = small_support.save(tmp_path / "s.npz")
    image = np.random.default_rng(2).random((24, 24)).astype(np.float32)
    from_file = segment(image, str(path), tiny_net, device="cpu")  # an AttributeError before
    assert np.array_equal(from_file.labels, segment(image, small_support, tiny_net, device="cpu").labels)
    with pytest.raises(
        OpenSegError, match="support must be a SupportSet or the path of a support-set file, got int"
    ):
        segment(image, 42, tiny_net, device="cpu")


def hand_made(path, image, mask=None, label=1):
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "entries": [{"label": label}]}
    mask = np.ones(image.shape, bool) if mask is None else mask
    np.savez(path, openseg_support=np.array(json.dumps(meta)), image_0=image, mask_0=mask)
    return path


@pytest.mark.parametrize(
    "image, mask, label, message",
    [
        (np.zeros((0, 0), np.float32), None, 1, "entry 0 is empty (shape (0, 0))"),
        (np.full((4, 4), 0.5 + 0.5j), None, 1, "has an image of complex128 values"),
        (np.full((4, 4), 1e30, np.float32), None, 1, "has image values from 1e+30 to 1e+30"),
        (
            np.full((4, 4), 0.5, np.float32),
            np.full((4, 4), 7, np.uint8),
            1,
            "has a mask of uint8 values other than 0 and 1",
        ),
        (np.full((4, 4), 0.5, np.float32), None, 2**64, "has label value 18446744073709551616"),
        (np.full((4, 4), 0.5, np.float32), None, 1.5, "has label value 1.5"),
    ],
)
def test_support_entries_that_cannot_be_used_are_refused_on_load(tmp_path, image, mask, label, message):
    with pytest.raises(OpenSegError, match=re.escape(message)):
        SupportSet.load(hand_made(tmp_path / "s.npz", image, mask, label))


def test_float_labels_at_or_above_2_63_are_named_not_called_negative():
    with pytest.raises(
        OpenSegError, match=re.escape("label value 9223372036854775808 is beyond 64-bit labels")
    ):
        check_labels(np.array([[0.0, 2.0**63]]))
    assert check_labels(np.array([[0.0, 2.0**62]])).max() == 2**62


# ---------------------------------------------------------------- 7. write failures and SIGTERM


def test_a_full_disk_gives_one_line_and_leaves_nothing(tmp_path, volume_pair, monkeypatch, capsys):
    image, labels = volume_pair

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    out = tmp_path / "s.npz"
    assert main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "could not write" in err
        and "(No space left on device); nothing was written" in err
    )
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_folder_that_refuses_new_files_is_found_before_any_work(tmp_path, volume_pair, monkeypatch, capsys):
    image, _ = volume_pair
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")  # were it read first, its error would come first
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code = main(
        [
            "support",
            "build",
            "--image",
            str(broken),
            "--labels",
            str(broken),
            "--out",
            str(tmp_path / "s.npz"),
        ]
    )
    assert code == 2 and f"cannot write in {tmp_path} (Read-only file system)" in capsys.readouterr().err


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders"
)
def test_a_read_only_folder_is_found_before_any_work(tmp_path, volume_pair, capsys):
    image, labels = volume_pair
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code = main(
            [
                "support",
                "build",
                "--image",
                str(image),
                "--labels",
                str(labels),
                "--out",
                str(folder / "s.npz"),
            ]
        )
        assert code == 2 and "cannot write in" in capsys.readouterr().err
    finally:
        folder.chmod(0o755)


def run_cli_killed_while_writing(tmp_path, args: list[str], patch: str) -> subprocess.CompletedProcess:
    """``openseg ARGS`` in a fresh process whose writer (``patch``) sends it SIGTERM halfway through."""
    script = "\n".join(
        [
            "import os, signal, sys",
            "import numpy as np",
            "from napari_openseg import io",
            "from napari_openseg.cli import main",
            textwrap.dedent(patch),
            f"sys.exit(main({args!r}))",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_sigterm_during_a_write_cleans_up_like_ctrl_c(tmp_path, volume_pair, tiny_weights):
    image, labels = volume_pair
    support = tmp_path / "s.npz"
    kill_midway = """
        real = np.savez_compressed
        def killed_midway(handle, **arrays):
            handle.write(b"half a support set")
            os.kill(os.getpid(), signal.SIGTERM)
            real(handle, **arrays)
        np.savez_compressed = killed_midway
    """
    done = run_cli_killed_while_writing(
        tmp_path,
        ["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)],
        kill_midway,
    )
    assert done.returncode == 143 and done.stderr.strip().endswith(
        "no file was left half-written (outputs finished before stay)"
    )
    assert "Traceback" not in done.stderr and not support.exists() and leftovers(tmp_path) == []
    assert (
        main(["support", "build", "--image", str(image), "--labels", str(labels), "--out", str(support)]) == 0
    )
    out = tmp_path / "seg.nii.gz"
    kill_in_nifti = """
        real = io._write_nifti
        def killed_midway(tmp, data, reference):
            tmp.write_bytes(b"half a volume")
            os.kill(os.getpid(), signal.SIGTERM)
            real(tmp, data, reference)
        io._write_nifti = killed_midway
    """
    done = run_cli_killed_while_writing(
        tmp_path,
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
        ],
        kill_in_nifti,
    )
    assert done.returncode == 143 and "cancelled" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_the_sigterm_handler_is_only_held_while_a_command_runs(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- 8. NaN volumes, novelty inputs


def test_an_all_nan_volume_is_refused_by_every_door(small_support, tiny_net):
    volume = np.full((4, 24, 24), np.nan, np.float32)
    prompt = np.zeros(volume.shape, np.uint8)
    prompt[1, 5:10, 5:10] = 1
    with pytest.raises(OpenSegError, match="holds no finite values"):
        segment(volume, small_support, tiny_net, device="cpu")
    with pytest.raises(
        OpenSegError, match="holds no finite values"
    ):  # drew objects at confidence 0.88 before
        propagate(volume, prompt, tiny_net, device="cpu")
    with pytest.raises(OpenSegError, match="holds no finite values"):
        check_volume(volume)
    with pytest.raises(OpenSegError, match="holds no finite values"):
        build_support_set(volume, prompt)


def test_propagation_draws_nothing_on_blank_slices_and_stops_there(tiny_net, caplog):
    rng = np.random.default_rng(3)
    volume = rng.random((10, 24, 24)).astype(np.float32)
    volume[:, 6:16, 6:16] += 2.0
    volume[6] = np.nan  # a slice of padding
    prompt = np.zeros(volume.shape, np.uint8)
    prompt[3, 6:16, 6:16] = 1
    result = propagate(volume, prompt, tiny_net, device="cpu", stop_confidence=0.0, min_area=0.0)
    assert not result.labels[6:].any()  # the blank slice ends the forward front
    assert np.isnan(result.confidence[0, 6:]).all() and not np.isnan(result.confidence[0, 4:6]).any()
    assert "hold no finite values (6)" in caplog.text


def test_novelty_masks_and_seeds_are_checked_before_any_work(small_support, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(novelty_free, "InContextEmbedder", no_work)
    monkeypatch.setattr(novelty_map.NoveltyModel, "load", no_work)
    volume = np.random.default_rng(4).random((6, 24, 24)).astype(np.float32)
    wrong = np.ones((6, 24, 23), bool)
    with pytest.raises(OpenSegError, match=re.escape("mask of shape (6, 24, 23) in array order")):
        novelty_free.training_free_novelty(volume, small_support, mask=wrong)
    with pytest.raises(
        OpenSegError, match=re.escape("the unknown seed mask of shape (6, 24, 23) in array order")
    ):
        novelty_free.training_free_novelty(volume, small_support, unknown_seed=(volume, wrong))
    with pytest.raises(OpenSegError, match="the unknown seed mask is empty"):
        novelty_free.training_free_novelty(
            volume, small_support, unknown_seed=(volume, np.zeros(volume.shape))
        )
    with pytest.raises(OpenSegError, match=re.escape("mask of shape (6, 24, 23) in array order")):
        list(novelty_map.iter_novelty_map(volume, "model.pt", mask=wrong))


def test_novelty_seed_checks_the_mask_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from napari_openseg.core.novelty import model as novelty_model

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(novelty_model.NoveltyModel, "load", no_work)
    np.save(tmp_path / "vol.npy", np.random.default_rng(5).random((6, 24, 24)).astype(np.float32))
    np.save(tmp_path / "mask.npy", np.ones((6, 24, 20), np.uint8))
    code = main(
        [
            "novelty",
            "seed",
            "--model",
            str(tmp_path / "m.pt"),
            "--image",
            str(tmp_path / "vol.npy"),
            "--mask",
            str(tmp_path / "mask.npy"),
            "--out",
            str(tmp_path / "m2.pt"),
        ]
    )
    assert (
        code == 2
        and "does not match the volume of shape (6, 24, 24) in array order" in capsys.readouterr().err
    )


def test_unit_support_entries_made_in_code_follow_the_same_rules(small_support):
    bad = SupportEntry(np.full((4, 4), 3.0, np.float32), np.ones((4, 4), bool), 1, source="script")
    with pytest.raises(
        OpenSegError, match=re.escape("has image values from 3 to 3; support images are normalised")
    ):
        SupportSet([bad]).validate()
