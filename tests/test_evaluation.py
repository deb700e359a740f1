"""`openseg evaluate` on a 2D picture folder and on a NIfTI (MSD layout) folder, made here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_openseg.cli import main
from napari_openseg.core.pixel_classifier import PixelClassifier, pixel_features
from napari_openseg.errors import OpenSegError
from napari_openseg.evaluation.baselines import label_prior
from napari_openseg.evaluation.data import SINGLE_VOLUME_GAP, find_folder, single_volume_split, split_cases
from napari_openseg.evaluation.evaluate import METHODS, evaluate, iter_evaluate
from tests.conftest import needs_shared

pytest.importorskip("sklearn")
iio = pytest.importorskip("imageio.v3")


def disk_and_square(shape, rng, jitter=2):
    """An image with a bright disk (label 1) and a dark square (label 2) at nearly fixed places."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h // 3 + rng.integers(-jitter, jitter + 1), w // 3 + rng.integers(-jitter, jitter + 1)
    labels = np.zeros(shape, np.uint8)
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (min(h, w) // 6) ** 2] = 1
    labels[h // 2 + 4 : h // 2 + 12, w // 2 + 4 : w // 2 + 12] = 2
    image = 100 + 10 * rng.standard_normal(shape)
    image[labels == 1] += 120
    image[labels == 2] -= 80
    return image, labels


@pytest.fixture
def picture_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "pictures"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(8):
        image, labels = disk_and_square((40, 48), rng)
        image = np.clip(image, 0, 255).astype(np.uint8)
        if i % 2:  # half of them RGB, as users' folders mix both
            image = np.stack([image, image, image], axis=-1)
        iio.imwrite(root / "images" / f"case{i}.png", image)
        iio.imwrite(root / "masks" / f"case{i}.png", labels)
    iio.imwrite(root / "images" / "orphan.png", np.zeros((8, 8), np.uint8))  # no mask: ignored
    return root


@pytest.fixture
def nifti_folder(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(7):
        zz, yy, xx = np.mgrid[:16, :20, :24]
        labels = np.zeros((16, 20, 24), np.uint8)
        labels[(zz - 8) ** 2 + (yy - 8) ** 2 + (xx - 8) ** 2 <= 16] = 1
        labels[4:10, 12:17, 14:20] = 2
        image = (50 + 5 * rng.standard_normal(labels.shape) + 60 * (labels == 1) - 30 * (labels == 2)).astype(
            np.float32
        )
        for array, folder in ((image, "imagesTr"), (labels, "labelsTr")):
            nib.save(nib.Nifti1Image(array, np.eye(4)), str(root / folder / f"subject_{i:03d}.nii.gz"))
    return root


def test_evaluate_picture_folder_writes_the_json_contract(picture_folder, tiny_weights, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(
        [
            "evaluate",
            str(picture_folder),
            "--support-size",
            "2",
            "--ensemble",
            "2",
            "--weights",
            str(tiny_weights),
            "--seed",
            "3",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    assert "mean over tasks" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["layout"] == "2d" and report["settings"]["support_size"] == 2
    assert report["settings"]["cases"] == 8 and report["settings"]["split"] == "by case"
    assert set(report["tasks"]) == {"label_1", "label_2"}
    support, queries = split_cases([f"case{i}" for i in range(8)])
    for task in report["tasks"].values():
        assert set(METHODS) <= set(task)
        for method in METHODS:
            assert {"mean", "std", "n"} <= set(task[method]) <= {"mean", "std", "n", "estimate"}
            assert task[method]["n"] == len(queries)
            assert 0.0 <= task[method]["mean"] <= 1.0
        assert task["support_pool"] == len(support)
    # Intensity separates both structures and they barely move: these baselines must nearly solve it.
    assert report["tasks"]["label_1"]["pixel_classifier"]["mean"] > 0.85
    assert report["tasks"]["label_2"]["label_prior"]["mean"] > 0.85
    assert set(report["summary"]) == set(METHODS)
    # One validation case: a pool of one entry, too few to cross-validate, so the engine ran the network.
    for task in report["tasks"].values():
        assert task["support_pool"] == 1 and task["model_methods"] == {"network": len(queries)}
        assert "estimate" not in task["model"]


def test_evaluate_nifti_folder_slices_every_axis(nifti_folder, tiny_weights, tmp_path):
    report = evaluate(nifti_folder, str(tiny_weights), support_size=3, max_queries=4, seed=0)
    assert report.settings["layout"] == "msd"
    assert set(report.tasks) == {f"label_{v}/axis_{a}" for v in (1, 2) for a in (0, 1, 2)}
    scores = report.task_scores("label_1/axis_0")
    assert scores["model"]["n"] == 4 and scores["label_prior"]["n"] == 4
    # three entries per draw: cross-validated, and a bright ball is easy for the pixel classifier
    assert scores["pixel_classifier"]["estimate"] > 0.8 and scores["pixel_classifier"]["mean"] > 0.8
    assert "estimate_error" in report.summary()["model"] and "meas / est" in report.estimate_table()
    # label 2 is a box at a fixed place in every subject: the prior reproduces it on all axes.
    for axis in range(3):
        assert report.task_scores(f"label_2/axis_{axis}")["label_prior"]["mean"] > 0.9
    same = evaluate(nifti_folder, str(tiny_weights), support_size=3, max_queries=4, seed=0)
    assert same.to_dict() == report.to_dict()  # seeded


def test_progress_comes_after_every_batch_so_that_cancel_stops_within_a_task(nifti_folder, tiny_weights):
    steps = []
    generator = iter_evaluate(
        nifti_folder,
        str(tiny_weights),
        support_size=2,
        batch_size=1,
        max_queries=3,
        methods=["model"],
        label_values=[1],
        axes=[0],
    )
    try:
        while True:
            steps.append(next(generator))
    except StopIteration as stop:
        report = stop.value
    tasks = report.to_dict()["tasks"]
    queries = sum(task["model"]["n"] for task in tasks.values())
    within = [s for s in steps if s.stage.startswith("evaluating ")]
    assert len(tasks) == 1 and queries == 3 and len(within) == queries  # one record per batch of one query
    assert all(s.done == 0 for s in within)  # the task counts as done only at its end


def test_single_volume_is_split_by_disjoint_slice_ranges(tmp_path, tiny_weights):
    nib = pytest.importorskip("nibabel")
    support, queries = single_volume_split(np.arange(10, 50))
    assert len(queries) == 12 and queries.min() > 10 and queries.max() < 49
    assert np.all(np.abs(support[:, None] - queries[None]).min(axis=1) > SINGLE_VOLUME_GAP)
    root = tmp_path / "one"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[3:27, 8:22, 8:22] = 1
    image = np.random.default_rng(0).random(labels.shape).astype(np.float32) + labels
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / "one.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(root / "labelsTr" / "one.nii.gz"))
    report = evaluate(root, str(tiny_weights), support_size=4, methods=["label_prior"])
    # NIfTI axes are reversed on read: the 24-slice extent is array axis 2; its central 30 % are queries.
    assert report.task_scores("label_1/axis_2")["label_prior"]["n"] == 8
    assert report.tasks["label_1/axis_2"]["support_pool"] == 6  # slices 3-5 and 24-26
    # Along the 14-slice axes no support slice lies far enough from the queries: no task, no leak.
    assert "label_1/axis_0" not in report.tasks
    assert report.settings["cases"] == 1 and report.settings["split"] == "by slice"
    assert "support split does not apply" in report.split_note()


def msd_folder(root, names, shape=(12, 20, 20), box=(slice(2, 10), slice(5, 15))):
    nib = pytest.importorskip("nibabel")
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for k, name in enumerate(names):
        labels = np.zeros(shape, np.uint8)
        labels[(*box, slice(4 + k % 3, 14 + k % 3))] = 1
        image = np.random.default_rng(k).random(shape).astype(np.float32) + labels
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(root / "labelsTr" / f"{name}.nii.gz"))
    return root


def test_the_report_says_where_support_really_came_from_and_which_queries_are_not_new(tmp_path, tiny_weights):
    # three cases: none falls in validation, so the support comes from train
    three = evaluate(
        msd_folder(tmp_path / "three", ["a", "b", "c"]),
        str(tiny_weights),
        support_size=64,
        methods=["label_prior"],
        axes=[0],
    )
    assert three.settings["support_split"] == "val" and three.settings["support_from"] == "train"
    note = three.split_note()
    assert "support from the train cases" in note and "no case fell in val" in note
    assert "used their whole pool once" in note  # S = 64 is more than any pool here
    # a training subject of the bundled weights as the one case: flagged
    one = msd_folder(
        tmp_path / "seen", ["hippocampus_001"], shape=(30, 20, 20), box=(slice(3, 27), slice(5, 15))
    )
    seen = evaluate(one, str(tiny_weights), support_size=2, methods=["label_prior"])
    assert seen.settings["queries_in_bundled_training"] == ["hippocampus_001"]
    assert "1 query case(s) were training or selection cases of the bundled weights" in seen.split_note()
    assert three.settings["queries_in_bundled_training"] == []


def test_a_method_named_twice_counts_once_and_labels_without_a_task_are_named(nifti_folder, tiny_weights):
    report = evaluate(
        nifti_folder,
        str(tiny_weights),
        support_size=2,
        max_queries=2,
        axes=[0],
        methods=["label_prior", "label_prior"],
        label_values=[1, 9],
    )
    assert report.settings["methods"] == ["label_prior"]
    assert report.task_scores("label_1/axis_0")["label_prior"]["n"] == 2
    assert report.settings["labels_without_task"] == [9]
    assert "label value(s) 9: no task" in report.split_note()


def test_an_unsaved_network_is_named_by_its_kind(picture_folder, tiny_net):
    report = evaluate(picture_folder, tiny_net, support_size=2, methods=["label_prior"])
    assert report.settings["weights"] == "an unsaved UniverSeg network"


@needs_shared
def test_the_bundled_weights_cases_are_the_train_and_val_split_of_the_full_folder():
    from napari_openseg.evaluation.data import BUNDLED_WEIGHTS_CASES
    from napari_openseg.training.splits import hippocampus_splits

    splits = hippocampus_splits()
    assert BUNDLED_WEIGHTS_CASES == set(splits["train"]) | set(splits["val"])


def test_baselines_directly():
    rng = np.random.default_rng(0)
    from napari_openseg.core.support import build_support_set

    image, labels = disk_and_square((40, 48), rng)
    support = build_support_set(image, labels).task(1)
    prior = label_prior(support, (40, 48), grid=32)
    assert prior.shape == (40, 48) and prior.max() <= 1.0
    assert ((prior >= 0.5) == (labels == 1)).mean() > 0.97
    assert pixel_features(image).shape == (40, 48, 21)
    query, truth = disk_and_square((40, 48), rng)
    from napari_openseg.core.preprocess import normalize_intensity

    features = np.concatenate([pixel_features(e.image).reshape(-1, 21) for e in support])
    classifier = PixelClassifier(seed=0).fit(features, np.concatenate([e.mask.reshape(-1) for e in support]))
    prob = classifier.predict_map(pixel_features(normalize_intensity(query)))
    assert ((prob >= 0.5) == (truth == 1)).mean() > 0.97


def test_evaluate_refuses_bad_folders_and_options(tmp_path, picture_folder, tiny_weights, capsys):
    with pytest.raises(OpenSegError, match="images/ \\+ masks/"):
        find_folder(tmp_path)
    with pytest.raises(OpenSegError, match="support size"):
        evaluate(picture_folder, str(tiny_weights), support_size=0)
    existing = tmp_path / "taken.json"
    existing.write_text("{}")
    assert (
        main(["evaluate", str(picture_folder), "--weights", str(tiny_weights), "--json", str(existing)]) == 2
    )
    assert "exists" in capsys.readouterr().err and existing.read_text() == "{}"


def test_evaluate_cli_label_and_method_subsets(picture_folder, tiny_weights, tmp_path):
    out = tmp_path / "subset.json"
    assert (
        main(
            [
                "evaluate",
                str(picture_folder),
                "--weights",
                str(tiny_weights),
                "--label-values",
                "2",
                "--methods",
                "model",
                "label_prior",
                "--max-queries",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert list(report["tasks"]) == ["label_2"]
    assert set(report["summary"]) == {"model", "label_prior"}
    assert report["tasks"]["label_2"]["model"]["n"] == 1
