"""The napari manifest: valid, every python_name importable, shipped in the package and the wheel."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from npe2 import PluginManifest

ROOT = Path(__file__).resolve().parents[2]


def manifest() -> PluginManifest:
    return PluginManifest.from_file(ROOT / "napari.yaml")


def test_manifest_is_valid_and_every_python_name_imports():
    pm = manifest()
    assert pm.name == "napari-openseg"
    names = [command.python_name for command in pm.contributions.commands]
    assert names, "the manifest names no commands"
    for python_name in names:
        module_name, _, attribute = python_name.partition(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attribute)), python_name
    used = {c.command for c in (pm.contributions.widgets or [])}
    used |= {c.command for c in (pm.contributions.readers or [])}
    used |= {c.command for c in (pm.contributions.writers or [])}
    used |= {c.command for c in (pm.contributions.sample_data or []) if hasattr(c, "command")}
    assert used <= {c.id for c in pm.contributions.commands}


def test_entry_point_resolves_to_the_packaged_manifest():
    [entry] = [
        ep for ep in importlib.metadata.entry_points(group="napari.manifest") if ep.name == "napari-openseg"
    ]
    package, _, resource = entry.value.partition(":")
    packaged = importlib.resources.files(package) / resource
    assert packaged.is_file()
    assert PluginManifest.from_file(str(packaged)) == manifest()


def test_wheel_ships_the_manifest(tmp_path):
    """Build a wheel from a copy of the sources (offline) and read the manifest out of it."""
    source = tmp_path / "src-copy"
    source.mkdir()
    for name in ("pyproject.toml", "napari.yaml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src",
        source / "src",
        symlinks=True,
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pt", "*.nii.gz"),
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("napari_openseg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("napari_openseg/napari.yaml").decode()
        entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "napari-openseg = napari_openseg:napari.yaml" in archive.read(entry_points).decode()
    assert shipped == (ROOT / "napari.yaml").read_text()
