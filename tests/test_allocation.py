"""Per-layer widths allocated to a budget (issue #23): the cost model, the sensitivity table,
the allocations, and a budget candidate through the pipeline's candidate path."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from shrinkflow.models import STRATEGIES, apply_strategy, build_model
from shrinkflow.models.allocation import (
    ALLOCATORS,
    Allocation,
    Budget,
    CostModel,
    LatencyCheck,
    LatencyStep,
    Problem,
    Request,
    Sensitivity,
    allocate,
    cost_model,
    floors,
    knapsack,
    measure_sensitivity,
    prunable_groups,
    with_latency,
)
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.tasks.config import ConfigError, parse_params
from shrinkflow.tasks.measurement.evaluate import count_flops, evaluate_models, load_table
from shrinkflow.tasks.training.allocate import LATENCY_NOISE, allocate_widths, summary
from shrinkflow.tasks.training.sensitivity import TableMissing, scorer, sensitivity_stage, timed_together
from shrinkflow.tasks.training.sensitivity import load_table as load_sensitivity
from tests.conftest import small_network, small_raw


class Crafted(nn.Module):
    """``y = argmax(x[:4])`` computed by hand: ``wide`` has 64 units of which 8 carry ``+-x_i``
    and 56 are near-silent (redundant); ``narrow`` has exactly the 4 class scores (fragile: any
    unit removed loses a class); ``head`` is the identity classifier."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wide, self.narrow, self.head = nn.Linear(16, 64), nn.Linear(64, 4), nn.Linear(4, 4)
        with torch.no_grad():
            self.wide.weight.copy_(1e-3 * torch.randn(64, 16, generator=g))
            self.wide.bias.zero_()
            self.narrow.weight.copy_(1e-3 * torch.randn(4, 64, generator=g))
            for i in range(4):
                self.wide.weight[2 * i, i], self.wide.weight[2 * i + 1, i] = 1.0, -1.0
                self.narrow.weight[i, 2 * i], self.narrow.weight[i, 2 * i + 1] = 1.0, -1.0
            self.narrow.bias.fill_(5.0)
            self.head.weight.copy_(torch.eye(4))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.narrow(torch.relu(self.wide(x)))))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    return x, x[:, :4].argmax(1)


def _request(*budgets, method: str = "sensitivity", **options) -> Request:
    """``budgets``: (objective, keep) pairs."""
    return Request(method, tuple(Budget(objective=o, keep=k) for o, k in budgets), **options)


def _problem(costs, method, *budgets, table=None, **options) -> Problem:
    """``budgets``: (objective, keep) pairs; ``options``: the request's and the problem's others."""
    scores, evaluate = options.pop("scores", None), options.pop("evaluate", None)
    return Problem(costs, _request(*budgets, method=method, **options), table, scores, evaluate)


def _table(model: nn.Module, calibration, val, ratios=(0.25, 0.5, 0.75, 0.9), timer=(2, 1, 3)):
    """The sensitivity table; ``timer``: rounds, warm-up and repeats (a glance where latency is
    not what a test checks; ``()``: the pipeline's)."""
    return measure_sensitivity(
        model,
        calibration[0][:1],
        lambda m, widths: apply_strategy("prune_l1", m, calibration, widths=widths),
        scorer(calibration, val),
        timed_together(calibration[0][:1], *timer),
        ratios,
    )


