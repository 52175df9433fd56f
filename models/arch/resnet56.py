"""ResNet-56 for CIFAR (He et al., "Deep Residual Learning for Image Recognition", 2016, sec. 4.2):
a 3x3 stem of 16 channels, then three stages of nine BasicBlocks of 16, 32 and 64 channels (the
last two halving the resolution), global average pooling and a linear classifier. It is the
network of the structured-pruning literature's CIFAR-10 tables (Torch-Pruning's included), so a
benchmark on it compares with published results. Shortcuts that change shape are 1x1 conv + BN
(option B), which dependency-graph pruning follows."""

from __future__ import annotations

from shrinkflow.models.arch.tvnets import SmallResNet
from shrinkflow.models.arch.tvoptions import ResNet56Options


class CifarResNet56(SmallResNet):
    """ResNet-56: widths ``(16, 32, 64) * width_mult``, nine BasicBlocks per stage."""

    ARCH = "resnet56"
    Options = ResNet56Options
    WIDTHS = (16, 32, 64)
    DEFAULT_BLOCKS = (9, 9, 9)
