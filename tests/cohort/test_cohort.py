"""Cohorts (``openseg batch``, :mod:`napari_openseg.core.cohort.runner`): a real Dask ``LocalCluster`` with two
worker processes, a tiny random network, small NIfTI volumes."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import socket
from collections.abc import Iterator

import nibabel as nib
import numpy as np
import pytest

from napari_openseg.cli import main
from napari_openseg.core.cohort.cluster import local_layout, require_distributed
from napari_openseg.core.cohort.runner import (
    LOCK_NAME,
    MANIFEST_NAME,
    collect_inputs,
    folder_lock,
    iter_cohort,
    plan_cohort,
    run_cohort,
)
from napari_openseg.core.cohort.tasks import NoveltyTask, SegmentTask, settings_hash
from napari_openseg.core.novelty.region import region_path
from napari_openseg.core.segment.inference import segment
from napari_openseg.core.support import build_support_set
from napari_openseg.errors import OpenSegError
from napari_openseg.io import read_image

SHAPE = (6, 28, 24)
AFFINE = np.diag([0.8, 0.9, 2.5, 1.0])
AFFINE[:3, 3] = (4.0, -7.0, 12.0)
VOLUMES = 5


def volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume (array order z, y, x) with a bright box (label 1) and a dark one (label 2)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, np.uint8)
    y, x = rng.integers(2, 10, 2)
    labels[:, y : y + 10, x : x + 8] = 1
    labels[1:5, 18:25, 3:9] = 2
    image = 40.0 + 30.0 * (labels == 1) - 20.0 * (labels == 2) + rng.normal(0, 5, SHAPE)
    return image.astype(np.float32), labels


def save_nifti(path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), AFFINE), str(path))


@pytest.fixture
def cohort(tmp_path, tiny_weights):
    """``(input folder, support file, weights file)``: five volumes and a support set from a sixth."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index in range(VOLUMES):
        save_nifti(inputs / f"case_{index}.nii.gz", volume(index)[0])
    support = build_support_set(*volume(99))
    support.save(tmp_path / "support.npz")
    return inputs, tmp_path / "support.npz", tiny_weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest on one torch thread, as the Dask workers here run them (two threads on
    a busy 2-core machine can be ten times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Seconds any one test (or the cluster's start) may take before it fails: a hung cluster wait must fail,
#: not hang CI. Each takes well under a minute on a busy 2-core machine.
TEST_LIMIT_S = 240


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise ``TimeoutError`` (with a traceback of where it waited) when the block runs past ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"ran past {seconds} s: a cluster wait hung?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def watchdog():
    with time_limit(TEST_LIMIT_S):
        yield


@pytest.fixture(scope="module")
def scheduler():
    """The address of a LocalCluster with two single-threaded worker processes, shared by this module."""
    from distributed import LocalCluster

    with time_limit(TEST_LIMIT_S):
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
    with cluster:
        yield cluster.scheduler_address


def cli(*parts) -> int:
    """``openseg`` with every part as a string."""
    return main([str(part) for part in parts])


def engine(cohort) -> list:
    """The support set, weights and S = 4 of every segmentation here."""
    _, support, weights = cohort
    return ["--support", support, "--weights", weights, "--support-size", 4]


def manifest_rows(folder) -> dict[str, dict[str, str]]:
    with open(folder / MANIFEST_NAME, newline="") as handle:
        return {row["output"]: row for row in csv.DictReader(handle)}


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def segment_reference(tmp_path, cohort, *extra) -> dict[str, np.ndarray]:
    """What ``openseg segment --out-dir`` writes for every input, by input name."""
    folder = tmp_path / "reference"
    folder.mkdir()
    assert cli("segment", *sorted(cohort[0].iterdir()), *engine(cohort), "--out-dir", folder, *extra) == 0
    return {p.name.replace("_openseg", ""): read_image(p).data for p in folder.iterdir()}


def test_batch_on_a_local_cluster_writes_what_segment_writes(tmp_path, cohort, scheduler, capsys):
    reference = segment_reference(tmp_path, cohort)
    out = tmp_path / "out"
    out.mkdir()
    assert (
        cli("batch", "segment", cohort[0], *engine(cohort), "--out-dir", out, "--scheduler", scheduler) == 0
    )
    assert f"{VOLUMES} done, 0 failed" in capsys.readouterr().out
    rows = manifest_rows(out)
    assert sorted(rows) == sorted(f"case_{i}_labels.nii.gz" for i in range(VOLUMES))
    assert sorted(p.name for p in out.iterdir()) == sorted([*rows, MANIFEST_NAME])  # one file per item
    assert all(row["outputs"] == name for name, row in rows.items())
    assert {row["status"] for row in rows.values()} == {"done"}
    assert {row["device"] for row in rows.values()} == {"cpu"}
    assert len({row["settings_hash"] for row in rows.values()}) == 1
    for name, row in rows.items():
        written = nib.load(str(out / name))
        source = nib.load(row["input"])
        assert np.array_equal(written.affine, source.affine)
        assert written.header.get_zooms() == source.header.get_zooms()
        assert np.array_equal(read_image(out / name).data, reference[name.replace("_labels", "")]), name
    assert leftovers(out) == []


def test_a_corrupt_input_fails_alone_and_the_exit_status_says_so(tmp_path, cohort, scheduler, capsys):
    (cohort[0] / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    out.mkdir()
    assert (
        cli("batch", "segment", cohort[0], *engine(cohort), "--out-dir", out, "--scheduler", scheduler) == 1
    )
    printed = capsys.readouterr().out
    assert f"{VOLUMES} done, 1 failed" in printed and "failed: " in printed and "broken.nii.gz" in printed
    rows = manifest_rows(out)
    assert rows["broken_labels.nii.gz"]["status"] == "failed"
    assert "could not be read as nifti" in rows["broken_labels.nii.gz"]["error"]
    assert not (out / "broken_labels.nii.gz").exists()
    assert [rows[f"case_{i}_labels.nii.gz"]["status"] for i in range(VOLUMES)] == ["done"] * VOLUMES
    assert leftovers(out) == []


def test_an_interrupted_run_leaves_no_partial_file_and_the_rerun_computes_only_the_rest(
    tmp_path, cohort, scheduler
):
    inputs, support, weights = cohort
    reference = segment_reference(tmp_path, cohort)
    out = tmp_path / "out"
    out.mkdir()
    task = SegmentTask(support, weights, {"support_size": 4})
    # the run's own cluster is closed while an item is in flight: its worker dies mid-item, as on Ctrl+C
    steps = iter_cohort(plan_cohort(task, [inputs], out), scheduler="local", workers=1, dashboard=False)
    finished = []
    for step in steps:
        if "result" in step.payload:
            finished.append(step.payload["result"])
        if len(finished) == 2:
            break
    steps.close()
    assert leftovers(out) == []  # no temporary file, no lock
    rows = manifest_rows(out)
    done = sorted(name for name, row in rows.items() if row["status"] == "done")
    assert done == sorted(r.item.output.name for r in finished)
    assert sum(row["status"] == "pending" for row in rows.values()) == VOLUMES - 2
    stamps = {name: os.stat(out / name).st_mtime_ns for name in done}

    plan = plan_cohort(task, [inputs], out)
    assert sorted(item.output.name for item in plan.skipped) == done
    summary = run_cohort(task, [inputs], out, scheduler=scheduler)
    assert sorted(r.item.output.name for r in summary.results) == sorted(set(rows) - set(done))
    assert {name: os.stat(out / name).st_mtime_ns for name in done} == stamps
    assert {row["status"] for row in manifest_rows(out).values()} == {"done"}
    for name in rows:
        assert np.array_equal(read_image(out / name).data, reference[name.replace("_labels", "")]), name


def test_a_killed_worker_is_replaced_and_its_item_runs_again(tmp_path, cohort, scheduler):
    from distributed import Client

    inputs, support, weights = cohort
    out = tmp_path / "out"
    out.mkdir()
    task = SegmentTask(support, weights, {"support_size": 4})
    with Client(scheduler) as client:
        victim = next(iter(client.run(os.getpid).values()))
        steps = iter_cohort(plan_cohort(task, [inputs], out), scheduler=client)
        killed = False
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                summary = stop.value
                break
            if "result" in step.payload and not killed:
                os.kill(victim, signal.SIGKILL)  # the other items were queued or running on it
                killed = True
        assert client.status == "running"  # a client given to the run is left open
    assert summary.done == VOLUMES and summary.failures == []
    assert {row["status"] for row in manifest_rows(out).values()} == {"done"}
    assert leftovers(out) == []


def test_a_changed_setting_recomputes_and_the_same_settings_skip(tmp_path, cohort, scheduler):
    inputs, support, weights = cohort
    out = tmp_path / "out"
    out.mkdir()
    first = SegmentTask(support, weights, {"support_size": 4, "threshold": 0.5, "device": "cpu"})
    assert run_cohort(first, [inputs], out, scheduler=scheduler).done == VOLUMES
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*_labels.nii.gz")}

    # where it runs is not a setting: the same results are skipped
    again = SegmentTask(
        support, weights, {"support_size": 4, "threshold": 0.5, "device": "auto", "batch_size": 3}
    )
    assert settings_hash(again) == settings_hash(first)
    plan = plan_cohort(again, [inputs], out)
    assert plan.todo == [] and len(plan.skipped) == VOLUMES
    summary = run_cohort(again, [inputs], out, scheduler=scheduler)
    assert summary.results == [] and len(summary.skipped) == VOLUMES
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_labels.nii.gz")} == stamps

    changed = SegmentTask(support, weights, {"support_size": 4, "threshold": 0.05, "device": "cpu"})
    assert settings_hash(changed) != settings_hash(first)
    summary = run_cohort(changed, [inputs], out, scheduler=scheduler)
    assert summary.done == VOLUMES and summary.skipped == []
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in out.glob("*_labels.nii.gz"))
    assert {row["settings_hash"] for row in manifest_rows(out).values()} == {settings_hash(changed)}
    for index in range(VOLUMES):  # the new threshold's result, not the old one
        image = read_image(inputs / f"case_{index}.nii.gz").data
        expected = segment(
            image, build_support_set(*volume(99)), weights, support_size=4, threshold=0.05
        ).labels
        assert np.array_equal(read_image(out / f"case_{index}_labels.nii.gz").data, expected)


def test_a_scheduler_without_workers_is_a_message_not_a_wait(tmp_path, cohort, monkeypatch):
    from distributed import LocalCluster

    from napari_openseg.core.cohort import cluster as cohort_dask

    inputs, support, weights = cohort
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(cohort_dask, "WORKER_TIMEOUT_S", 1.0)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        with pytest.raises(OpenSegError, match="no Dask worker joined the scheduler within 1 s"):
            run_cohort(SegmentTask(support, weights), [inputs], out, scheduler=empty.scheduler_address)
    assert {row["status"] for row in manifest_rows(out).values()} == {"pending"}
    assert leftovers(out) == []


def test_the_same_support_set_saved_again_is_the_same_setting_and_other_weights_are_not(
    tmp_path, cohort, tiny_net
):
    from napari_openseg.model.registry import save_weights

    _, support, weights = cohort
    resaved = build_support_set(*volume(99))
    resaved.save(tmp_path / "again.npz")
    assert settings_hash(SegmentTask(tmp_path / "again.npz", weights)) == settings_hash(
        SegmentTask(support, weights)
    )
    assert settings_hash(SegmentTask(resaved, weights)) == settings_hash(SegmentTask(support, weights))
    next(tiny_net.parameters()).data += 1.0
    other = save_weights(tiny_net, tmp_path / "other.pt")
    assert settings_hash(SegmentTask(support, other)) != settings_hash(SegmentTask(support, weights))


def test_inputs_come_from_folders_globs_and_a_csv_and_missing_ones_are_listed_together(tmp_path, cohort):
    inputs, _, _ = cohort
    (inputs / "notes.txt").write_text("not an image")
    files = [inputs / f"case_{i}.nii.gz" for i in range(VOLUMES)]
    assert collect_inputs([inputs]) == files
    assert collect_inputs([str(inputs / "case_[12].nii.gz"), inputs / "case_1.nii.gz"]) == files[1:3]
    table = tmp_path / "cohort.csv"
    table.write_text("path,group\ninputs/case_3.nii.gz,a\n" + f"{files[0]},b\n")
    assert collect_inputs([table]) == [files[3], files[0]]
    with pytest.raises(OpenSegError, match=r"2 input\(s\) not found: .*gone\.nii\.gz.*nothing_\*\.nii\.gz"):
        collect_inputs([files[0], tmp_path / "gone.nii.gz", str(tmp_path / "nothing_*.nii.gz")])
    with pytest.raises(OpenSegError, match="not image files"):
        collect_inputs([inputs / "notes.txt"])
    (tmp_path / "bad.csv").write_text("file\nx.nii.gz\n")
    with pytest.raises(OpenSegError, match="'path' column"):
        collect_inputs([tmp_path / "bad.csv"])


def test_plans_refuse_clashing_names_foreign_outputs_and_the_output_folder_as_input(tmp_path, cohort):
    inputs, support, weights = cohort
    task = SegmentTask(support, weights, {"support_size": 4})
    other = tmp_path / "other"
    other.mkdir()
    (other / "case_0.nii.gz").write_bytes((inputs / "case_0.nii.gz").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OpenSegError, match="same name would share an output"):
        plan_cohort(task, [inputs, other], out)
    (out / "case_1_labels.nii.gz").write_bytes(b"someone else's")
    with pytest.raises(OpenSegError, match="case_1_labels.nii.gz.*--overwrite"):
        plan_cohort(task, [inputs], out)
    assert len(plan_cohort(task, [inputs], out, overwrite=True).todo) == VOLUMES
    with pytest.raises(OpenSegError, match="is the output folder"):
        plan_cohort(task, [out], out)
    (out / "case_2_labels.nii.gz").write_bytes((inputs / "case_2.nii.gz").read_bytes())
    with pytest.raises(OpenSegError, match="case_2_labels.nii.gz: an output would replace one of the inputs"):
        plan_cohort(task, [inputs, out / "case_2_labels.nii.gz"], out, overwrite=True)
    (out / "case_2_labels.nii.gz").unlink()
    (out / MANIFEST_NAME).write_text("a,b\n1,2\n")
    with pytest.raises(OpenSegError, match="not a batch manifest"):
        plan_cohort(task, [inputs], out, overwrite=True)
    with pytest.raises(OpenSegError, match="does not occur|label"):
        plan_cohort(SegmentTask(support, weights, {"label_values": [7]}), [inputs], tmp_path)


def test_in_process_run_records_failures_and_the_lock_keeps_one_run_per_folder(tmp_path, cohort):
    inputs, support, weights = cohort
    (inputs / "flat.npy").write_bytes(b"\x93NUMPY garbage")
    out = tmp_path / "out"
    out.mkdir()
    task = SegmentTask(support, weights, {"support_size": 4})
    plan = plan_cohort(task, [inputs], out)
    with folder_lock(out):
        with pytest.raises(OpenSegError, match="another batch run"):
            run_cohort(task, [inputs], out, scheduler=None)
    (out / LOCK_NAME).write_text(f"{socket.gethostname()} 999999999")  # a dead process's lock is taken over
    summary = run_cohort(task, [inputs], out, scheduler=None)
    assert [r.item.source.name for r in summary.failures] == ["flat.npy"]
    assert summary.done == VOLUMES and len(plan.todo) == VOLUMES + 1
    assert "flat.npy" in manifest_rows(out)["flat_labels.npy"]["error"]
    assert leftovers(out) == [] and summary.manifest == out / MANIFEST_NAME


def test_batch_novelty_writes_what_novelty_map_writes(tmp_path, cohort, capsys):
    inputs, support, weights = cohort
    out = tmp_path / "out"
    out.mkdir()
    two = [inputs / "case_0.nii.gz", inputs / "case_1.nii.gz"]
    assert cli("batch", "novelty", *two, *engine(cohort), "--out-dir", out, "--scheduler", "none") == 0
    rows = manifest_rows(out)
    regions = []
    for index in (0, 1):
        single = tmp_path / f"single_{index}.nii.gz"
        assert cli("novelty", "map", *engine(cohort), "--image", two[index], "--out", single) == 0
        heat, region = f"case_{index}_novelty.nii.gz", f"case_{index}_novelty_novel_region.nii.gz"
        assert region_path(out / heat) == out / region  # the name `novelty map` gives it
        assert rows[heat]["outputs"] == f"{heat};{region}" and rows[heat]["status"] == "done"
        source = nib.load(str(inputs / f"case_{index}.nii.gz"))
        for name, expected in ((heat, single), (region, region_path(single))):
            batch = nib.load(str(out / name))
            assert np.array_equal(batch.affine, source.affine)
            assert batch.header.get_zooms() == source.header.get_zooms()
            assert np.array_equal(np.asarray(batch.dataobj), np.asarray(nib.load(str(expected)).dataobj))
        regions.append(read_image(out / region).data)
    assert all(r.dtype == np.uint8 and set(np.unique(r)) == {0, 1} for r in regions)  # a region, not empty
    outputs = [name for row in rows.values() for name in row["outputs"].split(";")]
    assert sorted(p.name for p in out.iterdir()) == sorted([*outputs, MANIFEST_NAME])
    assert (
        cli("batch", "novelty", inputs, "--support", support, "--seed-mask", support, "--out-dir", out) == 2
    )
    assert "--seed-mask needs --seed-image" in capsys.readouterr().err


def test_a_missing_region_recomputes_its_item_only(tmp_path, cohort, capsys):
    inputs, support, weights = cohort
    out = tmp_path / "out"
    out.mkdir()
    three = [inputs / f"case_{index}.nii.gz" for index in range(3)]
    command = ["batch", "novelty", *three, *engine(cohort), "--out-dir", out, "--scheduler", "none"]
    assert cli(*command) == 0
    files = sorted(p for p in out.glob("case_*"))
    assert len(files) == 6
    before = {p.name: (p.stat().st_mtime_ns, read_image(p).data) for p in files}
    (out / "case_1_novelty_novel_region.nii.gz").unlink()

    capsys.readouterr()
    assert cli(*command) == 0
    printed = capsys.readouterr()
    assert "1 to compute, 2 done before" in printed.err
    assert "1 done, 0 failed, 2 done before" in printed.out
    for path in sorted(out.glob("case_*")):
        stamp, data = before[path.name]
        assert (path.stat().st_mtime_ns == stamp) == (not path.name.startswith("case_1")), path.name
        assert np.array_equal(read_image(path).data, data), path.name
    assert {row["status"] for row in manifest_rows(out).values()} == {"done"}
    assert leftovers(out) == []


def test_an_older_manifest_without_the_outputs_column_is_read(tmp_path, cohort):
    """A folder from before novel regions: its manifest lists the heat maps alone, with no ``outputs``."""
    inputs, support, weights = cohort
    out = tmp_path / "out"
    out.mkdir()
    task = NoveltyTask(support=support, weights=weights, options={"support_size": 4})
    segmentation = SegmentTask(support, weights, {"support_size": 4})
    two = [inputs / "case_0.nii.gz", inputs / "case_1.nii.gz"]
    rows = ["input,output,status,error,seconds,device,settings_hash"]
    for source in two:
        for tag, digest in (("novelty", settings_hash(task)), ("labels", settings_hash(segmentation))):
            name = f"{source.name[: -len('.nii.gz')]}_{tag}.nii.gz"
            (out / name).write_bytes(b"an old result")
            rows.append(f"{source},{name},done,,1.00,cpu,{digest}")
    (out / MANIFEST_NAME).write_text("\n".join(rows) + "\n")
    assert len(plan_cohort(segmentation, two, out).skipped) == 2  # one output, listed and present
    plan = plan_cohort(task, two, out)
    assert plan.skipped == [] and len(plan.todo) == 2  # no region yet: computed again
    (out / "case_0_novelty_novel_region.nii.gz").write_bytes(b"someone else's")
    with pytest.raises(OpenSegError, match="does not list: .*case_0_novelty_novel_region.*--overwrite"):
        plan_cohort(task, two, out)


def test_local_clusters_fit_the_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert local_layout("cpu", None, None, 100) == local_layout("cpu", cores, 1, 100)
    assert local_layout("cpu", None, None, 100).workers == cores
    assert local_layout("cpu", None, None, 1).workers == 1  # never more workers than items
    assert local_layout("cpu", 1, 1, 10).torch_threads == cores
    with pytest.raises(OpenSegError, match="exceeds the"):
        local_layout("cpu", cores, 2, 10)
    with pytest.raises(OpenSegError, match=">= 1"):
        local_layout("cpu", 0, None, 10)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torch reads it: one thread per item
    assert local_layout("cpu", 1, 1, 10).torch_threads == 1


def test_a_local_cluster_on_gpus_runs_one_worker_per_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    layout = local_layout("auto", None, None, 100)
    assert (layout.workers, layout.threads, layout.spread_gpus) == (3, 1, True)
    assert local_layout("cuda", None, None, 2).workers == 2  # never more workers than items
    assert local_layout("cuda:1", None, None, 10) == local_layout("cuda:1", 1, 1, 10)  # one chosen GPU
    assert not local_layout("cuda:1", None, None, 10).spread_gpus
    with pytest.raises(OpenSegError, match="one worker per GPU"):
        local_layout("cuda", 4, None, 10)


def test_without_dask_the_message_says_how_to_install_it(monkeypatch, tmp_path, cohort, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(OpenSegError, match=r"napari-openseg\[cluster\]"):
        require_distributed()
    out = tmp_path / "out"
    out.mkdir()
    assert cli("batch", "segment", cohort[0], *engine(cohort), "--out-dir", out) == 2
    assert "pip install 'napari-openseg[cluster]'" in capsys.readouterr().err
    assert not list(out.glob("*_labels.nii.gz"))


def untrained_novelty_model(path) -> None:
    """A novelty model file without the cost of training: a random tiny network whose prototypes are the
    mean embeddings of each class of the synthetic volume (a cohort treats it as any trained model)."""
    import torch

    from napari_openseg.core.novelty.model import NoveltyModel
    from napari_openseg.core.novelty.prototypes import PrototypeBank
    from napari_openseg.model.medopenseg import MedOpenSeg, MedOpenSegConfig
    from tests._novelty_data import SHAPE as NOVELTY_SHAPE
    from tests._novelty_data import sphere_volume

    torch.manual_seed(0)
    image, labels = sphere_volume()
    config = MedOpenSegConfig(
        num_classes=3, embedding_dim=8, roi_size=NOVELTY_SHAPE, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    )
    net = MedOpenSeg(config).eval()
    with torch.no_grad():
        _, embeddings = net(torch.from_numpy(image)[None, None])
    bank = PrototypeBank([0, 1, 2], 8)
    bank.update(embeddings[0].permute(1, 2, 3, 0).reshape(-1, 8), torch.from_numpy(labels.astype(np.int64)))
    NoveltyModel(net, bank, [0, 1, 2]).save(path)


def test_batch_novelty_with_a_novelty_model_writes_what_novelty_map_writes(tmp_path):
    from tests._novelty_data import sphere_volume

    model = tmp_path / "model.pt"
    untrained_novelty_model(model)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = inputs / "vol.nii.gz"
    save_nifti(source, sphere_volume(1)[0])
    out = tmp_path / "out"
    out.mkdir()
    assert cli("batch", "novelty", inputs, "--model", model, "--out-dir", out, "--scheduler", "none") == 0
    single = tmp_path / "single.nii.gz"
    assert cli("novelty", "map", "--model", model, "--image", source, "--out", single) == 0
    written = read_image(out / "vol_novelty.nii.gz").data
    assert written.shape == sphere_volume(1)[0].shape and np.ptp(written) > 0  # a map, not a constant
    assert np.array_equal(written, read_image(single).data)
    assert np.array_equal(nib.load(str(out / "vol_novelty.nii.gz")).affine, nib.load(str(source)).affine)
    region = read_image(out / "vol_novelty_novel_region.nii.gz").data
    assert np.array_equal(region, read_image(region_path(single)).data) and region.any()
    assert {row["status"] for row in manifest_rows(out).values()} == {"done"}
