"""The UniverSeg network (Butoi et al., 2023), weight-compatible with the official v1 checkpoint.

This module is the *direct* formulation: every cross-convolution concatenates the query features with
each support entry and convolves the pair, exactly as the paper writes it. ``model.fast`` holds the
equivalent formulation used for inference and training. Attribute names (``cross.cross_conv``,
``target.vmapped.conv``, ``out_conv.conv``) follow the official state-dict layout.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class UniverSegConfig:
    """Architecture of a UniverSeg network; the same vocabulary describes every size.

    ``decoder_channels`` defaults to the encoder widths reversed without the deepest one, as in v1.
    """

    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_channels: tuple[int, ...] | None = None
    grid_size: int = 128

    def __post_init__(self) -> None:
        enc = tuple(int(c) for c in self.encoder_channels)
        dec = self.decoder_channels
        dec = enc[-2::-1] if dec is None else tuple(int(c) for c in dec)
        if len(enc) < 2 or len(dec) != len(enc) - 1 or min(enc + dec) < 1:
            raise ValueError(
                f"UniverSeg needs >= 2 encoder widths and one fewer decoder widths, got {enc} / {dec}"
            )
        object.__setattr__(self, "encoder_channels", enc)
        object.__setattr__(self, "decoder_channels", dec)
        try:  # whole numbers (numpy's too); not floats, strings or booleans
            grid = None if isinstance(self.grid_size, bool) else operator.index(self.grid_size)
        except TypeError:
            grid = None
        if grid is None or grid < 1 or grid % self.downsampling:
            raise ValueError(
                f"grid_size must be a positive multiple of {self.downsampling} for "
                f"{len(enc)} levels, got {self.grid_size!r}"
            )
        object.__setattr__(self, "grid_size", grid)

    @property
    def downsampling(self) -> int:
        """Factor by which H and W must be divisible."""
        return 2 ** (len(self.encoder_channels) - 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["encoder_channels"] = list(self.encoder_channels)
        data["decoder_channels"] = list(self.decoder_channels)
        return data


class ConvAct(nn.Module):
    """3x3 (or given) convolution followed by LeakyReLU(0.01) when ``activate``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, activate: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        # In place: the convolution's output is not needed again (slope > 0 keeps autograd exact).
        return F.leaky_relu_(x, LEAKY_SLOPE) if self.activate else x


class PerEntry(nn.Module):
    """Applies one module to every entry of a set: ``"B N C H W" -> "B N C' H W"``.

    The attribute is named ``vmapped`` because that is the official checkpoint's key.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.vmapped = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        y = self.vmapped(x.reshape(b * n, *x.shape[2:]))
        return y.reshape(b, n, *y.shape[1:])


class CrossConv(nn.Module):
    """Convolution of each (query, support entry) pair, concatenated on channels, query first.

    No activation follows it (official v1 behaviour).
    """

    def __init__(self, query_channels: int, support_channels: int, out_channels: int):
        super().__init__()
        self.query_channels = query_channels
        self.cross_conv = nn.Conv2d(query_channels + support_channels, out_channels, 3, padding=1)

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """``query "B Cq H W"``, ``support "B S Cs H W"`` -> ``"B S C H W"``."""
        b, s = support.shape[:2]
        pairs = torch.cat([query.unsqueeze(1).expand(b, s, *query.shape[1:]), support], dim=2)
        out = self.cross_conv(pairs.reshape(b * s, *pairs.shape[2:]))
        return out.reshape(b, s, *out.shape[1:])


class CrossBlock(nn.Module):
    """Updates query and support representations through their pairwise interaction."""

    def __init__(self, query_channels: int, support_channels: int, out_channels: int):
        super().__init__()
        self.cross = CrossConv(query_channels, support_channels, out_channels)
        self.target = PerEntry(ConvAct(out_channels, out_channels))
        self.support = PerEntry(ConvAct(out_channels, out_channels))

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query "B Cq H W"``, ``support "B S Cs H W"`` -> ``("B C H W", "B S C H W")``."""
        pairs = self.cross(query, support)
        new_query = self.target(pairs.mean(dim=1, keepdim=True)).squeeze(1)
        return new_query, self.support(pairs)


