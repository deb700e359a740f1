"""Hostile and damaged files (issue 23, items 1-3): each is built here, refused with a clear message,
and refused before the memory it declares is allocated (measured in a fresh process)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from napari_openseg.cli import main
from napari_openseg.core.novelty.model import NoveltyModel
from napari_openseg.core.novelty.prototypes import PrototypeBank
from napari_openseg.core.support import FORMAT_NAME, FORMAT_VERSION, SupportSet
from napari_openseg.errors import OpenSegError
from napari_openseg.file_limits import human_size
from napari_openseg.io import read_image
from napari_openseg.model import registry
from napari_openseg.model.universeg import UniverSeg, build_network
from tests._hostile import MIB, gzip_bytes, measure, nifti_header, npy_header, write_gzip_bomb, write_zip

#: The most a refused file may raise the peak memory (imports excluded): far below what it declares.
SMALL_MIB = 64
#: Imports, and a first network on the meta device: PyTorch's meta machinery takes about 77 MiB once.
IMPORT_NOVELTY = """
from napari_openseg.core.novelty.model import NoveltyModel
from napari_openseg.model.medopenseg import MedOpenSegConfig, state_dict_shapes
state_dict_shapes(MedOpenSegConfig())
"""
IMPORT_WEIGHTS = """
from napari_openseg.model.registry import expected_shapes, network_from_file
from napari_openseg.model.universeg import UniverSegConfig
expected_shapes(UniverSegConfig())
"""


# ---------------------------------------------------------------- 1. model files


@pytest.fixture(scope="module")
def novelty_payload(tmp_path_factory):
    """The content of a real (randomly initialised) novelty model file."""
    from napari_openseg.model.medopenseg import MedOpenSeg, MedOpenSegConfig

    torch.manual_seed(0)
    network = MedOpenSeg(MedOpenSegConfig(num_classes=2)).eval()
    bank = PrototypeBank([0, 1], network.config.embedding_dim)
    bank.prototypes = torch.randn(2, network.config.embedding_dim)
    bank.counts = torch.ones(2, dtype=torch.long)
    path = NoveltyModel(network, bank, [0, 1]).save(tmp_path_factory.mktemp("novelty") / "model.pt")
    return torch.load(path, weights_only=True)


def _save_novelty(tmp_path, payload, **config) -> str:
    content = dict(payload, config=dict(payload["config"], **config))
    torch.save(content, tmp_path / "model.pt")
    return str(tmp_path / "model.pt")


#: Messages for each refused file, collected in one process (importing torch and MONAI takes a while).
REFUSALS = """
result = []
for path in PATHS:
    try:
        LOAD(path)
        result.append(None)
    except OpenSegError as err:
        result.append(str(err))