@pytest.mark.parametrize("method", ["sensitivity", "uniform"])
def test_sensitivity_prunes_the_redundant_layer_more_than_the_fragile_one(method):
    model, calibration, val = Crafted().eval(), _data(64, 0), _data(512, 1)
    assert scorer(calibration, val)(copy.deepcopy(model))[1] == 100.0
    table = _table(model, calibration, val)
    assert table.groups["narrow"]["acc"][0] < 90 < min(table.groups["wide"]["acc"][:3])
    costs = with_latency(cost_model(model, calibration[0][:1]), table)
    chosen = allocate(_problem(costs, method, ("params", 0.3), table=table))
    pruned = apply_strategy("prune_l1", copy.deepcopy(model), calibration, widths=chosen.widths)
    acc = scorer(calibration, val)(pruned)[1]
    share = {g: chosen.widths[g] / n for g, n in costs.widths.items()}
    if method == "uniform":  # the contrast: one share for both, and the fragile layer breaks
        assert share["wide"] == pytest.approx(share["narrow"], abs=0.1) and acc < 90
        return
    assert share["narrow"] == 1.0 and share["wide"] < 0.3, chosen.widths
    assert acc == 100.0 and chosen.predicted_loss == pytest.approx(table.base["loss"], abs=1e-3)


