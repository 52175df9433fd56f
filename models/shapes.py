"""Per-layer shapes: read them off a (possibly pruned) network and impose them on a fresh one.

Structured pruning leaves irregular widths that no constructor argument describes, so a
torchvision-based architecture records every conv/BN/linear shape in its spec; rebuilding
swaps in layers of the recorded shapes, after which ``load_state_dict`` fits exactly.
"""

from __future__ import annotations

from torch import nn


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{name: shape}`` for every conv (``[in, out, groups]``), BatchNorm (``[features]``) and
    linear (``[in, out]``) layer."""
    shapes: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = [module.in_channels, module.out_channels, module.groups]
        elif isinstance(module, nn.BatchNorm2d):
            shapes[name] = [module.num_features]
        elif isinstance(module, nn.Linear):
            shapes[name] = [module.in_features, module.out_features]
    return shapes


def _resized(module: nn.Module, shape: list[int]) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        cin, cout, groups = shape
        return nn.Conv2d(
            cin,
            cout,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            groups,
            module.bias is not None,
            module.padding_mode,
        )
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(
            shape[0], module.eps, module.momentum, module.affine, module.track_running_stats
        )
    return nn.Linear(shape[0], shape[1], bias=module.bias is not None)


def resize_layers(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Replace every layer whose shape differs from ``shapes`` with a fresh one of that shape."""
    current = layer_shapes(model)
    unknown = set(shapes) - set(current)
    if unknown:
        raise ValueError(f"spec names layers the architecture does not have: {sorted(unknown)[:5]}")
    for name, shape in shapes.items():
        if current[name] != list(shape):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, _resized(parent.get_submodule(child), list(shape)))
    return model


def copy_matching(source: dict, target: nn.Module, rename: dict[str, str | None] | None = None) -> int:
    """Load every tensor of ``source`` whose (renamed) key and shape exist in ``target``; return
    how many were copied. ``rename`` maps key prefixes (ending in ".") to new prefixes, or to
    ``None`` to skip them. Used to warm-start a shallower network from a deeper one."""
    state = target.state_dict()
    copied = 0
    for key, value in source.items():
        prefix = next((p for p in (rename or {}) if key.startswith(p)), None)
        if prefix is not None and rename[prefix] is None:
            continue  # a dropped block: its tensors must not land on a same-shaped survivor
        new_key = rename[prefix] + key[len(prefix) :] if prefix else key
        if new_key in state and state[new_key].shape == value.shape:
            state[new_key] = value.clone()
            copied += 1
    target.load_state_dict(state)
    return copied
