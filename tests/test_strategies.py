"""Every registered strategy on every architecture, the training modes, composition and the
ratio search. Tiny widths and 8x8 inputs keep the whole file fast on two cores."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from shrinkflow.models import ARCHITECTURES, STRATEGIES, apply_strategy, build_model
from shrinkflow.models.arch.basenet import BaseNet
from shrinkflow.models.arch.given import user_code
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.quantize import Int8Net, dense_twin
from shrinkflow.models.strategies.structured import step_ratios
from shrinkflow.tasks.config import ConfigError, SearchConfig, TrainConfig, parse_params
from shrinkflow.tasks.data.prepare import load_split
from shrinkflow.tasks.decision.stats import compare
from shrinkflow.tasks.io import save_checkpoint
from shrinkflow.tasks.measurement.evaluate import count_flops, serialized_size, weight_sparsity
from shrinkflow.tasks.training.engine import (
    Hooks,
    bn_l1_penalty,
    distillation_loss,
    evaluate,
    fit,
    keep_zeros,
)
from shrinkflow.tasks.training.search import best_trial, search_ratio
from tests.conftest import REPO, batch, small_raw

SPECS = {
    "basenet": {"channels": [16, 32], "hidden": [32], "batch_norm": True},
    "resnet18": {"width_mult": 0.125},
    "mobilenet_v2": {"width_mult": 0.25, "blocks": [1, 2, 1, 2, 1, 1, 1]},  # few blocks: fast int8
    "resnet56": {"width_mult": 0.5, "blocks": [2, 2, 2]},
    # a user's own network (examples/byo: residual blocks, depthwise convolutions, squeeze-excitation)
    "factory": {"factory": "models.tinynet:build", "kwargs": {"width": 32}},
}
RATIO = 0.5
# torchvision's networks have 3-channel stems; tests/test_given.py prunes and rebuilds them.
COVERED_ELSEWHERE = {"torchvision"}


@pytest.fixture(scope="module", autouse=True)
def _users_code():
    with user_code(REPO / "examples" / "byo"):
        yield


def test_every_architecture_has_test_settings():
    assert set(SPECS) | COVERED_ELSEWHERE == set(ARCHITECTURES)


@pytest.fixture(scope="module", params=sorted(SPECS))
def base(request):
    """An untrained net of each architecture, its BatchNorm scales spread as training would."""
    torch.manual_seed(0)
    model = build_model(
        {"arch": request.param, "in_channels": 1, "image_size": 8, "num_classes": 10, **SPECS[request.param]}
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.1, 1.0)
    return model.eval()


def _size(model: nn.Module) -> tuple[int, int]:
    x, _ = batch()
    dense = dense_twin(model)
    return sum(p.numel() for p in dense.parameters()), count_flops(dense, x[:1])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_on_every_architecture(name, base, tmp_path):
    strategy, x, y = STRATEGIES[name], *batch()
    if strategy.needs_parametric and not getattr(type(base), "PARAMETRIC", True):
        assert "needs a parametric architecture" in strategy.refusal(base.spec())
        return  # width and depth rebuild from constructor arguments a brought network lacks
    assert strategy.refusal(base.spec()) is None, "SPECS give every strategy something to shrink"
    options = {"ratio": RATIO} if "ratio" in strategy.options.model_fields else {}
    shrunk = apply_strategy(name, copy.deepcopy(base), (x, y), **options)
    assert shrunk(x).shape == base(x).shape == (16, 10)
    (params, flops), (base_params, base_flops) = _size(shrunk), _size(base)
    if not strategy.changes_shapes:  # what falls is stored bits (zeros, int8), not shapes
        assert (params, flops) == (base_params, base_flops)
    elif strategy.needs_depth:  # whole layers go: params fall, FLOPs never rise
        assert params < base_params and flops <= base_flops
    else:  # every channel width falls by the ratio: params and FLOPs to about (1 - r)^2
        # MobileNetV2's width multiplier rounds channels up to multiples of 8: tiny nets shrink less.
        slack = 0.3 if (name, base.spec()["arch"]) == ("width", "mobilenet_v2") else 0.15
        assert params < base_params * (1 - RATIO + slack) and flops < base_flops * (1 - RATIO + slack)
    if strategy.keeps_zeros:
        assert weight_sparsity(shrunk) == pytest.approx(RATIO, abs=0.01)
    if not strategy.trains:
        # The example's network keeps more float bytes (measured 0.56: its many small depthwise and
        # squeeze-excitation tensors carry per-tensor quantisation parameters).
        limit = 0.6 if base.spec()["arch"] == "factory" else 0.5
        assert isinstance(shrunk, Int8Net) and serialized_size(shrunk) < limit * serialized_size(base)
        assert (shrunk(x) - base(x)).abs().max() < 0.25 * base(x).abs().max() + 1e-3
    path = tmp_path / "m.pt"
    loaded, _ = load_checkpoint(path, sha256=save_checkpoint(shrunk, path))
    # An int8 net's oneDNN kernels do not repeat bit for bit call to call on some CPUs (AMD EPYC:
    # up to 0.18 between two calls of one model); its stored q/dq graph does.
    run = (lambda m: m.reference(x)) if isinstance(shrunk, Int8Net) else (lambda m: m(x))
    assert torch.equal(run(loaded), run(shrunk))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "resnet56"])
def test_depth_keeps_the_surviving_blocks_weights(arch):
    torch.manual_seed(0)
    model = build_model({"arch": arch, "in_channels": 1, "image_size": 8, "num_classes": 10, **SPECS[arch]})
    shallow = apply_strategy("depth", copy.deepcopy(model), batch(), ratio=0.01)  # one block
    assert sum(shallow.blocks) == sum(model.blocks) - 1
    old, new = model.state_dict(), shallow.state_dict()
    # stage 1 is untouched; BatchNorm statistics are recomputed for the network it is now part of
    survivors = [k for k, v in shallow.named_parameters() if k.startswith(shallow.block_prefix(0, 0))]
    assert survivors and all(torch.equal(new[k], old[k]) for k in survivors)
    assert torch.equal(shallow.classifier_layer().weight, model.classifier_layer().weight)


# --- refused up front, at config time ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["shrink.candidates={s: {strategy: slim, ratio: 0.5}}"], "needs BatchNorm"),
        (
            [
                "model={arch: basenet, channels: [8], hidden: []}",
                "shrink.candidates={d: {strategy: depth, ratio: 0.5}}",
            ],
            "needs a layer or block",
        ),
        (["model={arch: resnet18, channels: [8]}"], "model.channels does not apply to resnet18"),
        (["shrink.candidates={q: {strategy: int8, distill: {}}}"], "'distill' does not apply"),
        (["shrink.candidates={w: {strategy: width, ratio: 0.5, search: {}}}"], "exactly one of ratio"),
        (["shrink.candidates={w: {strategy: width}}"], "exactly one of ratio"),
        (["shrink.candidates={m: {strategy: magnitude, ratio: 0.5, sparsity: 0.1}}"], "unknown key"),
        (["shrink.candidates={w: {strategy: width, search: {low: 0.8, high: 0.5}}}"], "low must be below"),
        (
            ["shrink.candidates={p: {strategy: prune_l1, ratio: 0.95, global_pruning: true}}"],
            "ratio 0.95 is above max_layer_ratio 0.9",
        ),
        (
            ["shrink.candidates={p: {strategy: prune_l1, ratio: 0.5, max_layer_ratio: 1.0}}"],
            "max_layer_ratio",
        ),
        (["shrink.candidates={p: {strategy: prune_fpgm, ratio: 0.5, round_to: 1}}"], "round_to"),
    ],
)
def test_misfits_are_refused_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_params(small_raw(*overrides))
    assert "\n" not in str(info.value), "errors are one line"


def test_every_strategy_is_declarable_and_composes():
    params = parse_params(
        small_raw(
            "model.batch_norm=true",
            "shrink.candidates={p: {strategy: prune_taylor, ratio: 0.5, distill: {alpha: 0.5},"
            " quantize: int8},"
            " s: {strategy: slim, search: {mode: step}}, q: {strategy: int8}}",
        )
    )
    cands = params.shrink.candidates
    assert cands["p"].steps() == ["prune_taylor", "distill", "int8"]
    assert cands["p"].options() == {
        "ratio": 0.5,
        "global_pruning": False,
        "iterative_steps": 1,
        "round_to": None,
        "max_layer_ratio": 0.9,
        "budget": None,
        "allocation": "uniform",
        "sensitivity_ratios": (0.25, 0.5, 0.75, 0.9),
        "samples": 16,
    }
    assert cands["s"].sparsity_phase() == (5, 0.1) and "sparsity" not in cands["s"].options()
    assert cands["q"].options() == {}


# --- what tells each strategy apart ------------------------------------------------------------


def _crafted() -> BaseNet:
    """One conv stage of four channels feeding the classifier. Channel 0 has by far the largest
    weights but the classifier ignores it; channels 1 and 2 are identical; channel 3 is tiny but
    used."""
    torch.manual_seed(0)
    model = BaseNet(in_channels=1, image_size=8, num_classes=10, channels=(4,), hidden=())
    conv, linear = model.features[0], model.classifier_layer()
    with torch.no_grad():
        conv.weight[0] *= 10
        conv.weight[2] = conv.weight[1]
        conv.bias[2] = conv.bias[1]
        conv.weight[3] *= 0.05
        linear.weight[:, :16] = 0  # channel 0's 4x4 outputs are the first 16 inputs
    return model


def _removed(name: str) -> set[int]:
    """Which of the crafted net's four channels ``name`` removes at ratio 0.25."""
    base = _crafted()
    before = base.features[0].weight.detach().clone()
    shrunk = apply_strategy(name, copy.deepcopy(base), batch(64), ratio=0.25)
    after = shrunk.features[0].weight.detach()
    left = set(range(4))
    for row in after:  # each survivor accounts for one original channel (1 and 2 are twins)
        left.remove(next(i for i in sorted(left) if torch.equal(row, before[i])))
    return left


