"""torchvision's ResNet-18 and MobileNetV2, adapted to small inputs (3x3 stride-1 stem, no
initial max-pool, any number of input channels), with a width multiplier and per-stage depth.

Both are built from torchvision's own blocks and forward code; no weights are downloaded. Their
spec records every layer's shape (``layers``), so a pruned network rebuilds exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2, _make_divisible
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.misc import Conv2dNormActivation

from shrinkflow.models.arch.tvoptions import MobileNetV2Options, ResNet18Options
from shrinkflow.models.shapes import copy_matching, layer_shapes, resize_layers


class _Staged:
    """Spec and depth handling shared by the staged torchvision networks."""

    ARCH: ClassVar[str]
    DEFAULT_BLOCKS: ClassVar[tuple[int, ...]]

    def spec(self) -> dict[str, Any]:
        """Constructor arguments plus every layer's shape, so a pruned net describes itself."""
        return {
            "arch": self.ARCH,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "width_mult": self.width_mult,
            "blocks": list(self.blocks),
            "layers": layer_shapes(self),
        }

    @classmethod
    def has_batch_norm(cls, options: dict[str, Any]) -> bool:
        return True

    @classmethod
    def min_image_size(cls, options: dict[str, Any]) -> int:
        """Padded convolutions and adaptive pooling take any size (small ones lose resolution)."""
        return 1

    @classmethod
    def removable_blocks(cls, options: dict[str, Any]) -> int:
        """Blocks that can go while every stage keeps its first (resolution-changing) block."""
        return sum(n - 1 for n in options.get("blocks") or cls.DEFAULT_BLOCKS)

    def block_prefix(self, stage: int, block: int) -> str:
        raise NotImplementedError

    def shallower(self, drop: int) -> nn.Module:
        """A copy with ``drop`` trailing blocks removed, round-robin from the deepest stage; the
        surviving blocks keep their trained weights (a residual block dropped is close to an
        identity, so the network starts near its old function)."""
        blocks = list(self.blocks)
        removable = sum(n - 1 for n in blocks)
        if not 1 <= drop <= removable:
            raise ValueError(f"{self.ARCH} can drop 1..{removable} blocks, not {drop}")
        stage = len(blocks) - 1
        while drop:
            if blocks[stage] > 1:
                blocks[stage] -= 1
                drop -= 1
            stage = (stage - 1) % len(blocks)
        spec = {k: v for k, v in self.spec().items() if k not in ("arch", "layers")}
        shallow = type(self)(**{**spec, "blocks": blocks})
        rename = {
            self.block_prefix(s, b): (shallow.block_prefix(s, b) if b < blocks[s] else None)
            for s, n in enumerate(self.blocks)
            for b in range(n)
        }
        copy_matching(self.state_dict(), shallow, rename)
        return shallow

    def _finish(self, layers: dict[str, list[int]] | None) -> None:
        if layers:
            resize_layers(self, layers)


class SmallResNet(_Staged, ResNet):
    """ResNet-18 (BasicBlock, ``blocks`` per stage) with stage widths ``64..512 * width_mult``.
    Subclasses change ``WIDTHS`` and ``DEFAULT_BLOCKS`` for other BasicBlock ResNets (up to four
    stages; the first keeps the resolution, each later one halves it)."""

    ARCH = "resnet18"
    Options = ResNet18Options
    WIDTHS: ClassVar[tuple[int, ...]] = (64, 128, 256, 512)
    DEFAULT_BLOCKS = (2, 2, 2, 2)

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width_mult: float = 1.0,
        blocks: tuple[int, ...] | None = None,
        layers: dict | None = None,
    ) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes the ImageNet stem and widths
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.width_mult, self.blocks = width_mult, tuple(blocks or self.DEFAULT_BLOCKS)
        widths = [max(4, round(w * width_mult)) for w in self.WIDTHS]
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.Identity()
        for i, (width, n) in enumerate(zip(widths, self.blocks, strict=True)):
            setattr(self, f"layer{i + 1}", self._make_layer(BasicBlock, width, n, stride=1 if i == 0 else 2))
        for i in range(len(widths), 4):  # torchvision's forward runs layer1..layer4
            setattr(self, f"layer{i + 1}", nn.Identity())
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(widths[-1], num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        self._finish(layers)

    def block_prefix(self, stage: int, block: int) -> str:
        return f"layer{stage + 1}.{block}."

    def classifier_layer(self) -> nn.Linear:
        return self.fc


# torchvision's MobileNetV2 setting: expansion t, channels c, blocks n, first stride s.
_MOBILENET_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class SmallMobileNetV2(_Staged, MobileNetV2):
    """MobileNetV2 with a stride-1 stem, no dropout (training draws no global random numbers)
    and a last 1x1 conv scaled with ``width_mult`` too (torchvision keeps it at 1280)."""

    ARCH = "mobilenet_v2"
    Options = MobileNetV2Options
    DEFAULT_BLOCKS = tuple(n for _, _, n, _ in _MOBILENET_SETTING)

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width_mult: float = 1.0,
        blocks: tuple[int, ...] = DEFAULT_BLOCKS,
        layers: dict | None = None,
    ) -> None:
        setting = [[t, c, n, s] for (t, c, _, s), n in zip(_MOBILENET_SETTING, blocks, strict=True)]
        super().__init__(num_classes, width_mult, setting, dropout=0.0)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.width_mult, self.blocks = width_mult, tuple(blocks)
        stem_out = self.features[0][0].out_channels
        last_in = self.features[-1][0].in_channels
        self.last_channel = _make_divisible(1280 * width_mult, 8)
        self.features[0] = Conv2dNormActivation(in_channels, stem_out, stride=1, activation_layer=nn.ReLU6)
        self.features[-1] = Conv2dNormActivation(last_in, self.last_channel, 1, activation_layer=nn.ReLU6)
        self.classifier[-1] = nn.Linear(self.last_channel, num_classes)
        for m in [*self.features[0].modules(), *self.features[-1].modules(), self.classifier[-1]]:
            if isinstance(m, nn.Conv2d):  # torchvision's MobileNetV2 initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self._finish(layers)

    def block_prefix(self, stage: int, block: int) -> str:
        return f"features.{1 + sum(self.blocks[:stage]) + block}."

    def classifier_layer(self) -> nn.Linear:
        return self.classifier[-1]

    def shallower(self, drop: int) -> nn.Module:
        shallow = super().shallower(drop)
        # The last 1x1 conv moves index when blocks go; carry its weights over too.
        tail = {f"features.{len(self.features) - 1}.": f"features.{len(shallow.features) - 1}."}
        copy_matching(
            {k: v for k, v in self.state_dict().items() if k.startswith(next(iter(tail)))}, shallow, tail
        )
        return shallow