def _basenet(batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    spec = {"arch": "basenet", "in_channels": 1, "image_size": 8, "num_classes": 10}
    return build_model({**spec, "channels": [16, 32], "hidden": [48], "batch_norm": batch_norm}).eval()


def _digits_like(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def basenet_table():
    """A BaseNet with BatchNorm, its calibration and validation images and its table (a glance
    of latency)."""
    model, calibration, val = _basenet(), _digits_like(64, 0), _digits_like(128, 1)
    return model, calibration, val, _table(model, calibration, val)


@pytest.mark.parametrize("objective", ["params", "flops", "latency_ms"])
def test_the_sensitivity_allocation_is_maximal_on_its_grid(objective, basenet_table):
    model, calibration, val, table = basenet_table
    costs = with_latency(cost_model(model, calibration[0][:1]), table)
    # Latency at 8x8 is mostly fixed overhead: aim between what the floors reach and the baseline.
    keep = (
        0.3
        if objective != "latency_ms"
        else (1 + costs.fraction(objective, floors(costs.widths, 0.9, None))) / 2
    )
    problem = _problem(costs, "sensitivity", (objective, keep), table=table)
    chosen = allocate(problem)
    cost = costs.cost(objective, chosen.widths)
    assert cost <= keep * costs.cost(objective, costs.widths)
    # The predicted loss never rises as a group widens, so no group could take one more step of
    # its grid within the budget: the solver left no budget unused that a step could take.
    levels = knapsack(problem).levels
    for g, kept in chosen.widths.items():
        wider = [k for k in levels[g] if k > kept]
        assert not wider or not problem.meets(chosen.widths | {g: min(wider)}), (g, kept, wider)
    pruned = apply_strategy("prune_l1", copy.deepcopy(model), calibration, widths=chosen.widths)
    actual = {  # params and FLOPs counted on the pruned net; latency is the measured table's
        "params": sum(p.numel() for p in pruned.parameters()),
        "flops": count_flops(pruned, calibration[0][:1]),
        "latency_ms": cost,
    }[objective]
    assert actual == pytest.approx(cost, rel=1e-9)


def _crafted_problem(seed: int) -> Problem:
    """Four groups of 3-6 channels whose layers couple them in a chain (and one layer pruned by
    the same group on both sides), random amounts, a random latency table and random rising loss
    curves; three budgets set a little above a random width vector's costs, so they hold."""
    rng = np.random.default_rng(seed)
    widths = {"a": 5, "b": 4, "c": 6, "d": 3}
    couplings = (("a", None), ("b", "a"), ("c", "b"), ("d", "c"), ("d", "d"), (None, "d"), (None, None))
    terms = {
        o: [(float(rng.uniform(1, 100)), out, into) for out, into in couplings] for o in ("params", "flops")
    }
    latency = {
        g: [(1.0, 1.0), *((s, 1.0 - float(rng.uniform(0, 0.3)) * (1 - s)) for s in (0.6, 0.3))]
        for g in widths
    }
    costs = CostModel(widths, terms, 1.0, latency)
    ratios = [0.25, 0.5, 0.75]
    groups = {
        g: {
            "width": [n] * 3,
            "kept": [max(1, int(n * (1 - r))) for r in ratios],
            "loss": sorted(0.5 + rng.uniform(0, 2, 3)),
        }
        for g, n in widths.items()
    }
    table = Sensitivity(ratios, {"loss": 0.5}, groups)
    low = floors(widths, 0.75, None)
    somewhere = {g: int(rng.integers(low[g], n + 1)) for g, n in widths.items()}
    keeps = {o: costs.fraction(o, somewhere) + 0.01 for o in ("params", "flops", "latency_ms")}
    return Problem(costs, _request(*keeps.items(), max_layer_ratio=0.75), table)


@pytest.mark.parametrize("seed", range(5))
def test_the_sensitivity_knapsack_is_optimal_against_brute_force(seed):
    problem = _crafted_problem(seed)
    levels = knapsack(problem).levels
    assert levels["c"] == (6, 5, 4, 3, 2), "every width from the floor: the groups are under the grid"
    loss = {
        combo: problem.table.predicted_loss(dict(zip(levels, combo, strict=True)), problem.costs.widths)
        for combo in itertools.product(*levels.values())
        if problem.meets(dict(zip(levels, combo, strict=True)))
    }
    best = min(loss.values())
    chosen = allocate(problem)
    assert chosen.predicted_loss == pytest.approx(best, abs=1e-9)
    assert tuple(chosen.widths[g] for g in levels) in {c for c, v in loss.items() if v <= best + 1e-9}
    assert all(chosen.cost[b.objective] <= b.keep for b in problem.request.budgets)


@pytest.mark.parametrize("arch", ["basenet", "resnet56"])
def test_the_knapsack_rows_are_the_pruned_networks_params_and_flops(arch):
    model, batch = small_network(arch), _digits_like(8, 0)
    costs = cost_model(model, batch[0][:1])
    # No table: the rows do not depend on it (each group's levels are then its grid and floor).
    program = knapsack(
        _problem(costs, "sensitivity", ("params", 0.5), ("flops", 0.5), table=Sensitivity([], {}, {}))
    )
    rng = np.random.default_rng(0)
    for _ in range(4):  # widths anywhere on the grid, the products of coupled groups' shares included
        widths = {g: int(rng.choice(levels)) for g, levels in program.levels.items()}
        pruned = apply_strategy("prune_l1", copy.deepcopy(model), batch, widths=widths)
        counted = {
            "params": sum(p.numel() for p in pruned.parameters()),
            "flops": count_flops(pruned, batch[0][:1]),
        }
        for objective, value in counted.items():
            full = costs.cost(objective, costs.widths)
            assert program.share(objective, widths) * full == pytest.approx(value, rel=1e-9), objective


def test_a_two_constraint_budget_is_met_by_measurement_on_basenet():
    torch.manual_seed(0)
    spec = {"arch": "basenet", "in_channels": 3, "image_size": 32, "num_classes": 10}
    model = build_model({**spec, "channels": [32, 64], "hidden": [128], "batch_norm": True}).eval()
    g = torch.Generator().manual_seed(0)
    calibration = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    val = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    table = _table(model, calibration, val, timer=(5, 1, 3))
    costs = with_latency(cost_model(model, calibration[0][:1]), table)
    params_only = allocate(Problem(costs, _request(("params", 0.15)), table))
    assert costs.fraction("latency_ms", params_only.widths) > 0.4, "the latency budget binds too"
    request = _request(("params", 0.15), ("latency_ms", 0.4))
    chosen = allocate_widths("prune_l1", request, model, table, calibration, val)
    pruned = apply_strategy("prune_l1", copy.deepcopy(model), calibration, widths=chosen.widths)
    assert sum(p.numel() for p in pruned.parameters()) <= 0.15 * sum(p.numel() for p in model.parameters())
    params, latency = summary(chosen, request, table, "sensitivity.json")["allocated"]["budgets"]
    assert params == {"objective": "params", "keep": 0.15, "predicted": chosen.cost["params"], "met": True}
    assert latency["objective"] == "latency_ms" and latency["met"], chosen.latency
    assert (
        latency["measured"] <= 0.4 * (1 + LATENCY_NOISE) and latency["predicted"] == chosen.cost["latency_ms"]
    )


@pytest.mark.parametrize("method", ALLOCATORS)
def test_every_allocation_holds_its_budget_on_the_pruned_network(method, basenet_table):
    model, calibration, val, table = basenet_table
    costs = with_latency(cost_model(model, calibration[0][:1]), table)
    problem = _problem(
        costs,
        method,
        ("params", 0.3),
        table=table,
        samples=3,
        scores=STRATEGIES["prune_l1"].scores(model, calibration),
        evaluate=lambda widths: (0.0, 0.0),
    )
    chosen = allocate(problem)
    pruned = apply_strategy("prune_l1", copy.deepcopy(model), calibration, widths=chosen.widths)
    assert sum(p.numel() for p in pruned.parameters()) <= 0.3 * costs.cost("params", costs.widths)
    assert chosen.method == method and chosen.cost["params"] <= 0.3


def test_an_unknown_allocation_is_refused_naming_the_known_ones():
    costs = cost_model(_basenet(), _digits_like(1, 0)[0])
    with pytest.raises(ValueError, match="unknown allocation 'nosuch'; choose one of uniform, global"):
        allocate(_problem(costs, "nosuch", ("params", 0.5)))


def test_the_cost_model_is_exact_on_every_basenet_width():
    model = _basenet()
    x = _digits_like(2, 0)[0]
    costs = cost_model(model, x[:1])
    for widths in (
        {"features.0": 3},
        {"features.4": 5, "classifier.1": 7},
        {"features.0": 1, "features.4": 1},
    ):
        pruned = apply_strategy("prune_l1", copy.deepcopy(model), _digits_like(8, 0), widths=widths)
        assert costs.cost("params", widths) == sum(p.numel() for p in pruned.parameters())
        assert costs.cost("flops", widths) == count_flops(pruned, x[:1])


def test_allocation_on_a_residual_network_prunes_coupled_groups_together():
    torch.manual_seed(0)
    model = build_model(
        {"arch": "resnet56", "in_channels": 1, "image_size": 8, "num_classes": 10, "blocks": [2, 2, 2]}
    ).eval()
    calibration, val = _digits_like(32, 0), _digits_like(64, 1)
    groups = prunable_groups(model, calibration[0][:1])
    # The residual stream of each stage is one group: stem, shortcuts and every block's last conv.
    assert "conv1" in groups and not any(
        name.endswith("conv2") for name in groups if name.startswith("layer1")
    )
    table = _table(model, calibration, val, ratios=(0.5, 0.9))
    costs = with_latency(cost_model(model, calibration[0][:1]), table)
    for method in ("sensitivity", "uniform"):
        chosen = allocate(_problem(costs, method, ("params", 0.4), table=table))
        pruned = apply_strategy("prune_l1", copy.deepcopy(model), calibration, widths=chosen.widths)
        assert pruned(calibration[0]).shape == (32, 10)
        assert sum(p.numel() for p in pruned.parameters()) <= 0.4 * costs.cost("params", costs.widths)
        stream = chosen.widths["conv1"]  # every tensor added to stage 1's stream has its width
        assert pruned.layer1[0].conv2.out_channels == pruned.layer1[1].conv2.out_channels == stream


def test_global_allocation_ranks_channels_across_groups():
    model, batch = _basenet(batch_norm=False), _digits_like(16, 0)
    costs = cost_model(model, batch[0][:1])
    scores = STRATEGIES["prune_l1"].scores(model, batch)
    chosen = allocate(_problem(costs, "global", ("flops", 0.25), scores=scores))
    pruned = apply_strategy("prune_l1", copy.deepcopy(model), batch, widths=chosen.widths)
    assert count_flops(pruned, batch[0][:1]) <= 0.25 * count_flops(model, batch[0][:1])
    uniform = allocate(_problem(costs, "uniform", ("flops", 0.25)))
    assert chosen.widths != uniform.widths and chosen.method == "global"


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ("{strategy: prune_l1, ratio: 0.5, budget: {keep: 0.2}}", "set ratio or budget, not both"),
        ("{strategy: prune_l1, budget: {objective: params}}", "set exactly one of budget.keep and search"),
        ("{strategy: prune_l1, ratio: 0.5, allocation: sensitivity}", "allocation applies to a budget"),
        ("{strategy: prune_l1, budget: {keep: 0.2}, rounds: 2}", "rounds must be 1"),
        ("{strategy: prune_l1, budget: {keep: 1.5}}", "budget.keep"),
        ("{strategy: prune_l1, budget: {objective: energy, keep: 0.2}}", "objective"),
        ("{strategy: prune_l1, budget: {keep: 0.2}, max_layer_ratio: 0.95}", "above the largest sensitivity"),
        (
            "{strategy: prune_l1, budget: [{objective: params, keep: 0.1}, {objective: params, keep: 0.2}]}",
            "budget gives params twice; give each objective once",
        ),
        (
            "{strategy: prune_l1, budget: [{objective: params}, {objective: latency_ms, keep: 0.5}]}",
            "give every budget a keep, or",
        ),
        (
            "{strategy: prune_l1, budget: [{objective: params}, {objective: flops}], search: {mode: step}}",
            "leave keep out of exactly one: the one the search varies",
        ),
        ("{strategy: prune_l1, budget: []}", "budget"),
    ],
)
def test_budget_misfits_are_refused_with_one_line(candidate, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_params(small_raw(f"shrink.candidates={{c: {candidate}}}"))
    assert "\n" not in str(info.value)


def test_budget_candidates_of_one_strategy_share_their_sensitivity_ratios():
    two = (
        "shrink.candidates={a: {strategy: prune_l1, budget: {keep: 0.2}},"
        " b: {strategy: prune_l1, budget: {keep: 0.3}, sensitivity_ratios: [0.5, 0.9]}}"
    )
    with pytest.raises(ConfigError, match="'a' and 'b' allocate prune_l1 from different sensitivity_ratios"):
        parse_params(small_raw(two))


def test_a_list_of_budgets_is_one_request_and_a_search_varies_the_keep_left_out():
    params = parse_params(
        small_raw(
            "shrink.candidates={s: {strategy: prune_l1, allocation: sensitivity, search: {mode: step},"
            " budget: [{objective: params}, {objective: latency_ms, keep: 0.5}]}}"
        )
    )
    cand = params.shrink.candidates["s"]
    assert cand.searched.objective == "params"
    assert cand.allocation_request(seed=3, keep=0.25) == _request(
        ("params", 0.25), ("latency_ms", 0.5), max_layer_ratio=0.9, samples=16, seed=3
    )
    assert params.shrink.sensitivity_tables() == {"prune_l1": (0.25, 0.5, 0.75, 0.9)}


@pytest.mark.parametrize("method", ["uniform", "sensitivity"])
def test_an_unreachable_budget_is_refused_naming_it_and_the_least_the_floors_reach(method):
    costs = cost_model(_basenet(), _digits_like(1, 0)[0])
    least = costs.fraction("flops", floors(costs.widths, 0.9, None))
    problem = _problem(costs, method, ("params", 0.5), ("flops", 0.001), table=Sensitivity([], {}, {}))
    with pytest.raises(ValueError) as info:
        allocate(problem)
    assert str(info.value) == (
        "budget keep 0.001 of flops is out of reach: with every group at its floor (max_layer_ratio "
        f"0.9) the network still costs {least:.4f} of the baseline's"
    )


def test_budget_candidates_allocate_from_the_sensitivity_stage_and_rebuild_from_their_widths(
    trained_layout,
):
    from shrinkflow.tasks.training.train import shrink_candidate

    params = parse_params(
        small_raw(
            "shrink.candidates={p: {strategy: prune_l1, epochs: 1, lr: 0.01,"
            " budget: {objective: params, keep: 0.2}, allocation: sensitivity},"
            " l: {strategy: prune_l1, epochs: 1, lr: 0.01,"
            " budget: {objective: flops, keep: 0.3}, allocation: sample, samples: 3}}"
        )
    )
    layout = trained_layout
    cache = layout.sensitivity / "sensitivity-prune_l1.json"
    assert sensitivity_stage(params, layout) == [cache]
    assert (layout.sensitivity / "sensitivity-prune_l1.png").stat().st_size > 0
    assert json.loads(layout.sensitivity_index.read_text())["tables"]["prune_l1"]["file"] == cache.name
    stamp = cache.stat().st_mtime_ns
    first = shrink_candidate(params, layout, "p")
    second = shrink_candidate(params, layout, "l")
    sensitivity_stage(params, layout)  # again: its key still holds, so the table is kept
    assert cache.stat().st_mtime_ns == stamp, "candidates and a second stage run reuse the table"
    assert first.options["sensitivity"] == second.options["sensitivity"]
    assert first.options["sensitivity"]["file"] == "artifacts/sensitivity/sensitivity-prune_l1.json"
    assert not list(layout.candidates.glob("sensitivity-*")), "no longer written beside the candidates"
    assert len(second.options["allocated"]["samples"]) == 3
    on_disk = json.loads(layout.record("p").read_text())
    assert on_disk["options"]["widths"] == first.options["widths"]
    assert on_disk["options"]["allocated"]["cost"]["params"] <= 0.2
    # No latency budget, so no latency prediction (the table's would overlap savings, even below 0).
    assert set(on_disk["options"]["allocated"]["cost"]) == {"params", "flops"}
    assert first.options["ratio"] == pytest.approx(1 - on_disk["options"]["allocated"]["cost"]["params"])
    # The recorded widths rebuild the exact shapes of the saved model from the baseline.
    baseline, _ = load_checkpoint(layout.root / first_baseline(layout), sha256=None)
    rebuilt = apply_strategy(
        "prune_l1",
        baseline,
        (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)),
        widths=first.options["widths"],
    )
    saved, _ = load_checkpoint(layout.root / first.checkpoint, sha256=first.sha256)
    assert rebuilt.spec() == saved.spec()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in saved.state_dict().items()
    }
    # candidates.csv carries each budget candidate's widths, as the record has them.
    evaluate_models(params, layout)
    table = load_table(layout.candidates_csv).set_index("name")
    for name, record in (("p", first), ("l", second)):
        cell = table.loc[name, "widths"]
        assert cell[0].isalpha() and dict(item.split("=") for item in cell.split()) == {
            g: str(n) for g, n in record.options["widths"].items()
        }
    assert pd.isna(table.loc["baseline", "widths"])
    # A table measured for another baseline is refused in one line, and the stage measures it again.
    stored = json.loads(cache.read_text())
    cache.write_text(json.dumps(stored | {"key": stored["key"] | {"baseline_sha256": "0" * 64}}))
    with pytest.raises(TableMissing, match="measured for another baseline.*shrinkflow stage sensitivity"):
        shrink_candidate(params, layout, "p")
    assert json.loads(layout.record("p").read_text())["status"] == "failed"
    assert not layout.checkpoint("p").exists()
    sensitivity_stage(params, layout)
    assert json.loads(cache.read_text())["key"] == stored["key"]