def test_importances_disagree_where_they_should():
    assert _removed("prune_l1") == {3}, "L1 removes the channel of smallest norm"
    assert _removed("prune_taylor") == {0}, "Taylor removes the channel the loss does not depend on"
    assert _removed("prune_fpgm") in ({1}, {2}), "FPGM removes a duplicate: it is the most replaceable"


def test_slim_removes_the_smallest_batchnorm_scales():
    torch.manual_seed(0)
    model = BaseNet(
        in_channels=1, image_size=8, num_classes=10, channels=(8, 8), hidden=(16,), batch_norm=True
    )
    scales = torch.tensor([0.9, 0.01, 0.8, 0.02, 0.7, 0.03, 0.6, 0.04])
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.weight.data.copy_(scales)
    shrunk = apply_strategy("slim", model, batch(), ratio=0.5)
    for bn in (m for m in shrunk.modules() if isinstance(m, nn.BatchNorm2d)):
        assert sorted(bn.weight.tolist()) == pytest.approx([0.6, 0.7, 0.8, 0.9])


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _digits():
    """sklearn's digits, normalised: 1200 training and 597 validation images, 1x8x8."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x, y = (x - x.mean()) / x.std(), torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def _pruned(before: nn.Module, after: nn.Module) -> set[tuple[int, int]]:
    """(layer, channel) of every BatchNorm channel removed: those whose scale no survivor has."""
    gone = set()
    for layer, (old, new) in enumerate(zip(_bns(before), _bns(after), strict=True)):
        kept = set(new.weight.tolist())
        gone |= {(layer, c) for c, g in enumerate(old.weight.tolist()) if g not in kept}
    return gone


def test_slim_sparsity_phase_decides_which_channels_go():
    """At its default strength (and train.lr 0.05) the penalty, not the baseline's scales, picks
    the channels slim removes; the same phase without it leaves every scale far from zero and
    removes other channels. (At the old default, 1e-4, both arms removed the same channels.)"""
    train, val = _digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is as fast, and does not spin when cores are busy
    try:
        arms = _slim_arms(train, val)
    finally:
        torch.set_num_threads(threads)
    (scales, pruned), (plain_scales, plain_pruned) = arms["penalised"], arms["plain"]
    near_zero = {k for k, g in scales.items() if g < 1e-2}
    assert len(near_zero) > 0.5 * len(scales) and min(plain_scales.values()) > 0.5
    assert pruned <= near_zero, "every channel slim removes is one the penalty drove to ~0"
    assert len(pruned & plain_pruned) < 0.8 * len(pruned), "without the penalty other channels go"


def _slim_arms(train, val) -> dict[str, tuple[dict[tuple[int, int], float], set[tuple[int, int]]]]:
    """Each arm's BatchNorm scales after the phase and the channels slim then removes at 0.5."""
    torch.manual_seed(0)
    baseline = BaseNet(1, 8, 10, channels=(32, 64), hidden=(128,), batch_norm=True)
    fit(baseline, train, val, TrainConfig(epochs=10, lr=0.05, device="cpu"), seed=0)
    epochs, strength = STRATEGIES["slim"].options().sparsity_phase()
    phase = TrainConfig(epochs=epochs, lr=0.05, device="cpu")
    arms = {}
    for name, hooks in (("penalised", Hooks(penalty=bn_l1_penalty(strength))), ("plain", Hooks())):
        model = copy.deepcopy(baseline)
        fit(model, train, val, phase, seed=0, hooks=hooks)
        shrunk = apply_strategy("slim", copy.deepcopy(model), (train[0][:64], train[1][:64]), ratio=0.5)
        scales = {
            (i, c): abs(g) for i, bn in enumerate(_bns(model)) for c, g in enumerate(bn.weight.tolist())
        }
        arms[name] = scales, _pruned(model, shrunk)
    return arms


