"""The lecture networks that have no published ImageNet weights, in plain torch: LeNet-5 and ZFNet.

They are here so a student can train them from random init on their own images, next to the
pretrained catalogue, and read their anatomy (stages, taps) with the same tools::

    net = BUILDERS["zfnet"]()                # ZFNet, 1000 classes, random init
    net(torch.zeros(2, 3, 224, 224)).shape   # (2, 1000)
    net.preprocessing                        # how to feed it pixels

Both follow torchvision's AlexNet layout (`features` -> `avgpool` -> `flatten` -> `classifier`),
so `anatomy.py` reads their conv blocks and fully connected layers with the same rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from finetune.data.transforms import Preprocessing

# No weights were trained, so nothing prescribes a mean: map [0, 1] pixels to [-1, 1].
NEUTRAL = Preprocessing(
    input_size=224, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) on RGB input: C1-S2-C3-S4 convolutions, then C5-F6-output.

    C1 is padded by 2 so a 28 px digit gives the paper's 32 px geometry; the adaptive pool
    makes S4 5x5 at any input of 28 px or more, so C5 sees the 16*5*5 = 400 inputs of the paper.
    Subsampling is average pooling and the nonlinearity tanh, as in the original.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.preprocessing = NEUTRAL.with_size(32)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5, padding=2),  # C1: (B, 6, H, W)
            nn.Tanh(),
            nn.AvgPool2d(2),  # S2: (B, 6, H/2, W/2)
            nn.Conv2d(6, 16, kernel_size=5),  # C3
            nn.Tanh(),
            nn.AvgPool2d(2),  # S4
        )
        self.avgpool = nn.AdaptiveAvgPool2d((5, 5))  # (B, 16, 5, 5)
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),  # C5 (a 5x5 convolution on a 5x5 map is a linear layer)
            nn.Tanh(),
            nn.Linear(120, 84),  # F6
            nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))  # (B, num_classes)


class ZFNet(nn.Module):
    """ZFNet (Zeiler & Fergus 2013): AlexNet with a 7x7 stride-2 first layer and 5x5 stride-2 second.

    Channel widths follow the paper (96, 256, 384, 384, 256); the local response
    normalisation of the first two layers is kept, the two-GPU split is not.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.preprocessing = NEUTRAL
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 96, kernel_size=7, stride=2, padding=1),  # conv1: (B, 96, 110, 110) at 224
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # (B, 96, 55, 55)
            nn.LocalResponseNorm(5),
            nn.Conv2d(96, 256, kernel_size=5, stride=2),  # conv2: (B, 256, 26, 26)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # (B, 256, 13, 13)
            nn.LocalResponseNorm(5),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # conv3
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),  # conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # conv5
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 256, 6, 6)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),  # fc7
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))  # (B, num_classes)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "zfnet": ZFNet,
}