def test_the_sensitivity_stage_declares_an_empty_output_and_drops_tables_no_one_needs(trained_layout):
    layout, stale = trained_layout, trained_layout.sensitivity / "sensitivity-prune_fpgm.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    stale.with_suffix(".png").write_bytes(b"")
    params = parse_params(small_raw())  # no budget candidate
    assert sensitivity_stage(params, layout) == []
    assert sorted(p.name for p in layout.sensitivity.iterdir()) == ["tables.json"]
    assert json.loads(layout.sensitivity_index.read_text()) == {"tables": {}}
    budget = parse_params(
        small_raw("shrink.candidates={p: {strategy: prune_l1, budget: {keep: 0.2}, allocation: uniform}}")
    )
    with pytest.raises(TableMissing, match=r"sensitivity-prune_l1.json is missing; run `shrinkflow stage"):
        load_sensitivity(budget, layout, "prune_l1", _digits_like(4, 0))


def first_baseline(layout) -> str:
    return json.loads(layout.record("baseline").read_text())["checkpoint"]


def test_a_search_finds_the_smallest_budget_and_mlflow_keeps_the_widths(trained_layout):
    from mlflow import MlflowClient

    from shrinkflow.tasks.pipeline.stages import Context, run_candidate, run_sensitivity
    from shrinkflow.tasks.store.tracking import Tracker

    params = parse_params(
        small_raw(
            "shrink.candidates={s: {strategy: prune_l1, epochs: 1, lr: 0.01, budget: {objective: params},"
            " allocation: sensitivity, search: {mode: step, low: 0.5, step: 0.3, high: 0.9, trials: 2}}}",
            "promote.tolerance=100",
        )
    )
    ctx = Context(params, trained_layout, Tracker.for_project(trained_layout.root, "allocation-test"))
    run_sensitivity(ctx)
    tracked = run_candidate(ctx, "s")
    record = tracked.record
    assert [t["ratio"] for t in record.trials] == [0.5, 0.8] and all(t["passed"] for t in record.trials)
    assert record.options["budget"] == {"objective": "params", "keep": pytest.approx(0.2)}
    assert record.options["allocated"]["cost"]["params"] <= 0.2
    logged = ctx.tracker.run(tracked.run_id).data.params
    assert json.loads(logged["widths"].replace("'", '"')) == record.options["widths"]
    assert "sensitivity" in logged and "allocated" in logged
    # The table and plot it allocated from are the candidate run's artefacts.
    store = MlflowClient(ctx.tracker.uri)
    logged_files = {a.path for a in store.list_artifacts(tracked.run_id, "sensitivity")}
    assert logged_files == {"sensitivity/sensitivity-prune_l1.json", "sensitivity/sensitivity-prune_l1.png"}
    local = store.download_artifacts(tracked.run_id, "sensitivity/sensitivity-prune_l1.json")
    assert (
        json.loads(Path(local).read_text())["key"]["baseline_sha256"]
        == json.loads(trained_layout.record("baseline").read_text())["sha256"]
    )


