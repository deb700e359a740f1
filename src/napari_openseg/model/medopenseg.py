"""The MedOpenSeg network: a SwinUNETR backbone with an embedding head beside the segmentation head.

MONAI's ``SwinUNETR`` gives the Swin-Transformer encoder and the U-Net-style decoder (Vargas et al.
2025, section 3.1). Its last decoder features ``"B feature_size D H W"`` feed two 1x1x1 heads: the
segmentation head (SwinUNETR's own output block, one logit per known class) and the embedding head
(a 1x1x1 convolution to ``F`` = ``embedding_dim`` channels) whose output the prototype bank compares.

Spatial sizes must be divisible by ``2 ** 5`` = 32 (SwinUNETR's five halvings). The default
``feature_size`` 12 (the smallest MONAI accepts) keeps the network small enough to train on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

#: SwinUNETR halves the resolution five times.
SIZE_DIVISOR = 32


@dataclass(frozen=True)
class MedOpenSegConfig:
    """Architecture of a MedOpenSeg network.

    ``num_classes`` counts the known classes with background; ``roi_size`` is the patch size used for
    training and sliding-window inference (each side divisible by 32).
    """

    num_classes: int = 2
    feature_size: int = 12
    embedding_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    roi_size: tuple[int, int, int] = (64, 64, 64)
    in_channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "roi_size", tuple(int(r) for r in self.roi_size))
        if self.num_classes < 2:
            raise ValueError(f"MedOpenSeg needs background and at least one class, got {self.num_classes}")
        if self.feature_size < 12 or self.feature_size % 12:
            raise ValueError(f"feature_size must be a multiple of 12, got {self.feature_size}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if len(self.roi_size) != 3 or any(r < SIZE_DIVISOR or r % SIZE_DIVISOR for r in self.roi_size):
            raise ValueError(f"roi_size must be three sides divisible by {SIZE_DIVISOR}, got {self.roi_size}")
        if max(self.roi_size) < 2 * SIZE_DIVISOR:
            # the bottleneck's instance norm needs more than one voxel when training
            raise ValueError(f"roi_size needs at least one side >= {2 * SIZE_DIVISOR}, got {self.roi_size}")
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("depths and num_heads need one entry per Swin stage (4)")

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("depths", "num_heads", "roi_size"):
            data[key] = list(data[key])
        return data


class MedOpenSeg(nn.Module):
    """SwinUNETR backbone, segmentation head and embedding head.

    ``forward(x "B 1 D H W")`` returns ``(logits "B K D H W", embeddings "B F D H W")``.
    """

    def __init__(self, config: MedOpenSegConfig):
        super().__init__()
        from monai.networks.nets import SwinUNETR

        self.config = config
        self.backbone = SwinUNETR(
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            feature_size=config.feature_size,
            depths=config.depths,
            num_heads=config.num_heads,
            spatial_dims=3,
        )
        self.embed = nn.Conv3d(config.feature_size, config.embedding_dim, kernel_size=1)

    def decoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder features ``"B feature_size D H W"`` (SwinUNETR's forward without its head)."""
        check_volume_input(x, self.config.in_channels)
        b = self.backbone
        hidden = b.swinViT(x, b.normalize)
        enc0 = b.encoder1(x)
        enc1 = b.encoder2(hidden[0])
        enc2 = b.encoder3(hidden[1])
        enc3 = b.encoder4(hidden[2])
        dec4 = b.encoder10(hidden[4])
        dec3 = b.decoder5(dec4, hidden[3])
        dec2 = b.decoder4(dec3, enc3)
        dec1 = b.decoder3(dec2, enc2)
        dec0 = b.decoder2(dec1, enc1)
        return b.decoder1(dec0, enc0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.decoder_features(x)
        return self.backbone.out(features), self.embed(features)


def state_dict_shapes(config: MedOpenSegConfig) -> dict[str, torch.Size]:
    """The state-dict shapes of a network of ``config``, without allocating one (built on the meta
    device; checking a file's tensors against them comes before building the real network)."""
    original = torch.linspace

    def linspace(*args, **kwargs):  # SwinUNETR reads its drop-path rates with .item(): not on meta tensors
        return original(*args, **{"device": "cpu", **kwargs})

    torch.linspace = linspace
    try:
        with torch.device("meta"):
            return {key: value.shape for key, value in MedOpenSeg(config).state_dict().items()}
    finally:
        torch.linspace = original


def check_volume_input(x: torch.Tensor, channels: int = 1) -> None:
    """``x`` must be ``"B C D H W"`` with each spatial side divisible by 32."""
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f'expected "B {channels} D H W", got {tuple(x.shape)}')
    bad = [s for s in x.shape[2:] if s % SIZE_DIVISOR]
    if bad:
        raise ValueError(f"spatial sides must be divisible by {SIZE_DIVISOR}, got {tuple(x.shape[2:])}")
