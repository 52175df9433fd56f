"""BaseNet: the seed's conv-pool-conv-pool-fc-fc classifier, with every width configurable."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from shrinkflow.models.architecture import ArchOptions
from shrinkflow.models.shapes import copy_matching

Width = Annotated[int, Field(ge=1)]


class BaseNetOptions(ArchOptions):
    """``model`` for BaseNet: conv stage widths, hidden layer widths, BatchNorm after each conv."""

    arch: Literal["basenet"] = "basenet"
    channels: tuple[Width, ...] = (32, 64)
    hidden: tuple[Width, ...] = (128,)
    batch_norm: bool = False


class BaseNet(nn.Module):
    """``len(channels)`` conv(3x3)-[BN]-ReLU-maxpool stages, then ``len(hidden)`` fc-ReLU layers
    and a linear classifier. The seed is ``channels=(64, 128), hidden=(1000,)`` on 32x32 inputs."""

    ARCH: ClassVar[str] = "basenet"
    Options: ClassVar[type[ArchOptions]] = BaseNetOptions

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: tuple[int, ...] = (64, 128),
        hidden: tuple[int, ...] = (1000,),
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if image_size < self.min_image_size({"channels": channels}):
            raise ValueError(
                f"image_size {image_size} is too small for {len(channels)} pooling stages "
                f"(needs at least {2 ** len(channels)})"
            )
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.batch_norm = batch_norm
        layers: list[nn.Module] = []
        prev, size = in_channels, image_size
        for width in channels:
            layers.append(nn.Conv2d(prev, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev, size = width, size // 2
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        prev = prev * size * size
        for width in hidden:
            head += [nn.Linear(prev, width), nn.ReLU(inplace=True)]
            prev = width
        head.append(nn.Linear(prev, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments read off the live layers, so a pruned net describes itself."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        return {
            "arch": "basenet",
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "channels": [m.out_channels for m in convs],
            "hidden": [m.out_features for m in linears[:-1]],
            "batch_norm": self.batch_norm,
        }

    def classifier_layer(self) -> nn.Linear:
        return self.classifier[-1]

    @classmethod
    def has_batch_norm(cls, options: dict[str, Any]) -> bool:
        return bool(options.get("batch_norm"))

    @classmethod
    def min_image_size(cls, options: dict[str, Any]) -> int:
        """Each stage halves the image: ``len(channels)`` stages need ``2 ** len(channels)``."""
        return 2 ** len(options.get("channels") or ())

    @classmethod
    def removable_blocks(cls, options: dict[str, Any]) -> int:
        """Hidden layers, and conv stages beyond the first, that ``shallower`` can drop."""
        return len(options.get("channels") or ()) - 1 + len(options.get("hidden") or ())

    def shallower(self, drop: int) -> nn.Module:
        """A copy with ``drop`` layers removed: hidden layers first (last first), then conv stages
        (last first), an order in which params fall at every step. Layers whose shapes survive
        keep their weights; the rest start fresh."""
        spec = self.spec()
        removable = self.removable_blocks(spec)
        if not 1 <= drop <= removable:
            raise ValueError(f"basenet {spec['channels']}/{spec['hidden']} can drop 1..{removable} layers")
        n_hidden = min(drop, len(spec["hidden"]))
        spec["hidden"] = spec["hidden"][: len(spec["hidden"]) - n_hidden]
        spec["channels"] = spec["channels"][: len(spec["channels"]) - (drop - n_hidden)]
        spec.pop("arch")
        shallow = BaseNet(**{**spec, "channels": tuple(spec["channels"]), "hidden": tuple(spec["hidden"])})
        copy_matching(self.state_dict(), shallow)
        return shallow
