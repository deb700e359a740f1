"""The network: official state-dict layout, reference logits, and the fast formulation's agreement."""

from __future__ import annotations

import pytest
import torch

from napari_openseg.model.fast import encode_support, fast_features, fast_forward
from napari_openseg.model.universeg import UniverSeg, UniverSegConfig, build_network, config_from_state_dict
from tests.conftest import SHARED_REFS, needs_shared

# The official v1 layout (JJGO/UniverSeg@833a0c3): block -> (cross-conv input channels).
ENC_CROSS_IN = [3, 128, 128, 128]
DEC_CROSS_IN = [256, 256, 256]


def official_layout() -> dict[str, tuple[int, ...]]:
    layout = {}
    for prefix, cross_in in [("enc_blocks", ENC_CROSS_IN), ("dec_blocks", DEC_CROSS_IN)]:
        for i, channels in enumerate(cross_in):
            layout[f"{prefix}.{i}.cross.cross_conv.weight"] = (64, channels, 3, 3)
            layout[f"{prefix}.{i}.cross.cross_conv.bias"] = (64,)
            for part in ("target", "support"):
                layout[f"{prefix}.{i}.{part}.vmapped.conv.weight"] = (64, 64, 3, 3)
                layout[f"{prefix}.{i}.{part}.vmapped.conv.bias"] = (64,)
    layout["out_conv.conv.weight"] = (1, 64, 1, 1)
    layout["out_conv.conv.bias"] = (1,)
    return layout


def test_state_dict_layout_matches_official_v1():
    state = UniverSeg().state_dict()
    expected = official_layout()
    assert len(state) == 44
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v.numel() for v in state.values()) == 1_182_785


def test_config_is_read_back_from_a_state_dict():
    net = build_network((16, 24, 32), decoder_channels=(20, 12))
    config = config_from_state_dict(net.state_dict())
    assert config.encoder_channels == (16, 24, 32)
    assert config.decoder_channels == (20, 12)
    UniverSeg(config).load_state_dict(net.state_dict(), strict=True)


def test_config_rejects_inconsistent_widths():
    with pytest.raises(ValueError, match="one fewer decoder"):
        UniverSegConfig(encoder_channels=(8, 8, 8), decoder_channels=(8,))


@needs_shared
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("case", ["main", "batch2"])
@pytest.mark.parametrize("formulation", ["direct", "fast"])
def test_reference_logits_of_the_official_implementation(dtype, tol, case, formulation):
    ref = torch.load(SHARED_REFS / "universeg_ref_io.pt", weights_only=False)
    ref = ref if case == "main" else ref["batch2"]
    state = torch.load(SHARED_REFS / "universeg_random_state.pt", weights_only=True)
    net = UniverSeg().to(dtype).eval()
    net.load_state_dict(state, strict=True)
    inputs = [ref[k].to(dtype) for k in ("target_image", "support_images", "support_labels")]
    expected = ref["logits" if dtype == torch.float32 else "logits_f64"]
    with torch.no_grad():
        logits = net(*inputs) if formulation == "direct" else fast_forward(net, *inputs)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= tol


def random_inputs(b, s, h, w, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sb = 1 if shared else b
    query = torch.rand(b, 1, h, w, generator=g)
    images = torch.rand(sb, s, 1, h, w, generator=g)
    labels = (torch.rand(sb, s, 1, h, w, generator=g) > 0.6).float()
    return query, images, labels


@pytest.mark.parametrize(
    "widths, b, s, h, w, shared",
    [
        ((64, 64, 64, 64), 2, 3, 64, 64, False),
        ((16, 16, 16, 16), 3, 5, 48, 80, True),  # non-square, one support set shared by all queries
        ((8, 16, 24), 1, 1, 32, 40, False),  # three levels, uneven widths, S = 1
    ],
)
def test_fast_and_direct_formulations_agree(widths, b, s, h, w, shared):
    torch.manual_seed(1)
    net = build_network(widths).eval()
    query, images, labels = random_inputs(b, s, h, w, shared)
    with torch.no_grad():
        direct = net(query, images, labels)  # a shared (batch-1) support is expanded by the network itself
        fast = fast_forward(net, query, images, labels)
    assert fast.shape == (b, 1, h, w)
    assert (fast - direct).abs().max().item() <= 1e-4


def test_encoded_support_is_reusable_across_calls():
    torch.manual_seed(2)
    net = build_network((16, 16, 16)).eval()
    query, images, labels = random_inputs(4, 6, 32, 32, shared=True)
    with torch.no_grad():
        encoded = encode_support(net, images, labels)
        whole = fast_forward(net, query, images, labels)
        parts = torch.cat([fast_forward(net, query[i : i + 2], encoded=encoded) for i in (0, 2)])
    assert torch.allclose(whole, parts, atol=1e-5)


def test_fast_formulation_has_the_same_gradients():
    torch.manual_seed(3)
    net = build_network((8, 8, 8)).train()
    query, images, labels = random_inputs(2, 3, 32, 32)
    grads = []
    for forward in (net, lambda *x: fast_forward(net, *x)):
        net.zero_grad()
        forward(query, images, labels).square().mean().backward()
        grads.append(
            [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
        )
    for direct, fast in zip(*grads):
        assert torch.allclose(direct, fast, atol=1e-5, rtol=1e-3)


def test_features_have_the_last_decoder_width():
    net = build_network((8, 12, 16)).eval()
    query, images, labels = random_inputs(2, 2, 32, 32)
    with torch.no_grad():
        # decoder widths default to the encoder widths reversed without the deepest: (12, 8)
        assert fast_features(net, query, images, labels).shape == (2, 8, 32, 32)


@pytest.mark.parametrize(
    "query_shape, support_shape, message",
    [
        ((1, 2, 32, 32), (1, 2, 1, 32, 32), "query must be"),
        ((1, 1, 32, 32), (1, 2, 2, 32, 32), "support_images must be"),
        ((1, 1, 32, 32), (1, 2, 1, 16, 16), "does not fit query"),
        ((1, 1, 30, 30), (1, 2, 1, 30, 30), "divisible by 4"),
    ],
)
def test_shapes_are_checked_with_a_message(query_shape, support_shape, message):
    net = build_network((4, 4, 4))
    with pytest.raises(ValueError, match=message):
        net(torch.zeros(query_shape), torch.zeros(support_shape), torch.zeros(support_shape))
    with pytest.raises(ValueError, match=message):
        fast_forward(net, torch.zeros(query_shape), torch.zeros(support_shape), torch.zeros(support_shape))