@pytest.mark.parametrize("strategy", ["prune_l1", "prune_taylor"])
def test_recorded_widths_rebuild_the_exact_pruned_model(strategy):
    model, batch = _basenet(), _digits_like(16, 0)
    chosen = allocate(_problem(cost_model(model, batch[0][:1]), "uniform", ("params", 0.3)))
    allocated = apply_strategy(strategy, copy.deepcopy(model), batch, widths=chosen.widths)
    widths = json.loads(json.dumps(chosen.widths))  # as record.json stores them
    rebuilt = apply_strategy(strategy, copy.deepcopy(model), batch, widths=widths)
    assert rebuilt.spec() == allocated.spec()
    expected = allocated.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in rebuilt.state_dict().items())
    with pytest.raises(ValueError, match="not a prunable group"):
        apply_strategy(strategy, copy.deepcopy(model), batch, widths={"classifier.3": 4})


class Wide(nn.Module):
    """An MLP whose batch-1 time is its two big matrix products, not Python overhead: a latency
    budget of a half is within reach."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(512, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _wide_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 512, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def wide_table():
    model, calibration, val = Wide().eval(), _wide_data(32, 0), _wide_data(64, 1)
    return model, calibration, val, _table(model, calibration, val, (0.25, 0.5, 0.75), timer=())


def _latency_allocation(model, table, calibration, val, keep):
    request = Request("sensitivity", (Budget(objective="latency_ms", keep=keep),), 0.75, samples=2)
    return allocate_widths("prune_l1", request, copy.deepcopy(model), table, calibration, val)


def test_a_latency_budget_is_met_by_measurement_and_the_ratios_are_recorded(wide_table):
    model, calibration, val, table = wide_table
    chosen = _latency_allocation(model, table, calibration, val, keep=0.5)
    measured = chosen.latency.as_dict(chosen.cost["latency_ms"])
    assert measured["predicted_ratio"] == chosen.cost["latency_ms"] <= 0.5
    assert measured["met"] and measured["measured_ratio"] <= 0.5 * 1.05, measured
    assert 0.05 < measured["measured_ratio"] < 1.0 and measured["baseline_ms"] > 0
    found = summary(chosen, _request(("latency_ms", 0.5)), table, "candidates/sensitivity-prune_l1.json")
    assert found["allocated"]["latency"] == measured


def test_a_latency_prediction_below_zero_is_recorded_as_none(wide_table):
    model, calibration, val, table = wide_table
    step = LatencyStep("table", 0.5, -0.2, 0.45, 1.0)
    chosen = Allocation(
        "sensitivity",
        {"fc1": 10},
        {"params": 0.3, "flops": 0.3, "latency_ms": -0.2},
        latency=LatencyCheck(0.5, True, (step,)),
    )
    found = summary(chosen, _request(("latency_ms", 0.5)), table, "sensitivity.json")["allocated"]
    assert found["cost"]["latency_ms"] is None and found["latency"]["predicted_ratio"] is None
    assert found["latency"]["measured_ratio"] == 0.45


def test_a_table_that_flatters_the_pruned_model_is_caught_by_measurement(wide_table, caplog):
    model, calibration, val, table = wide_table
    # As if the table had been timed while the unpruned model ran under load: every pruned copy
    # looks three times the saving it is.
    flattering = copy.deepcopy(table)
    base = flattering.base["latency_ms"]
    for row in flattering.groups.values():
        row["latency_ms"] = [max(0.05 * base, base - 3 * (base - ms)) for ms in row["latency_ms"]]
    with caplog.at_level("INFO", logger="shrinkflow.tasks.training.allocate"):
        chosen = _latency_allocation(model, flattering, calibration, val, keep=0.5)
    measured = chosen.latency.as_dict(chosen.cost["latency_ms"])
    steps = measured["steps"]
    assert steps[0]["measured"] > 0.5 * 1.05, "the flattering table missed the budget at first"
    assert len(steps) > 1 and steps[1]["asked"] < 0.5
    assert "allocating again" in caplog.text
    # The record says what was measured, never the table's flattering figure, and it is met.
    assert measured["measured_ratio"] == steps[-1]["measured"] <= 0.5 * 1.05, steps
    assert measured["met"] and steps[-1]["measured"] < steps[0]["measured"]


def test_a_structured_ratio_candidate_has_its_widths_in_the_table(evaluated):
    from shrinkflow.tasks.data.prepare import load_split
    from shrinkflow.tasks.layout import Layout

    layout = Layout.from_params(parse_params(small_raw()), evaluated)
    table = load_table(layout.candidates_csv).set_index("name")
    widths = dict(item.split("=") for item in table.loc["l1-50", "widths"].split())
    record = json.loads(layout.record("l1-50").read_text())
    model, _ = load_checkpoint(layout.root / record["checkpoint"], sha256=record["sha256"])
    read_off = prunable_groups(model, load_split(layout, "val")[0][:1])
    assert widths and {g: str(n) for g, n in read_off.items()} == widths
    assert table.loc[["baseline", "w50"], "widths"].isna().all()