def test_global_pruning_never_cuts_a_layer_below_its_limit():
    """Layer 1's BatchNorm scales are tiny but for one, so ranked globally (each layer's scores
    relative to its mean) its 15 small channels come below every channel of layer 2."""

    def widths(limit: float) -> list[int]:
        torch.manual_seed(0)
        model = BaseNet(1, 8, 10, channels=(16, 16), hidden=(16,), batch_norm=True)
        first, second = _bns(model)
        with torch.no_grad():
            first.weight.copy_(torch.tensor([1.0] + [1e-3] * 15))
            second.weight.copy_(torch.linspace(0.5, 1.0, 16))
        shrunk = apply_strategy("slim", model, batch(), ratio=0.5, max_layer_ratio=limit)
        assert shrunk(batch()[0]).shape == (16, 10)
        return shrunk.spec()["channels"]

    assert widths(0.99) == [1, 15], "without a real limit the layer is all but emptied"
    assert widths(0.75) == [4, 12], "a quarter of 16 kept; layer 2 gives the rest: still half in all"
    with pytest.raises(ValueError, match="above max_layer_ratio"):
        apply_strategy("slim", _crafted(), batch(), ratio=0.95, max_layer_ratio=0.9)


def test_round_to_rounds_each_layers_kept_channels_to_the_nearest_multiple():
    def widths(**options) -> tuple[list[int], list[int]]:
        torch.manual_seed(0)
        model = BaseNet(1, 8, 10, channels=(6, 44), hidden=(30,))
        shrunk = apply_strategy("prune_l1", model, batch(), ratio=0.6, **options)
        assert shrunk(batch()[0]).shape == (16, 10)
        return shrunk.spec()["channels"], shrunk.spec()["hidden"]

    assert widths() == ([2, 17], [12])  # int(0.4 * width)
    # 2 -> at least one multiple but never above the width (6); 17 -> 16; 12 -> 16 (halves up)
    assert widths(round_to=8) == ([6, 16], [16])
    assert widths(round_to=16) == ([6, 16], [16])
    assert widths(round_to=4) == ([4, 16], [12])