"""


def test_a_novelty_model_whose_architecture_lies_is_refused_before_a_network_is_built(
    tmp_path, novelty_payload
):
    cases = [
        ({"feature_size": 4800}, "feature_size is 4800; files hold at most 96"),  # allocated 22.7 GB before
        (
            {"feature_size": 48},
            "weights do not fit its architecture (keys with other shapes",
        ),  # 250 MB if built
        ({"embedding_dim": 10**9}, "embedding_dim is 1000000000"),
        ({"roi_size": [64, 64, 2**20]}, "roi_size is [64, 64, 1048576]"),
        ({"depths": "abc"}, "depths is 'abc', not whole numbers"),
    ]
    paths = []
    for i, (config, _) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        paths.append(_save_novelty(tmp_path / str(i), novelty_payload, **config))
    code = REFUSALS.replace("PATHS", repr(paths)).replace("LOAD", "NoveltyModel.load")
    outcome = measure(code, IMPORT_NOVELTY)
    for (_, message), error in zip(cases, outcome["result"]):
        assert message in error
    assert outcome["growth_mib"] < SMALL_MIB


def test_a_novelty_model_with_a_non_mapping_config_or_info_gets_a_message(tmp_path, novelty_payload):
    torch.save(dict(novelty_payload, config=[12]), tmp_path / "list.pt")
    with pytest.raises(OpenSegError, match="architecture is a list, not a mapping"):
        NoveltyModel.load(tmp_path / "list.pt")
    torch.save(dict(novelty_payload, info=[1, 2]), tmp_path / "info.pt")
    with pytest.raises(OpenSegError, match="info is a list, not a mapping"):
        NoveltyModel.load(tmp_path / "info.pt")
    assert NoveltyModel.load(_save_novelty(tmp_path, novelty_payload)).class_values == [0, 1]


def test_a_prototype_bank_whose_size_lies_is_refused_before_its_arrays_are_made(tmp_path, novelty_payload):
    bank = dict(novelty_payload["bank"], dim=2**40)  # the bank's own arrays would take 8 TiB
    torch.save(dict(novelty_payload, bank=bank), tmp_path / "model.pt")
    with pytest.raises(OpenSegError, match="prototype bank arrays do not match"):
        NoveltyModel.load(tmp_path / "model.pt")


def _universeg_file(path, config, state=None, info=None):
    state = build_network((8, 8, 8), grid_size=32).state_dict() if state is None else state
    torch.save(
        {
            "format": registry.WEIGHTS_FORMAT,
            "version": 1,
            "config": config,
            "state_dict": state,
            "info": {} if info is None else info,
        },
        path,
    )
    return str(path)


def test_universeg_weights_whose_architecture_lies_are_refused_before_a_network_is_built(tmp_path):
    cases = [
        ({"encoder_channels": [4000] * 4}, "4 levels of up to 4000 channels"),  # allocated 7 GB before
        (
            {"encoder_channels": [512] * 3, "grid_size": 32},
            "not in the UniverSeg layout: keys with other shapes",
        ),
        ({"encoder_channels": [8, 8, 8], "grid_size": 8192}, "grid size 8192 is above 1024"),  # 9.9 GB before
    ]
    paths = [_universeg_file(tmp_path / f"{i}.pt", config) for i, (config, _) in enumerate(cases)]
    code = REFUSALS.replace("PATHS", repr(paths)).replace("LOAD", "network_from_file")
    outcome = measure(code, IMPORT_WEIGHTS)
    for (_, message), error in zip(cases, outcome["result"]):
        assert message in error
    assert outcome["growth_mib"] < SMALL_MIB


@pytest.mark.parametrize(
    "config, info, message",
    [
        ({"encoder_channels": [8, 8, 8], "grid_size": 0}, {}, "grid_size must be a positive multiple of 4"),
        ({"encoder_channels": [8, 8, 8], "grid_size": -8}, {}, "grid_size must be a positive multiple of 4"),
        ({"encoder_channels": [8, 8, 8], "grid_size": 30}, {}, "grid_size must be a positive multiple of 4"),
        ({"encoder_channels": [8, 8, 8], "grid_size": "abc"}, {}, "grid_size is 'abc', not a whole number"),
        ({"encoder_channels": 8}, {}, "encoder_channels is 8, not a list of whole numbers"),
        ([8, 8, 8], {}, "its architecture is a list, not a mapping"),
        ({"encoder_channels": [8, 8, 8], "grid_size": 32}, [1, 2], "its info is a list, not a mapping"),
    ],
)
def test_universeg_weights_with_impossible_fields_get_a_message_not_a_traceback(
    tmp_path, config, info, message
):
    path = _universeg_file(tmp_path / "w.pt", config, info=info)
    with pytest.raises(OpenSegError, match=re.escape(message)):
        registry.network_from_file(path)
    good = _universeg_file(tmp_path / "good.pt", {"encoder_channels": [8, 8, 8], "grid_size": 32})
    assert isinstance(registry.network_from_file(good), UniverSeg)


class WritesMarker:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("load", [registry.network_from_file, NoveltyModel.load, PrototypeBank.load])
def test_a_crafted_pickle_is_refused_without_torchs_advice_to_run_it(tmp_path, load):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format": "napari-openseg weights", "x": WritesMarker(marker)}, path)
    with pytest.raises(OpenSegError) as refused:
        load(path)
    message = str(refused.value)
    assert (
        re.search(r"pickled Python objects \((io|builtins)\.open\)", message)
        and "weights_only" not in message
    )
    assert not marker.exists()


def test_a_tensor_file_whose_archive_expands_past_its_size_is_refused_before_loading(tmp_path):
    path = tmp_path / "bomb.pt"
    write_zip(
        path, {"archive/data.pkl": (b"", MIB), "archive/data/0": (b"", 512 * MIB)}
    )  # torch never compresses
    outcome = measure(f"network_from_file({str(path)!r})", IMPORT_WEIGHTS)
    assert "its archive declares 513.0 MiB of content" in outcome["error"]
    assert outcome["growth_mib"] < SMALL_MIB


# ---------------------------------------------------------------- 2. sizes declared in headers


def test_a_nifti_header_that_declares_more_than_the_file_holds_is_refused_before_reading(tmp_path):
    cases = [
        (
            "claims.nii",
            (2000, 2000, 2000),
            np.uint8,
            "2000x2000x2000 uint8 values (7.5 GiB), more than its 4.0 KiB of data",
        ),
        ("claims.nii.gz", (2000, 2000, 2000), np.uint8, "more than its 4.0 KiB of compressed data can hold"),
        ("huge.nii", (32767, 32767, 32767), np.int16, "32767x32767x32767 int16 values (64.0 TiB)"),
    ]
    paths = []
    for name, shape, dtype, _ in cases:  # 4 KiB files: a header and zeros (compressed, then padded to 4 KiB)
        raw = nifti_header(shape, dtype) + bytes(4096 - 352)
        data = gzip_bytes(raw) if name.endswith(".gz") else raw
        (tmp_path / name).write_bytes(data + bytes(4096 - len(data)))
        paths.append(str(tmp_path / name))
    outcome = measure(
        REFUSALS.replace("PATHS", repr(paths)).replace("LOAD", "read_image"),
        "from napari_openseg.io import read_image",
    )
    for (*_, message), error in zip(cases, outcome["result"]):
        assert message in error  # 2000^3 allocated 8 GB before failing; 32767^3 said "could not be read ()"
    assert outcome["growth_mib"] < SMALL_MIB


def test_a_nifti_bomb_that_fits_its_file_is_held_to_the_memory_budget(tmp_path):
    path = write_gzip_bomb(tmp_path / "bomb.nii.gz", nifti_header((512, 512, 256), np.uint8), 64 * MIB)
    assert path.stat().st_size < 100_000
    outcome = measure(
        f"read_image({str(path)!r})",
        "from napari_openseg.io import read_image",
        env={"OPENSEG_MEMORY_LIMIT": "16M"},
    )
    assert (
        "512x512x256 uint8 values (64.0 MiB); reading it needs 64.0 MiB of memory, more than the budget of "
        "16.0 MiB"
    ) in outcome["error"]
    assert "OPENSEG_MEMORY_LIMIT" in outcome["error"] and outcome["growth_mib"] < SMALL_MIB
    assert read_image(path).data.shape == (256, 512, 512)  # within the default budget it is read


def _support_meta(count: int = 1) -> bytes:
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "metadata": {},
        "entries": [{"label": 1} for _ in range(count)],
    }
    text = json.dumps(meta)
    return npy_header((), f"<U{len(text)}") + text.encode("utf-32-le")


def test_a_zip_bomb_support_file_is_refused_before_it_is_decompressed(tmp_path, capsys):
    side = 16384  # 16384 x 16384 float32: 1 GiB of zeros in about 1 MiB of file
    path = write_zip(
        tmp_path / "bomb.npz",
        {
            "openseg_support.npy": (_support_meta(), 0),
            "image_0.npy": (npy_header((side, side), "<f4"), side * side * 4),
            "mask_0.npy": (npy_header((side, side), "|b1"), side * side),
        },
    )
    assert path.stat().st_size < 2 * MIB
    outcome = measure(f"SupportSet.load({str(path)!r})", "from napari_openseg.core.support import SupportSet")
    assert (
        f"its 2 arrays declare 1.3 GiB, more than its {human_size(path.stat().st_size)} of compressed data "
        "can hold"
    ) in outcome["error"]
    assert outcome["growth_mib"] < SMALL_MIB  # 5.5 GB for a 4.4 MB bomb before
    assert main(["support", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compressed data can hold" in err and "Traceback" not in err


def test_a_npz_member_whose_header_declares_more_than_its_entry_holds_is_refused(tmp_path):
    path = write_zip(
        tmp_path / "liar.npz",
        {
            "openseg_support.npy": (_support_meta(), 0),
            "image_0.npy": (npy_header((100_000, 100_000), "<f8"), MIB),  # declares 74.5 GiB
            "mask_0.npy": (npy_header((4, 4), "|b1"), MIB),
        },
    )
    outcome = measure(f"SupportSet.load({str(path)!r})", "from napari_openseg.core.support import SupportSet")
    assert (
        "'image_0' declares 100000x100000 float64 values (74.5 GiB) but its zip entry holds 1.0 MiB"
        in outcome["error"]
    )
    assert outcome["growth_mib"] < SMALL_MIB


def test_an_npy_header_that_declares_more_than_the_file_holds_is_refused(tmp_path):
    path = tmp_path / "liar.npy"
    path.write_bytes(npy_header((50_000, 50_000), "<f4") + bytes(1000))
    outcome = measure(f"read_image({str(path)!r})", "from napari_openseg.io import read_image")
    assert "declares 50000x50000 float32 values (9.3 GiB), more than its 1000 B of data" in outcome["error"]
    assert outcome["growth_mib"] < SMALL_MIB
    np.save(tmp_path / "words.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(OpenSegError, match="holds <U1 values, not numbers"):
        read_image(tmp_path / "words.npy")


def test_a_truncated_tiff_whose_header_declares_more_than_the_file_holds_is_refused(tmp_path):
    import tifffile

    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.zeros((3000, 3000), np.uint16))
    with open(path, "r+b") as handle:
        handle.truncate(64 * 1024)  # the header (first) survives, the pixels are gone
    with pytest.raises(
        OpenSegError, match=re.escape("3000x3000 uint16 values (17.2 MiB), more than its 64.0 KiB")
    ):
        read_image(path)


# ---------------------------------------------------------------- 3. damaged compressed data


def test_a_nii_gz_with_flipped_bytes_is_refused_not_read_with_wrong_values(tmp_path, capsys):
    import nibabel as nib

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 2000, (48, 40, 36)).astype(np.int16)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    assert np.array_equal(read_image(path).data, volume.transpose(2, 1, 0))
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 40):  # 40 flipped bytes in the deflate stream
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    with pytest.raises(OpenSegError, match="is damaged: its gzip stream does not check out"):
        read_image(path)
    out = tmp_path / "lab.npz"
    assert main(["support", "build", "--image", str(path), "--labels", str(path), "--out", str(out)]) == 2
    assert "is damaged" in capsys.readouterr().err and not out.exists()
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # cut short
    with pytest.raises(OpenSegError, match="is damaged: its gzip stream does not check out"):
        read_image(path)


def test_a_flipped_byte_in_a_stored_npz_member_fails_its_crc(tmp_path):
    path = tmp_path / "plain.npz"  # np.savez stores members uncompressed: only the CRC can tell
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "entries": [{"label": 1}]}
    image = np.full((64, 64), 0.25, np.float32)
    np.savez(path, openseg_support=np.array(json.dumps(meta)), image_0=image, mask_0=np.ones((64, 64), bool))
    assert SupportSet.load(path).entries[0].image[0, 0] == 0.25
    raw = bytearray(path.read_bytes())
    at = raw.index(image.tobytes()[:64]) + 1000
    raw[at] ^= 0x01  # one bit of one pixel: still a valid number in [0, 1]
    path.write_bytes(bytes(raw))
    with pytest.raises(OpenSegError, match=r"not a readable napari-openseg support-set file.*CRC"):
        SupportSet.load(path)


def test_the_memory_budget_setting_is_read_and_checked(monkeypatch):
    from napari_openseg import file_limits

    monkeypatch.setenv("OPENSEG_MEMORY_LIMIT", "512M")
    assert file_limits.memory_budget() == 512 * MIB
    monkeypatch.setenv("OPENSEG_MEMORY_LIMIT", "2.5GiB")
    assert file_limits.memory_budget() == int(2.5 * 1024 * MIB)
    monkeypatch.setenv("OPENSEG_MEMORY_LIMIT", "lots")
    with pytest.raises(OpenSegError, match="is not a size; write it like 8G"):
        file_limits.memory_budget()
    monkeypatch.delenv("OPENSEG_MEMORY_LIMIT")
    total = file_limits.physical_memory()
    assert file_limits.memory_budget() == (total // 2 if total else 16 * 1024 * MIB)
    assert os.environ.get("OPENSEG_MEMORY_LIMIT") is None
