"""The task bank: licence classes, hashed splits, the loader, and what training may see."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from napari_openseg.training.incontext.episodes import draw_task, validation_episodes
from napari_openseg.training.incontext.trainer import TrainConfig, real_banks
from napari_openseg.training.splits import shared_data_dir
from napari_openseg.training.taskbank import (
    MANIFEST,
    DataSet,
    build_task_bank,
    discover,
    hashed_split,
    licence_class,
    load_manifest,
    set_cases,
    trainable_sets,
)


@pytest.mark.parametrize(
    ("licence", "expected"),
    [
        ("CC0-1.0", "permissive"),
        ("CC-BY-4.0", "permissive"),
        ("CC-BY-SA-4.0", "permissive"),
        ("Apache-2.0", "permissive"),
        ("BSD-3-Clause", "permissive"),
        ("CC-BY-NC-SA-4.0", "research"),
        ("CC-BY-ND-4.0", "research"),
        ("research use (DRIVE registration)", "research"),
        ("not stated (research use)", "research"),
        ("unlisted", "research"),
        ("GPL-3.0", "research"),
    ],
)
def test_licence_classes(licence, expected):
    assert licence_class(licence) == expected


def test_the_manifest_classes_research_sets_as_research():
    sets = load_manifest()
    research = {name for name, s in sets.items() if s.licence_class == "research"}
    assert {"monuseg_nuclei", "lgg_flair_volumes", "drive_vessels", "em_membranes", "epfl_em_psd"} <= research
    permissive = {name for name, s in sets.items() if s.licence_class == "permissive"}
    assert permissive == {
        "dsb2018_nuclei",
        "hc18_fetal_head",
        "usgra_ultrasound",
        "chase_db1_vessels",
        "msd_task04_hippocampus",
        "totalsegmentator_examples",
        "totalsegmentator_examples_mr",
    }


def test_hashed_splits_are_stable_and_near_their_fractions():
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    splits = [hashed_split("s", f"case{i}", fractions) for i in range(3000)]
    assert splits == [hashed_split("s", f"case{i}", fractions) for i in range(3000)]
    shares = {k: splits.count(k) / len(splits) for k in fractions}
    assert all(abs(shares[k] - fractions[k]) < 0.03 for k in fractions), shares
    # another set name gives an independent split
    other = [hashed_split("t", f"case{i}", fractions) for i in range(3000)]
    assert sum(a != b for a, b in zip(splits, other)) > 1000


def test_cases_group_stems_and_pins_win():
    hc18 = load_manifest()["hc18_fetal_head"]
    assert hc18.case_of("100_2HC") == hc18.case_of("100_HC") == "100"
    assert hc18.split_of("100_2HC") == hc18.split_of("100_HC")
    pinned = DataSet("x", "2d", "CC0-1.0", assigned={"a": "test"})
    assert pinned.split_of("a") == "test"
    assert DataSet("x", "2d", "CC0-1.0", fixed_split="val").split_of("anything") == "val"


def _picture_set(root: Path, name: str, stems: list[str], value: int = 1) -> None:
    (root / name / "images").mkdir(parents=True)
    (root / name / "masks").mkdir(parents=True)
    rng = np.random.default_rng(len(stems))
    for stem in stems:
        image = rng.integers(0, 255, (40, 48), dtype=np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        mask[10:25, 12:30] = value
        iio.imwrite(root / name / "images" / f"{stem}.png", image)
        iio.imwrite(root / name / "masks" / f"{stem}.png", mask)


@pytest.fixture
def tiny_bank_dir(tmp_path):
    stems = [f"{i:03d}_HC" for i in range(12)]
    _picture_set(tmp_path, "hc18_fetal_head", stems)  # permissive in the manifest
    _picture_set(tmp_path, "monuseg_nuclei", [f"T{i}_y0000_x0000" for i in range(12)])  # research
    _picture_set(tmp_path, "someone_elses_set", [f"s{i}" for i in range(12)])  # not in the manifest
    return tmp_path


def test_splits_do_not_move_when_a_file_is_added(tiny_bank_dir):
    dataset = load_manifest()["hc18_fetal_head"]
    before = set_cases(dataset, tiny_bank_dir)
    _picture_set(tiny_bank_dir / "extra", "hc18_fetal_head", ["500_HC"])
    for sub in ("images", "masks"):
        (tiny_bank_dir / "extra" / "hc18_fetal_head" / sub / "500_HC.png").rename(
            tiny_bank_dir / "hc18_fetal_head" / sub / "500_HC.png"
        )
    after = set_cases(dataset, tiny_bank_dir)
    for split, stems in before.items():
        assert set(stems) <= set(after[split])
    assert sum(map(len, after.values())) == sum(map(len, before.values())) + 1


def test_research_and_unlisted_sets_never_reach_bundled_training(tiny_bank_dir):
    sets = discover(tiny_bank_dir)
    assert {s.name: s.licence_class for s in sets} == {
        "hc18_fetal_head": "permissive",
        "monuseg_nuclei": "research",
        "someone_elses_set": "research",
    }
    assert [s.name for s in trainable_sets(sets)] == ["hc18_fetal_head"]
    assert len(trainable_sets(sets, "all")) == 3
    config = TrainConfig(grid=32, task_bank="permissive")
    train, val = real_banks(config, tiny_bank_dir)
    assert train.families() == ["hc18_fetal_head"]
    assert len(train.images) == len(set_cases(sets[0], tiny_bank_dir)["train"])
    assert set(val.families()) <= {"hc18_fetal_head", "monuseg_nuclei", "someone_elses_set"}
    assert "monuseg_nuclei" not in train.families()


def test_the_picture_bank_holds_grid_images_and_masks(tiny_bank_dir):
    dataset = load_manifest()["hc18_fetal_head"]
    bank = build_task_bank([dataset], "train", 32, tiny_bank_dir)
    (task,) = bank.tasks
    assert bank.images.shape[1:] == (1, 32, 32) and task.masks.shape[1:] == (1, 32, 32)
    assert task.name == "hc18_fetal_head/label1/axis0" and len(task) == len(bank.images)
    # each image is its own case here, so every entry has its own subject
    assert len(np.unique(task.subjects)) == len(task)
    images, masks = bank.entries(task, [0])
    assert 0 < masks.mean() < 0.5 and images.dtype == masks.dtype


def test_family_sampling_gives_families_equal_weight(tiny_bank_dir):
    from dataclasses import replace

    bank = build_task_bank(discover(tiny_bank_dir), "train", 32, tiny_bank_dir)
    many = [replace(bank.tasks[0], label=v) for v in range(2, 12)]  # one family with 11 tasks
    bank.tasks = bank.tasks + many
    bank._by_family = None
    rng = np.random.default_rng(0)
    drawn = [draw_task(bank, rng, "family").family for _ in range(3000)]
    shares = {f: drawn.count(f) / len(drawn) for f in bank.families()}
    assert all(abs(share - 1 / 3) < 0.04 for share in shares.values()), shares
    by_task = [draw_task(bank, rng, "task").family for _ in range(3000)]
    assert by_task.count(bank.tasks[0].family) / 3000 > 0.7
    sets = validation_episodes(bank, 2, per_task=8, synthetic=0, per_family=5)
    assert {f: len(e.query) for f, e in sets.items()} == {f: 5 for f in bank.families()}


def test_every_manifest_set_is_present_with_its_licence(request):
    data_dir = shared_data_dir()
    if data_dir is None:
        pytest.skip("../shared/data is not present")
    manifest = json.loads(MANIFEST.read_text())["sets"]
    for name, entry in manifest.items():
        folder = data_dir / name
        if not folder.is_dir():
            continue  # a set may be removed; its manifest entry then does nothing
        provenance = (folder / "PROVENANCE.md").read_text().lower()
        if licence_class(entry["licence"]) == "permissive":
            # the licence named in the manifest is the one the provenance states
            spelled = entry["licence"].lower().replace("-", " ").replace(" 4.0", "").replace(" 1.0", "")
            assert spelled.split()[0] in provenance.replace("-", " "), name
            assert "non-commercial" not in provenance and "research only" not in provenance, name


def test_the_hippocampus_keeps_the_split_the_bundled_weights_trained_with():
    data_dir = shared_data_dir()
    if data_dir is None:
        pytest.skip("../shared/data is not present")
    from napari_openseg.evaluation.data import BUNDLED_WEIGHTS_CASES

    hippocampus = load_manifest()["msd_task04_hippocampus"]
    cases = set_cases(hippocampus, data_dir)
    assert not set(cases["test"]) & BUNDLED_WEIGHTS_CASES
    assert set(cases["train"]) | set(cases["val"]) == BUNDLED_WEIGHTS_CASES