@pytest.mark.parametrize(("ratio", "steps"), [(0.75, 3), (0.6, 4), (0.5, 5)])
def test_step_ratios_applied_in_turn_reach_the_one_shot_widths(ratio, steps):
    ratios = step_ratios(ratio, steps)
    assert len(ratios) == steps and math.prod(1 - r for r in ratios) == pytest.approx(1 - ratio)
    torch.manual_seed(0)
    model = BaseNet(1, 8, 10, channels=(32, 64), hidden=(48,))

    def widths(m: nn.Module) -> list[int]:
        return m.spec()["channels"] + m.spec()["hidden"]

    one_shot = widths(apply_strategy("prune_l1", copy.deepcopy(model), batch(), ratio=ratio))
    iterative = apply_strategy("prune_l1", copy.deepcopy(model), batch(), ratio=ratio, iterative_steps=steps)
    assert widths(iterative) == one_shot
    for r in ratios:  # as the pipeline applies them, fine-tuning in between
        model = apply_strategy("prune_l1", model, batch(), ratio=r)
    # Each application floors its layer widths, so a layer may end up to steps - 1 channels narrower.
    stepped = widths(model)
    assert all(0 <= b - a < steps for a, b in zip(stepped, one_shot, strict=True)), (stepped, one_shot)


