"""Xception (Chollet, CVPR 2017) in PyTorch.

The architecture follows the paper: an entry flow, a middle flow of eight identical
residual modules and an exit flow; 36 convolution layers in 14 modules; batch norm
after every convolution and separable convolution; no nonlinearity between the
depthwise and pointwise halves of a separable convolution; linear residual connections.

Layer details (padding, bias-free convolutions, batch-norm epsilon 1e-5, ReLU placement)
and parameter names match timm's ``legacy_xception``, so a checkpoint in that layout loads
with ``load_state_dict(strict=True)`` and reproduces that model's outputs.

This file is plain PyTorch (no other import): the GPU kit carries it to make the seeded
weights (``seed_weights``) on a machine without xcompile.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NUM_FEATURES = 2048
# Spatial size of the batch that calibrates the seeded batch-norm statistics.
CALIBRATION_SHAPE = (2, 3, 147, 147)


class SeparableConv2d(nn.Module):
    """Depthwise KxK convolution followed by a pointwise 1x1 convolution, no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1):
        super().__init__()
        # The attribute names ``conv1``/``pointwise`` are timm's checkpoint keys.
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding,
                               groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


class Block(nn.Module):
    """One Xception module: ``reps`` x (ReLU, SeparableConv, BN), optional max pool,
    plus a residual branch (identity, or a strided 1x1 conv + BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True):
        super().__init__()
        if out_channels != in_channels or stride != 1:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_channels)
        else:
            self.skip = None

        layers: list[nn.Module] = []
        for i in range(reps):
            if grow_first:
                inc = in_channels if i == 0 else out_channels
                outc = out_channels
            else:
                inc = in_channels
                outc = in_channels if i < reps - 1 else out_channels
            # The first ReLU must not be in-place: the block's input also feeds the skip.
            layers.append(nn.ReLU(inplace=i > 0))
            layers.append(SeparableConv2d(inc, outc, 3, stride=1, padding=1))
            layers.append(nn.BatchNorm2d(outc))
        if not start_with_relu:
            layers = layers[1:]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.rep(inp)
        skip = self.skipbn(self.skip(inp)) if self.skip is not None else inp
        return x + skip


class Xception(nn.Module):
    """Xception image classifier; input is NCHW float32, at least 71x71."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        # Entry flow.
        self.conv1 = nn.Conv2d(in_chans, 32, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.act2 = nn.ReLU(inplace=True)
        self.block1 = Block(64, 128, 2, 2, start_with_relu=False)
        self.block2 = Block(128, 256, 2, 2)
        self.block3 = Block(256, 728, 2, 2)
        # Middle flow: eight identical modules (block4..block11).
        for i in range(4, 12):
            setattr(self, f"block{i}", Block(728, 728, 3, 1))
        # Exit flow.
        self.block12 = Block(728, 1024, 2, 2, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(1536)
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(1536, NUM_FEATURES, 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(NUM_FEATURES)
        self.act4 = nn.ReLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(NUM_FEATURES, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        for i in range(1, 13):
            x = getattr(self, f"block{i}")(x)
        x = self.act3(self.bn3(self.conv3(x)))
        return self.act4(self.bn4(self.conv4(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def seed_weights(model: nn.Module, seed: int) -> None:
    """Deterministic random weights for ``seed``, with batch-norm statistics calibrated so
    that every normalized activation has roughly zero mean and unit variance.

    Weights come from torch's CPU generator (identical across machines). The statistics
    are measured in float64 on one seeded batch, so they too are reproducible across CPUs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                # He init over fan-out, as timm does for this model.
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch gives its exact statistics
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
        x = torch.randn(CALIBRATION_SHAPE, generator=gen, dtype=torch.float64)
        model.double().train()
        model(x)
        model.float().eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (batch-norm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_conv_layers(model: nn.Module) -> int:
    """Convolution layers as the paper counts them: a separable conv is one layer, the
    1x1 convs on residual branches are not counted."""
    separable = sum(isinstance(m, SeparableConv2d) for m in model.modules())
    plain = sum(isinstance(m, nn.Conv2d) for m in model.modules()) - 2 * separable
    skips = sum(isinstance(m, Block) and m.skip is not None for m in model.modules())
    return separable + plain - skips
