"""Whether a network gives the same answers to the same images every time it is asked.

A served model that changes its answers between calls (dropout left active at inference,
BatchNorm normalising by the batch, random numbers drawn in ``forward``) is wrong in a way no
accuracy figure shows: it passes the gate on one evaluation and answers differently the next.
The baseline is refused and a candidate fails for it, with the cause named.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
BATCH_NORM = nn.modules.batchnorm._BatchNorm


@contextlib.contextmanager
def _training_modules(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """The modules that run in training mode while the block calls ``model`` (a ``forward``
    may call ``self.train()`` after the caller's ``eval()``), by name."""
    found: dict[str, nn.Module] = {}
    names = {module: name for name, module in model.named_modules()}

    def seen(module: nn.Module, _inputs: object) -> None:
        if module.training and module is not model:
            found.setdefault(names.get(module, type(module).__name__), module)

    hooks = [m.register_forward_pre_hook(seen) for m in model.modules()]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def _of_kind(found: dict[str, nn.Module], kinds: tuple[type, ...] | type) -> str | None:
    return next((name for name, module in found.items() if isinstance(module, kinds)), None)


@torch.no_grad()
def nondeterminism(model: nn.Module, x: Tensor) -> str | None:
    """Why ``model`` in eval mode does not answer the images ``x`` (two or more) the same way
    every time, or None when it does: two calls must agree exactly, and no BatchNorm may run in
    training mode (its answers would depend on the other images of the batch, so identical calls
    agree while served ones do not). The model is left in eval mode."""
    model.eval()
    with _training_modules(model) as training:
        first, second = model(x), model(x)
    agree = _same(first, second)
    model.eval()
    if not agree and (name := _of_kind(training, DROPOUT)):
        return f"dropout {name!r} is in training mode after eval() (set in forward): answers change each call"
    if name := _of_kind(training, BATCH_NORM):
        return (
            f"BatchNorm {name!r} is in training mode after eval() (set in forward), so an image's answer "
            "depends on the other images of its batch"
        )
    if agree:
        return None
    if training:
        name, module = next(iter(training.items()))
        kind = type(module).__name__
        return f"module {name!r} ({kind}) is in training mode after eval() and answers change between calls"
    return _random_or_stateful(model, x)


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal element for element (NaN where both are NaN counts as equal: it is not a change)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _random_or_stateful(model: nn.Module, x: Tensor) -> str:
    """Tell randomness in ``forward`` (calls agree when torch's generator is re-seeded the same
    way before each) from state kept between calls; the process's generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        first = model(x)
        torch.manual_seed(0)
        reseeded_agree = _same(first, model(x))
    model.eval()
    if reseeded_agree:
        return (
            "forward draws random numbers (answers agree only when torch's generator is re-seeded "
            "before each call: torch.rand, F.dropout(training=True), ...)"
        )
    return "answers change between calls even with the same random seed (state kept from call to call?)"