def test_step_ratios_refuse_what_cannot_be_split():
    assert step_ratios(0.5, 2) == pytest.approx([0.25, 1 / 3])
    assert step_ratios(0.3, 1) == pytest.approx([0.3])
    with pytest.raises(ValueError, match="ratio must be in"):
        step_ratios(1.0, 2)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        step_ratios(0.5, 0)


def test_distillation_temperature_shapes_the_soft_targets():
    torch.manual_seed(0)
    teacher, student = nn.Linear(8, 5), nn.Linear(8, 5)
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    logits = student(x)
    cold, hot = (distillation_loss(teacher, t, alpha=1.0)(logits, x, y) for t in (1.0, 8.0))
    assert cold.item() != pytest.approx(hot.item(), rel=0.05), "the temperature changes the loss"
    mixed = distillation_loss(teacher, 4.0, alpha=0.5)(logits, x, y)
    soft = distillation_loss(teacher, 4.0, alpha=1.0)(logits, x, y)
    hard = nn.functional.cross_entropy(logits, y)
    assert mixed.item() == pytest.approx(0.5 * soft.item() + 0.5 * hard.item(), rel=1e-5)


# --- training modes of the one loop ------------------------------------------------------------


def test_training_hooks_distill_sparsify_and_keep_zeros(base):
    x, y = batch(64)
    cfg = parse_params(small_raw()).train.model_copy(update={"epochs": 2, "lr": 0.01})
    teacher = copy.deepcopy(base)
    loss = distillation_loss(teacher, temperature=2.0, alpha=0.0)
    assert torch.allclose(loss(base(x), x, y), nn.functional.cross_entropy(base(x), y))
    assert distillation_loss(teacher, 2.0, 1.0)(teacher(x), x, y).abs() < 1e-5  # student == teacher
    sparse = apply_strategy("magnitude", copy.deepcopy(base), (x, y), ratio=0.6)
    fit(sparse, (x, y), (x, y), cfg, seed=0, hooks=Hooks(loss=loss, after_step=keep_zeros(sparse)))
    assert weight_sparsity(sparse) >= 0.6


# --- search to the tolerance -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["step", "bisect"])
def test_search_stops_at_the_tolerance(mode):
    """Accuracy falls linearly with the ratio, 100 - 20 * r; with a floor of 90 the largest ratio
    within tolerance is 0.5."""
    cfg = SearchConfig(mode=mode, low=0.1, high=0.9, step=0.1, trials=8)
    reference = np.ones(1000, dtype=bool)

    def judge(ratio):  # the model gets 200 * ratio of 1000 images wrong; point rule at 10 points
        correct = np.arange(1000) >= round(200 * ratio)
        return 100 - 20 * ratio, compare(correct, reference, margin=10.0, confidence=None)

    trials = search_ratio(cfg, judge)
    best = best_trial(trials)
    assert best.passed and best.ratio == pytest.approx(0.5, abs=0.01)
    assert all(t.passed == (t.ratio <= 0.5 + 1e-9) for t in trials) and len(trials) <= 8
    if mode == "step":
        assert [t.passed for t in trials][-1] is False  # stopped at the first failure