class UniverSeg(nn.Module):
    """In-context segmentation network: a query image plus a support set of (image, label) pairs.

    Parameters
    ----------
    config
        Architecture; ``UniverSegConfig()`` is the official v1 (1,182,785 parameters).
    """

    def __init__(self, config: UniverSegConfig | None = None):
        super().__init__()
        self.config = config or UniverSegConfig()
        enc, dec = self.config.encoder_channels, self.config.decoder_channels
        self.enc_blocks = nn.ModuleList()
        query_ch, support_ch = 1, 2
        for width in enc:
            self.enc_blocks.append(CrossBlock(query_ch, support_ch, width))
            query_ch = support_ch = width
        self.dec_blocks = nn.ModuleList()
        skips = enc[-2::-1]
        for width, skip in zip(dec, skips):
            self.dec_blocks.append(CrossBlock(query_ch + skip, support_ch + skip, width))
            query_ch = support_ch = width
        self.out_conv = ConvAct(query_ch, 1, kernel_size=1, activate=False)

    def forward(
        self, query: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> torch.Tensor:
        """Direct formulation.

        ``query "B 1 H W"``, ``support_images "B S 1 H W"``, ``support_labels "B S 1 H W"``
        -> logits ``"B 1 H W"``; a support of batch 1 is shared by every query.
        """
        check_inputs(query, support_images, support_labels, self.config.downsampling)
        support = torch.cat([support_images, support_labels], dim=2)
        support = support.expand(query.shape[0], *support.shape[1:])  # a shared support serves each query
        skips: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(self.enc_blocks):
            query, support = block(query, support)
            if i < len(self.enc_blocks) - 1:
                skips.append((query, support))
                query, support = downsample(query), downsample(support)
        for block in self.dec_blocks:
            skip_query, skip_support = skips.pop()
            query = torch.cat([upsample(query), skip_query], dim=1)
            support = torch.cat([upsample(support), skip_support], dim=2)
            query, support = block(query, support)
        return self.out_conv(query)


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling of ``"B C H W"`` or ``"B S C H W"``."""
    if x.dim() == 5:
        return downsample(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return F.max_pool2d(x, 2, 2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling (align_corners=True) of ``"B C H W"`` or ``"B S C H W"``."""
    if x.dim() == 5:
        return upsample(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def check_inputs(
    query: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor, divisor: int
) -> None:
    """Raise ``ValueError`` naming the expected and received shapes when the inputs don't fit."""
    if query.dim() != 4 or query.shape[1] != 1:
        raise ValueError(f'query must be "B 1 H W", got {tuple(query.shape)}')
    if support_images.dim() != 5 or support_images.shape[2] != 1:
        raise ValueError(f'support_images must be "B S 1 H W", got {tuple(support_images.shape)}')
    if support_labels.shape != support_images.shape:
        raise ValueError(
            f"support_labels {tuple(support_labels.shape)} must match support_images "
            f"{tuple(support_images.shape)}"
        )
    b, s, _, h, w = support_images.shape
    if b not in (1, query.shape[0]) or (h, w) != tuple(query.shape[2:]) or s < 1:
        raise ValueError(
            f'support "B S 1 H W" {tuple(support_images.shape)} does not fit query {tuple(query.shape)}'
        )
    if h % divisor or w % divisor:
        raise ValueError(f"H and W must be divisible by {divisor}, got {h}x{w}")


def build_network(encoder_channels: Sequence[int] = (64, 64, 64, 64), **kwargs) -> UniverSeg:
    """Factory that keeps the architecture apart from any weights."""
    return UniverSeg(UniverSegConfig(encoder_channels=tuple(encoder_channels), **kwargs))


def config_from_state_dict(state_dict: dict[str, torch.Tensor], grid_size: int = 128) -> UniverSegConfig:
    """Infer the widths of a network from the shapes in a state dict of the official layout."""
    enc, dec = [], []
    i = 0
    while f"enc_blocks.{i}.cross.cross_conv.weight" in state_dict:
        enc.append(int(state_dict[f"enc_blocks.{i}.cross.cross_conv.weight"].shape[0]))
        i += 1
    i = 0
    while f"dec_blocks.{i}.cross.cross_conv.weight" in state_dict:
        dec.append(int(state_dict[f"dec_blocks.{i}.cross.cross_conv.weight"].shape[0]))
        i += 1
    return UniverSegConfig(encoder_channels=tuple(enc), decoder_channels=tuple(dec), grid_size=grid_size)
