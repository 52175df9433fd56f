"""Images to model input, written once: ``prepare`` (through ``tasks/data/sources.py``) and the served
model (``tasks/store/serving.py``) call these same functions, so training data and served images are
converted, resized and normalised identically.

A model declares what it takes with :class:`InputOptions` (``model.input`` in ``params.yaml``): a
preset (``data``: the pipeline's own convention, the training split's per-channel statistics at
the data's size; ``imagenet``: torchvision's) and any value overridden. The prepared data's
manifest records the resolved values; everything downstream reads them from there.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA (alpha dropped)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L"
RESIZE_POLICIES = ("stretch", "center_crop")

PRESETS: dict[str, dict[str, Any]] = {
    # The pipeline's own networks: statistics of the training split, the data's own size.
    "data": {"size": None, "channels": None, "mean": None, "std": None, "resize": "stretch"},
    # torchvision's ImageNet weights: RGB, these statistics, 224 pixels, shorter side then centre.
    "imagenet": {
        "size": 224,
        "channels": 3,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "resize": "center_crop",
    },
}


class InputOptions(BaseModel):
    """``preset`` plus overrides: ``size`` (square side), ``channels`` (1 or 3), ``mean`` and
    ``std`` (per channel, of pixels scaled to [0, 1]), ``resize`` (``stretch`` to the square, or
    ``center_crop``: shorter side to ``size``, then the centre square)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["data", "imagenet"] = "data"
    size: Annotated[int, Field(ge=1, le=4096)] | None = None
    channels: Literal[1, 3] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[Annotated[float, Field(gt=0)], ...] | None = None
    resize: Literal["stretch", "center_crop"] | None = None

    def resolved(self) -> dict[str, Any]:
        """The preset with every value given here put over it."""
        given = self.model_dump(exclude={"preset"}, exclude_none=True)
        return {**PRESETS[self.preset], **given}

    @model_validator(mode="after")
    def _consistent(self) -> InputOptions:
        values = self.resolved()
        if (values["mean"] is None) != (values["std"] is None):
            raise ValueError("input.mean and input.std go together: give both, or neither")
        if values["mean"] is not None:
            if len(values["mean"]) != len(values["std"]):
                raise ValueError("input.mean and input.std must have one value per channel each")
            if values["channels"] and len(values["mean"]) != values["channels"]:
                raise ValueError(
                    f"input.mean has {len(values['mean'])} values for {values['channels']} channels"
                )
        return self


def channels_first(images: np.ndarray) -> np.ndarray:
    """``N x C x H x W`` from either layout (channels-first wins when both could be channels)."""
    if images.ndim != 4:
        raise ValueError(f"expected N x C x H x W or N x H x W x C images, got shape {images.shape}")
    if images.shape[1] in CHANNEL_COUNTS:
        return images
    if images.shape[3] in CHANNEL_COUNTS:
        return images.transpose(0, 3, 1, 2)
    raise ValueError(f"no channel dimension of 1, 3 or 4 in image shape {images.shape}")


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 ``N x C x H x W`` with 1, 3 or 4 channels -> ``channels`` (alpha dropped; grey
    repeated, or colour to ITU-R 601 luma, rounded)."""
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.repeat(1, 3, 1, 1)
    luma = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() * luma).sum(1, keepdim=True).round().to(torch.uint8)


def fit_size(x: torch.Tensor, size: int, policy: str = "stretch", scale: float = 255.0) -> torch.Tensor:
    """uint8 ``N x C x H x W`` -> ``N x C x size x size``: antialiased bilinear, rounded back to
    the pixel scale. ``stretch`` resizes to the square; ``center_crop`` resizes the shorter side to
    ``size`` (keeping the aspect ratio) and keeps the centre square."""
    height, width = x.shape[2:]
    if (height, width) == (size, size):
        return x
    if policy == "center_crop" and height != width:
        short = min(height, width)
        target = (max(size, round(height * size / short)), max(size, round(width * size / short)))
    else:
        target = (size, size)
    y = torch.nn.functional.interpolate(x.float(), size=target, mode="bilinear", antialias=True)
    y = y.round().clamp(0, scale).to(torch.uint8)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    return y[:, :, top : top + size, left : left + size].contiguous()


def normalise(x: torch.Tensor, mean: list[float], std: list[float], scale: float) -> torch.Tensor:
    """Stored uint8 pixels -> the float32 input every model takes."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.to(torch.float32) / scale - m) / s


def to_model_input(images: np.ndarray, manifest: dict[str, Any]) -> torch.Tensor:
    """Raw uint8 images of any size and 1, 3 or 4 channels, either layout -> the normalised
    float32 ``N x C x H x W`` the network was trained on, as the manifest describes it."""
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {images.dtype}")
    channels, height, _ = manifest["input_shape"]
    x = torch.from_numpy(np.ascontiguousarray(channels_first(images)))
    x = to_channels(x, channels)
    x = fit_size(x, height, manifest.get("resize", "stretch"), manifest["scale"])
    return normalise(x, manifest["mean"], manifest["std"], manifest["scale"])
