"""``openseg novelty train | seed | map`` on tiny NIfTI files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_openseg.cli import main
from napari_openseg.core.novelty.model import NoveltyModel
from napari_openseg.io import ImageData, read_image, write_image
from tests._novelty_data import sphere_volume

AFFINE = np.diag([1.5, 2.0, 2.5, 1.0])
AFFINE[:3, 3] = [10.0, -20.0, 5.0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    image, labels = sphere_volume()
    reference = ImageData(image, affine=AFFINE, header=nib.Nifti1Header())
    write_image(folder / "vol.nii.gz", image, reference)
    write_image(folder / "lab.nii.gz", labels, reference)
    blob = (image > 0.9).astype(np.uint8)
    write_image(folder / "seed.nii.gz", blob, reference)
    return folder


@pytest.fixture(scope="module")
def model_file(files):
    torch.set_num_threads(2)
    code = main(
        [
            "novelty",
            "train",
            "--image",
            str(files / "vol.nii.gz"),
            "--labels",
            str(files / "lab.nii.gz"),
            "--out",
            str(files / "model.pt"),
            "--epochs",
            "1",
            "--samples-per-volume",
            "1",
            "--batch-size",
            "1",
            "--roi",
            "32",
            "32",
            "64",
            "--embedding-dim",
            "8",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return files / "model.pt"


def test_train_writes_a_model_and_a_checkpoint(model_file, capsys):
    model = NoveltyModel.load(model_file)
    assert model.class_values == [0, 1, 2] and model.info["trained_steps"] == 1
    assert (model_file.parent / "model.ckpt.pt").is_file()
    assert "training" not in torch.load(model_file, weights_only=True)


def test_map_writes_fused_scores_and_segmentation_with_the_input_affine(model_file, files, capsys):
    scores = files / "scores" / "run 1"  # missing: made, with its parent
    out = files / "novelty.nii.gz"
    assert (
        main(
            [
                "novelty",
                "map",
                "--model",
                str(model_file),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(out),
                "--scores-out",
                str(scores),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "the threshold 0.700 flags" in capsys.readouterr().out  # NOVEL_THRESHOLD
    kinds = ("cosine", "distance", "appearance", "segmentation")
    for path in (
        out,
        files / "novelty_novel_region.nii.gz",
        *(scores / f"novelty_{k}.nii.gz" for k in kinds),
    ):
        assert np.allclose(nib.load(str(path)).affine, AFFINE), path
    fused = read_image(out).data
    region = read_image(files / "novelty_novel_region.nii.gz").data.astype(bool)
    assert region.any() and fused[region].min() > 0.7 and not (fused[~region] > 0.7).any()
    assert fused.shape == (32, 32, 64) and fused.dtype == np.float32
    assert 0 <= fused.min() and fused.max() <= 1
    assert set(np.unique(read_image(scores / "novelty_segmentation.nii.gz").data)) <= {0, 1, 2}
    # an existing output is refused unless --overwrite
    assert (
        main(
            [
                "novelty",
                "map",
                "--model",
                str(model_file),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "exists" in capsys.readouterr().err


def test_map_is_named_after_the_image_by_default(model_file, files, capsys, tmp_path):
    image = tmp_path / "patient 7.nii.gz"
    image.write_bytes((files / "vol.nii.gz").read_bytes())
    assert (
        main(
            [
                "novelty",
                "map",
                "--model",
                str(model_file),
                "--image",
                str(image),
                "--device",
                "cpu",
                "--novel-when",
                "unlike-every-class",
                "--scores-out",
                str(tmp_path),
                "--threshold",
                "0.5",
            ]
        )
        == 0
    )
    heat, region = tmp_path / "patient 7_novelty.nii.gz", tmp_path / "patient 7_novelty_novel_region.nii.gz"
    assert heat.is_file() and region.is_file()
    assert set(np.unique(read_image(region).data)) <= {0, 1}
    assert np.array_equal(read_image(region).data.astype(bool), read_image(heat).data > 0.5)
    assert not (tmp_path / "patient 7_novelty_appearance.nii.gz").exists()  # no intensity map was asked for
    assert (tmp_path / "patient 7_novelty_cosine.nii.gz").is_file()


def test_a_volume_of_another_modality_is_refused_or_matched_on_request(model_file, files, capsys, tmp_path):
    image = read_image(files / "vol.nii.gz")
    inverted = tmp_path / "inverted.nii.gz"  # dark where the training volume is bright: not the same contrast
    write_image(inverted, image.data.max() - image.data, image)
    base = ["novelty", "map", "--model", str(model_file), "--image", str(inverted), "--device", "cpu"]
    assert main(base) == 2
    assert "differ too much from the model's training volumes" in capsys.readouterr().err
    assert not (tmp_path / "inverted_novelty.nii.gz").exists()
    assert main([*base, "--intensity", "match"]) == 0
    assert "note: intensities matched to the model's training volumes" in capsys.readouterr().out


def test_seed_then_map_with_the_unknown_prototype(model_file, files, capsys):
    seeded = files / "seeded.pt"
    assert (
        main(
            [
                "novelty",
                "seed",
                "--model",
                str(model_file),
                "--image",
                str(files / "vol.nii.gz"),
                "--mask",
                str(files / "seed.nii.gz"),
                "--out",
                str(seeded),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert NoveltyModel.load(seeded).bank.unknown is not None
    assert NoveltyModel.load(model_file).bank.unknown is None  # the input model is untouched
    out = files / "seeded_novelty.npy"
    assert (
        main(
            [
                "novelty",
                "map",
                "--model",
                str(seeded),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(out),
                "--adapt-unknown",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    blob = read_image(files / "seed.nii.gz").data > 0
    fused = np.load(out)
    assert fused[blob].mean() > fused[~blob & (fused > 0)].mean()


def test_training_free_map_from_a_support_file(files, tiny_weights, capsys):
    from napari_openseg.core.support import build_support_set

    image, labels = sphere_volume()
    build_support_set(image, labels, axis=0).save(files / "support.npz")
    out = files / "free.nii.gz"
    assert (
        main(
            [
                "novelty",
                "map",
                "--support",
                str(files / "support.npz"),
                "--weights",
                str(tiny_weights),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert read_image(out).data.shape == (32, 32, 64)

    # One unseen structure painted on the mapped volume seeds the unknown prototype, which adapts on it.
    seeded = files / "free_seeded.nii.gz"
    assert (
        main(
            [
                "novelty",
                "map",
                "--support",
                str(files / "support.npz"),
                "--weights",
                str(tiny_weights),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(seeded),
                "--device",
                "cpu",
                "--seed-mask",
                str(files / "seed.nii.gz"),
                "--adapt-unknown",
                "2",
            ]
        )
        == 0
    )
    fused, blob = read_image(seeded).data, read_image(files / "seed.nii.gz").data != 0
    assert not np.allclose(fused, read_image(out).data)
    assert fused[blob].mean() > fused[~blob & (fused > 0)].mean()
    assert np.allclose(read_image(seeded).affine, AFFINE)

    half = np.zeros((32, 32, 64), np.uint8)
    half[:, :, :32] = 1
    write_image(files / "half.nii.gz", half, read_image(files / "vol.nii.gz"))
    masked = files / "free_masked.nii.gz"
    assert (
        main(
            [
                "novelty",
                "map",
                "--support",
                str(files / "support.npz"),
                "--weights",
                str(tiny_weights),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(masked),
                "--device",
                "cpu",
                "--mask",
                str(files / "half.nii.gz"),
            ]
        )
        == 0
    )
    assert np.all(read_image(masked).data[:, :, 32:] == 0) and read_image(masked).data[:, :, :32].max() > 0


def test_user_mistakes_get_a_message(files, capsys):
    assert (
        main(
            [
                "novelty",
                "train",
                "--image",
                str(files / "vol.nii.gz"),
                "--image",
                str(files / "vol.nii.gz"),
                "--labels",
                str(files / "lab.nii.gz"),
                "--out",
                str(files / "x.pt"),
            ]
        )
        == 2
    )
    assert "one --labels per --image" in capsys.readouterr().err
    assert (
        main(
            [
                "novelty",
                "train",
                "--image",
                str(files / "vol.nii.gz"),
                "--labels",
                str(files / "lab.nii.gz"),
                "--out",
                str(files / "x.pt"),
                "--roi",
                "30",
                "32",
                "64",
            ]
        )
        == 2
    )
    assert "divisible by 8" in capsys.readouterr().err
    assert (
        main(
            [
                "novelty",
                "map",
                "--model",
                str(files / "missing.pt"),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(files / "y.nii.gz"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "novelty",
                "map",
                "--support",
                str(files / "missing.npz"),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(files / "y.nii.gz"),
                "--adapt-unknown",
                "3",
            ]
        )
        == 2
    )
    assert "needs --seed-mask" in capsys.readouterr().err
    assert (
        main(
            [
                "novelty",
                "map",
                "--model",
                str(files / "missing.pt"),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(files / "y.nii.gz"),
                "--seed-mask",
                str(files / "seed.nii.gz"),
            ]
        )
        == 2
    )
    assert "openseg novelty seed" in capsys.readouterr().err
    free = [
        "novelty",
        "map",
        "--support",
        str(files / "missing.npz"),
        "--image",
        str(files / "vol.nii.gz"),
        "--out",
        str(files / "y.nii.gz"),
    ]
    assert main([*free, "--no-unknown", "--seed-mask", str(files / "seed.nii.gz")]) == 2
    assert "--no-unknown and --seed-mask contradict" in capsys.readouterr().err
    assert main([*free, "--adapt-unknown", "-2", "--seed-mask", str(files / "seed.nii.gz")]) == 2
    assert "adaptation steps must be >= 0" in capsys.readouterr().err
    assert main([*free[:-1], str(files / "y.png")]) == 2
    assert "not pictures" in capsys.readouterr().err
    assert not (files / "x.pt").exists() and not (files / "y.nii.gz").exists()


def test_adapting_a_model_without_an_unknown_and_a_scores_file_get_messages(model_file, files, capsys):
    trained = [
        "novelty",
        "map",
        "--model",
        str(model_file),
        "--image",
        str(files / "vol.nii.gz"),
        "--out",
        str(files / "z.nii.gz"),
    ]
    assert main([*trained, "--adapt-unknown", "5"]) == 2  # it did nothing, silently
    assert "has no unknown prototype to adapt" in capsys.readouterr().err
    assert main([*trained, "--scores-out", str(files / "vol.nii.gz")]) == 2
    assert "is a file; it names the folder" in capsys.readouterr().err
    assert not (files / "z.nii.gz").exists()
    assert main([*trained, "--adapt-unknown", "5", "--scores-out", str(files / "new" / "scores")]) == 2
    assert not (files / "new").exists()  # a folder made for a run that wrote nothing is removed again


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--support-size", "0", "support size must be >= 1"),
        ("--threshold", "1.5", "threshold must lie between 0 and 1"),
    ],
)
def test_training_free_map_refuses_bad_settings(
    files, tiny_weights, capsys, tmp_path, option, value, message
):
    from napari_openseg.core.support import build_support_set

    image, labels = read_image(files / "vol.nii.gz").data, read_image(files / "lab.nii.gz").data
    support = build_support_set(image, labels, axis=0, source="vol").save(tmp_path / "s.npz")
    assert (
        main(
            [
                "novelty",
                "map",
                "--support",
                str(support),
                "--image",
                str(files / "vol.nii.gz"),
                "--out",
                str(tmp_path / "n.nii.gz"),
                "--weights",
                str(tiny_weights),
                option,
                value,
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "n.nii.gz").exists()


def test_train_overwrite_starts_again_and_resume_says_which_settings_it_ignores(files, caplog, tmp_path):
    args = [
        "novelty",
        "train",
        "--image",
        str(files / "vol.nii.gz"),
        "--labels",
        str(files / "lab.nii.gz"),
        "--out",
        str(tmp_path / "m.pt"),
        "--epochs",
        "1",
        "--samples-per-volume",
        "1",
        "--batch-size",
        "1",
        "--roi",
        "32",
        "32",
        "64",
        "--embedding-dim",
        "8",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert main(args) == 2  # the model and its checkpoint exist
    assert main([*args, "--overwrite"]) == 0
    assert NoveltyModel.load(tmp_path / "m.pt").info["trained_steps"] == 1  # a new run, not a continued one
    with caplog.at_level("WARNING"):
        assert (
            main(
                [
                    *args[:-4],
                    "--embedding-dim",
                    "16",
                    "--device",
                    "cpu",
                    "--epochs",
                    "2",
                    "--resume",
                    "--overwrite",
                ]
            )
            == 0
        )
    assert "ignoring the new {'embedding_dim': 16}" in caplog.text
    model = NoveltyModel.load(tmp_path / "m.pt")
    assert model.info["trained_steps"] == 2 and model.info["settings"]["embedding_dim"] == 8