def test_search_on_digits_keeps_the_largest_ratio_within_tolerance(trained_layout):
    from shrinkflow.tasks.training.train import shrink_candidate

    params = parse_params(
        small_raw(
            "shrink.candidates={s: {strategy: prune_l1, lr: 0.01, epochs: 2, search: {low: 0.3, high: 0.95,"
            " trials: 3}}}",
            "promote.tolerance=5.0",
        )
    )
    heard = []
    record = shrink_candidate(params, trained_layout, "s", on_trial=heard.append)
    assert [t.ratio for t in heard] == [t["ratio"] for t in record.trials] and len(heard) == 3
    assert all(t.passed == (t.lower > -5.0) for t in heard), "every trial faces the gate on validation"
    passed = [t for t in heard if t.passed]
    assert record.options["ratio"] == (max(t.ratio for t in passed) if passed else 0.3)
    assert heard[1].ratio == 0.95 and not heard[1].passed  # 95% of the channels gone is too much
    model, _ = load_checkpoint(trained_layout.root / record.checkpoint, sha256=record.sha256)
    kept = next(t for t in heard if t.ratio == record.options["ratio"])
    assert evaluate(model, load_split(trained_layout, "val")) == record.best_val_acc == kept.val_acc


def test_composed_candidate_prunes_distills_and_quantises(trained_layout):
    from shrinkflow.tasks.measurement.evaluate import measure
    from shrinkflow.tasks.training.train import shrink_candidate

    params = parse_params(
        small_raw(
            "shrink.candidates={c: {strategy: prune_l1, ratio: 0.5, lr: 0.01, epochs: 2, distill: {},"
            " quantize: int8}}",
        )
    )
    record = shrink_candidate(params, trained_layout, "c")
    assert record.steps == ["prune_l1", "distill", "int8"] and record.epochs == 2
    model, _ = load_checkpoint(trained_layout.root / record.checkpoint, sha256=record.sha256)
    assert isinstance(model, Int8Net)
    splits = {split: load_split(trained_layout, split) for split in ("val", "gate", "test")}
    figures, predicted = measure(model, splits, params.evaluate)
    assert {split: len(p) for split, p in predicted.items()} == {s: len(splits[s][1]) for s in splits}
    assert figures.val_acc == record.best_val_acc > 80 and figures.params > 0 and figures.flops > 0


def test_each_search_trial_is_a_nested_mlflow_run(trained_layout):
    from shrinkflow.tasks.pipeline.stages import Context, run_candidate
    from shrinkflow.tasks.store.tracking import Tracker

    params = parse_params(
        small_raw(
            "shrink.candidates={s: {strategy: magnitude, epochs: 1, search: {mode: step, low: 0.5, step: 0.2,"
            " trials: 2}}}",
            "promote.tolerance=100",
        )
    )
    ctx = Context(params, trained_layout, Tracker.for_project(trained_layout.root, "strategies-test"))
    tracked = run_candidate(ctx, "s")
    children = ctx.tracker.search_runs(f"tags.mlflow.parentRunId = '{tracked.run_id}'")
    assert sorted(float(r.data.params["ratio"]) for r in children) == [0.5, 0.7]
    assert all(r.data.metrics["passed"] == 1.0 for r in children) and tracked.record.options["ratio"] == 0.7
    for run in children:  # each trial carries its interval, as record.json does
        metrics = run.data.metrics
        assert metrics["val_lower"] <= metrics["val_delta"] and "p_value" in metrics
    assert [t["lower"] for t in tracked.record.trials] == [
        next(r.data.metrics["val_lower"] for r in children if float(r.data.params["ratio"]) == t["ratio"])
        for t in tracked.record.trials
    ]
