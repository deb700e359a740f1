"""Weights: files, layouts, safe loading, the download path, caching, and device choice."""

from __future__ import annotations

import os
import pickle
import socket
import threading

import pytest
import torch

from napari_openseg.core.device import resolve_device, resolve_precision
from napari_openseg.errors import OpenSegError
from napari_openseg.model import registry
from napari_openseg.model.universeg import UniverSeg, build_network


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    registry.clear_cache()
    yield
    registry.clear_cache()


def test_own_format_round_trips_with_its_architecture(tmp_path, tiny_net):
    path = registry.save_weights(tiny_net, tmp_path / "w.pt", info={"steps": 3})
    net = registry.network_from_file(path)
    assert net.config == tiny_net.config and net.config.grid_size == 32
    assert net.weights_info["steps"] == 3
    for a, b in zip(net.state_dict().values(), tiny_net.state_dict().values()):
        assert torch.equal(a, b)


def test_bare_state_dict_in_the_official_layout_loads(tmp_path):
    net = build_network((16, 16, 16, 16))
    path = tmp_path / "bare.pt"
    torch.save(net.state_dict(), path)
    loaded = registry.network_from_file(path)
    assert loaded.config.encoder_channels == (16, 16, 16, 16)


def test_wrong_layout_names_missing_and_unexpected_keys(tmp_path):
    state = build_network((8, 8, 8, 8)).state_dict()
    state.pop("out_conv.conv.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(OpenSegError) as info:
        registry.network_from_file(path)
    message = str(info.value)
    assert "missing keys [out_conv.conv.bias]" in message and "unexpected keys [extra.weight]" in message


class WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"enc_blocks.0.cross.cross_conv.weight": WritesMarker(marker)}, path)
    with pytest.raises(OpenSegError, match="pickled code is never run"):
        registry.network_from_file(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(OpenSegError):
        registry.network_from_file(raw)
    assert not marker.exists()


def test_download_from_a_local_address_into_the_cache(tmp_path):
    source = tmp_path / "official.pt"
    torch.save(UniverSeg().state_dict(), source)
    seen = []
    path = registry.download_weights(
        "universeg-v1", url=source.as_uri(), progress=lambda d, t: seen.append(d)
    )
    assert path == registry.cache_dir() / "universeg_v1_nf64_ss64_STA.pt" and path.is_file()
    assert seen[-1] == source.stat().st_size
    assert registry.is_available("universeg-v1")
    net = registry.load_model("universeg-v1", "cpu")
    assert sum(p.numel() for p in net.parameters()) == 1_182_785


def test_offline_download_fails_clearly_and_leaves_nothing(tmp_path):
    with pytest.raises(OpenSegError, match="could not download universeg-v1") as info:
        registry.download_weights("universeg-v1", url="http://127.0.0.1:9/weights.pt", timeout=2)
    assert "--weights PATH" in str(info.value)
    target = registry.cache_dir() / "universeg_v1_nf64_ss64_STA.pt"
    assert not target.exists() and not target.with_name(target.name + ".partial").exists()


def test_a_download_cut_short_is_refused_and_leaves_nothing():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer_a_tenth():
        connection, _ = server.accept()
        connection.recv(4096)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + b"x" * 1000)
        connection.close()  # the connection drops after a tenth of the promised bytes

    thread = threading.Thread(target=answer_a_tenth, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/weights.pt"
    with pytest.raises(OpenSegError, match="could not download universeg-v1"):
        registry.download_weights("universeg-v1", url=url, timeout=5)
    thread.join(5)
    server.close()
    target = registry.cache_dir() / "universeg_v1_nf64_ss64_STA.pt"
    assert not target.exists() and not target.with_name(target.name + ".partial").exists()
    assert not registry.is_available("universeg-v1")


def _own_format_file(path, config, state_dict):
    torch.save(
        {
            "format": registry.WEIGHTS_FORMAT,
            "version": 1,
            "config": config,
            "state_dict": state_dict,
            "info": {},
        },
        path,
    )
    return path


def test_weights_files_with_a_bad_architecture_or_non_tensors_get_a_message(tmp_path):
    bad_config = _own_format_file(tmp_path / "config.pt", {"encoder_channels": [8]}, {})
    with pytest.raises(OpenSegError, match="its architecture cannot be built"):
        registry.network_from_file(bad_config)
    state = UniverSeg().state_dict()
    state["out_conv.conv.bias"] = 0.0
    with pytest.raises(OpenSegError, match="not tensors"):
        registry.network_from_file(_own_format_file(tmp_path / "float.pt", {}, state))


@pytest.mark.parametrize("problem", ["bad architecture", "interrupted check"])
def test_a_download_refused_or_interrupted_while_checked_leaves_nothing(tmp_path, monkeypatch, problem):
    target = registry.cache_dir() / "universeg_v1_nf64_ss64_STA.pt"
    if problem == "bad architecture":
        source = _own_format_file(tmp_path / "sent.pt", {"encoder_channels": [8]}, {})
        with pytest.raises(OpenSegError, match="nothing was installed"):
            registry.download_weights("universeg-v1", url=source.as_uri())
    else:
        source = tmp_path / "sent.pt"
        torch.save(UniverSeg().state_dict(), source)

        def ctrl_c(path):
            raise KeyboardInterrupt

        monkeypatch.setattr(registry, "network_from_file", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            registry.download_weights("universeg-v1", url=source.as_uri())
    assert list(target.parent.iterdir()) == []  # no weights and no ".partial" file


def test_an_empty_weights_file_gets_a_message(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(OpenSegError, match="is not a loadable weights file"):
        registry.load_model(str(tmp_path / "empty.pt"))


def test_weights_that_are_not_downloaded_say_how_to_get_them():
    with pytest.raises(OpenSegError, match="openseg weights download universeg-v1"):
        registry.load_model("universeg-v1")
    with pytest.raises(OpenSegError, match="neither a known weights name"):
        registry.load_model("no-such-weights")


def test_models_are_cached_per_file_and_device(tiny_weights):
    first = registry.load_model(tiny_weights, "cpu")
    assert registry.load_model(str(tiny_weights), "cpu") is first
    registry.clear_cache()
    assert registry.load_model(tiny_weights, "cpu") is not first


def test_a_weights_file_rewritten_in_place_is_read_again(tmp_path, tiny_net):
    import copy

    path = registry.save_weights(tiny_net, tmp_path / "best.pt")
    first = registry.load_model(path, "cpu")
    changed = copy.deepcopy(tiny_net)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.fill_(0.5)
    registry.save_weights(changed, path)  # as training rewrites best.pt
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = registry.load_model(path, "cpu")
    assert second is not first and all(torch.all(p == 0.5) for p in second.parameters())
    assert len([k for k in registry._CACHE if k[0] == str(path.resolve())]) == 1  # the old one is let go


def test_device_choice():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    elif resolve_device("auto").type != "mps":
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(OpenSegError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(OpenSegError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(OpenSegError, match="float16 is for GPUs"):
        resolve_precision("float16", torch.device("cpu"))
    assert resolve_precision("bfloat16", torch.device("cpu")) == torch.bfloat16
