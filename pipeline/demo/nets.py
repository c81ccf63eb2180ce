"""The demo models' architectures: MONAI networks and one compact 3D CNN.

Kept apart from the training code so that building a network needs only torch and MONAI
(pipeline.bench.speed_weights runs where nothing else of the pipeline is installed).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121, UNet
from torch import nn

from pipeline.core.contract import ModelContract


class SmallCT3DNet(nn.Module):
    """A compact 3D CNN for the 1x192x192x64 contract.

    Global max pooling next to mean pooling lets a few small lesions decide the answer.
    """

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            nn.AvgPool3d(2),
            *block(1, 16),
            nn.MaxPool3d(2),
            *block(16, 32),
            nn.MaxPool3d(2),
            *block(32, 32),
        )
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        out: torch.Tensor = self.head(
            torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)
        )
        return out


def mednist_net(contract: ModelContract) -> nn.Module:
    net: nn.Module = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(contract.labels))
    return net


def lesion_net(contract: ModelContract) -> nn.Module:
    net: nn.Module = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=len(contract.labels),
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=1,
    )
    return net
