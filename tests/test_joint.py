"""Widths and ranks allocated together (issue #31 items 1 and 3): the joint knapsack against brute
force, its rows against the params and FLOPs counted on pruned-then-factorised networks, a
two-constraint budget met by measurement, and the composed ``prune -> lowrank`` step of a
candidate through training, its checkpoint, its record and the candidates table."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from shrinkflow.models import apply_strategy, build_model, model_spec
from shrinkflow.models.allocation import (
    Budget,
    CostModel,
    Problem,
    Request,
    Sensitivity,
    Wired,
    allocate,
    cost_model,
    floors,
    knapsack,
    prunable_groups,
    rank_levels,
)
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.lowrank import Factorisable, low_rank_layers, survey
from shrinkflow.tasks.config import parse_params
from shrinkflow.tasks.measurement.evaluate import count_flops, evaluate_models, load_table
from shrinkflow.tasks.training.allocate import LATENCY_NOISE, allocate_widths, factorised, summary
from shrinkflow.tasks.training.sensitivity import measure, sensitivity_stage
from shrinkflow.tasks.training.train import shrink_candidate
from tests.conftest import small_network, small_raw


def _request(*budgets, ranks: bool = True, **options) -> Request:
    """``budgets``: (objective, keep) pairs."""
    return Request(
        "sensitivity", tuple(Budget(objective=o, keep=k) for o, k in budgets), ranks=ranks, **options
    )


# --- the knapsack against brute force ---------------------------------------------------------


def _crafted_layers() -> dict[str, Wired]:
    """A chain of four layers through three groups: a 3x3 conv from the image into ``a``, a 3x3
    conv ``a -> b`` with stride 2, a linear layer reading ``b`` flattened (2 positions per
    channel) into ``c``, and the classifier ``c -> 3 classes``."""
    return {
        "conv1": Wired(Factorisable("conv1", "tucker2", 3, 6, (3, 3), True, 16, 16), "a", None),
        "conv2": Wired(Factorisable("conv2", "tucker2", 6, 4, (3, 3), True, 16, 4), "b", "a"),
        "fc": Wired(Factorisable("fc", "linear", 8, 5, (1, 1), True, 1, 1), "c", "b"),
        "head": Wired(Factorisable("head", "linear", 5, 3, (1, 1), True, 1, 1), None, "c"),
    }


def _crafted_joint_problem(seed: int, latency: bool) -> Problem:
    """The layers' exact params and FLOPs rows, random rising loss curves for each group and each
    rank, random latency tables (the head's factorisations measured slower than the whole
    network), and budgets a little above the costs of a random plan, so that they hold."""
    rng = np.random.default_rng(seed)
    layers = _crafted_layers()
    terms = {"params": [], "flops": []}
    for w in layers.values():
        f, k = w.layer, w.layer.kernel[0] * w.layer.kernel[1]
        terms["params"] += [
            (f.in_channels * f.out_channels * k, w.out, w.into),
            (f.out_channels, w.out, None),
        ]
        terms["flops"].append((2.0 * f.out_positions * f.in_channels * f.out_channels * k, w.out, w.into))
    widths = {"a": 6, "b": 4, "c": 5}
    levels = {n: rank_levels(w.layer, (0.5, 0.25)) for n, w in layers.items()}
    table = Sensitivity(
        [0.5],
        {"loss": 0.5, "latency_ms": 1.0},
        {
            g: {"width": [n], "kept": [n // 2], "loss": [0.5 + float(rng.uniform(0, 1))]}
            for g, n in widths.items()
        },
        {
            n: {
                "ranks": [list(r) for r in lv],
                "loss": sorted(0.5 + rng.uniform(0, 1, len(lv))),
                "latency_ms": [1.1 if n == "head" else 1.0 - float(rng.uniform(0, 0.2)) for _ in lv],
            }
            for n, lv in levels.items()
        },
    )
    group_ms = {g: [(1.0, 1.0), (0.5, 1.0 - float(rng.uniform(0, 0.3)))] for g in widths}
    costs = CostModel(widths, terms, 1.0, group_ms, layers, table.rank_latency())
    low = floors(widths, 0.75, None)
    somewhere = {g: int(rng.integers(low[g], n + 1)) for g, n in widths.items()}
    share = costs.shares(somewhere)
    plan = {n: r for n, lv in levels.items() if (r := lv[-1]) and layers[n].fits(share, r) and n != "head"}
    objectives = ("params", "flops", "latency_ms") if latency else ("params", "flops")
    keeps = {o: costs.fraction(o, somewhere, plan) + 0.01 for o in objectives}
    return Problem(costs, _request(*keeps.items(), max_layer_ratio=0.75), table)


def _every_plan(problem: Problem):
    """Every width vector on the program's grid with every rank plan its widths allow."""
    program = knapsack(problem)
    offered = problem.rank_choices
    for combo in itertools.product(*program.levels.values()):
        widths = dict(zip(program.levels, combo, strict=True))
        share = problem.costs.shares(widths)
        fitting = {
            n: [None, *(r for r in lv if problem.costs.layers[n].fits(share, r))] for n, lv in offered.items()
        }
        for picked in itertools.product(*fitting.values()):
            yield widths, {n: r for n, r in zip(fitting, picked, strict=True) if r is not None}


@pytest.mark.parametrize(("seed", "latency"), [(0, False), (1, True), (2, True), (3, False)])
def test_the_joint_knapsack_is_optimal_against_brute_force(seed, latency):
    problem = _crafted_joint_problem(seed, latency)
    assert set(problem.rank_choices) == ({"conv1", "conv2", "fc"} if latency else {*_crafted_layers()}), (
        "under a latency budget, a factorisation measured slower than the whole is never offered"
    )
    loss = {
        (tuple(w.values()), tuple(sorted(r.items()))): problem.table.predicted_loss(
            w, problem.costs.widths, r
        )
        for w, r in _every_plan(problem)
        if problem.meets(w, r)
    }
    best = min(loss.values())
    chosen = allocate(problem)
    assert chosen.predicted_loss == pytest.approx(best, abs=1e-9)
    key = (tuple(chosen.widths[g] for g in problem.costs.widths), tuple(sorted(chosen.ranks.items())))
    assert key in {k for k, v in loss.items() if v <= best + 1e-9}
    assert all(chosen.cost[b.objective] <= b.keep for b in problem.request.budgets)
    assert any(ranks for _, ranks in loss), "the budgets were set around a plan that factorises"


# --- the rows against counted networks ----------------------------------------------------------


def _ranked_table(model: torch.nn.Module, x: torch.Tensor) -> Sensitivity:
    """A table with every factorisable layer's rank levels and nothing measured (the rows do not
    depend on what was)."""
    levels = {f.name: rank_levels(f) for f in survey(model, x).layers}
    rows = {
        n: {"ranks": [list(r) for r in lv], "loss": [0.0] * len(lv), "latency_ms": [1.0] * len(lv)}
        for n, lv in levels.items()
        if lv
    }
    return Sensitivity([], {"loss": 0.0, "latency_ms": 1.0}, {}, rows)


@pytest.mark.parametrize("arch", ["basenet", "resnet56"])
def test_the_joint_rows_are_the_pruned_and_factorised_networks_params_and_flops(arch):
    model, batch = small_network(arch), (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    costs = cost_model(model, batch[0][:1])
    problem = Problem(costs, _request(("params", 0.5), ("flops", 0.5)), _ranked_table(model, batch[0][:1]))
    program = knapsack(problem)
    assert set(problem.rank_choices) == set(costs.layers) and len(costs.layers) >= 4
    rng = np.random.default_rng(0)
    for _ in range(3):  # widths anywhere on the grid, each layer at a rank they allow, or whole
        widths = {g: int(rng.choice(levels)) for g, levels in program.levels.items()}
        share = costs.shares(widths)
        ranks = {}
        for name, levels in problem.rank_choices.items():
            fitting = [r for r in levels if costs.layers[name].fits(share, r)]
            if fitting and rng.uniform() < 0.7:
                ranks[name] = fitting[int(rng.integers(len(fitting)))]
        assert ranks, "something is factorised"
        pruned = apply_strategy("prune_l1", copy.deepcopy(model), batch, widths=widths)
        built = factorised(pruned, ranks, batch)
        assert {n: m.ranks for n, m in low_rank_layers(built).items()} == ranks
        counted = {
            "params": sum(p.numel() for p in built.parameters()),
            "flops": count_flops(built, batch[0][:1]),
        }
        for objective, value in counted.items():
            full = costs.cost(objective, costs.widths)
            assert program.share(objective, widths, ranks) * full == pytest.approx(value, rel=1e-9), objective
            assert costs.cost(objective, widths, ranks) == pytest.approx(value, rel=1e-9), objective


def test_a_rank_is_never_offered_beyond_what_the_kept_widths_allow():
    model = small_network("basenet")
    x = torch.randn(1, 1, 8, 8)
    problem = Problem(cost_model(model, x), _request(("params", 0.1)), _ranked_table(model, x))
    program, wired = knapsack(problem), problem.costs.layers["classifier.1"]
    levels = program.choices[("rank", "classifier.1")]
    ruled_out = 0
    for group, channels in ((wired.out, wired.layer.out_channels), (wired.into, wired.layer.in_channels)):
        key, widths = (("rank", "classifier.1"), ("width", group)), program.choices[("width", group)]
        kept = np.rint(np.array(widths) / problem.costs.widths[group] * channels)
        start = program.columns[key]
        allowed = program.upper[start : start + len(levels) * len(kept)].reshape(len(levels), len(kept))
        expected = [[k == 0 or levels[k][0] <= c for c in kept] for k in range(len(levels))]
        assert (allowed == np.array(expected)).all(), group
        ruled_out += int((allowed == 0).sum())
    assert ruled_out > 0, "the floors are narrower than the highest ranks"


# --- a two-constraint budget, measured -----------------------------------------------------------


@pytest.fixture(scope="module")
def low_rank_basenet():
    """A 32x32 BaseNet whose fc1 has rank 16 exactly (factorising it there loses nothing, while
    pruning either of its sides does), labelled by its own predictions, and its measured table."""
    torch.manual_seed(0)
    spec = {"arch": "basenet", "in_channels": 3, "image_size": 32, "num_classes": 10}
    model = build_model({**spec, "channels": [32, 64], "hidden": [128], "batch_norm": True}).eval()
    fc1 = model.classifier[1]
    with torch.no_grad():
        fc1.weight.copy_(0.05 * torch.randn(128, 16) @ torch.randn(16, fc1.in_features) / 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    calibration, val = (x[:64], y[:64]), (x[64:], y[64:])
    table = measure(model, "prune_l1", calibration, val, (0.25, 0.5, 0.75, 0.9), (0.5, 0.25, 0.125, 0.0625))
    return model, calibration, val, table


def test_a_two_constraint_budget_with_ranks_is_met_by_measurement_on_basenet(low_rank_basenet):
    model, calibration, val, table = low_rank_basenet
    assert table.layers["classifier.1"]["ranks"] == [[64], [32], [16], [8]]
    assert table.rank_loss("classifier.1")[(16,)] == pytest.approx(0.0, abs=1e-4), "rank 16 is exact"
    request = _request(("params", 0.2), ("latency_ms", 0.5))
    chosen = allocate_widths("prune_l1", request, model, table, calibration, val)
    assert chosen.ranks.get("classifier.1", (0,))[0] in (16, 32, 64), chosen
    built = factorised(
        apply_strategy("prune_l1", copy.deepcopy(model), calibration, widths=chosen.widths),
        chosen.ranks,
        calibration,
    )
    assert sum(p.numel() for p in built.parameters()) <= 0.2 * sum(p.numel() for p in model.parameters())
    found = summary(chosen, request, table, "sensitivity.json")
    params, latency = found["allocated"]["budgets"]
    assert params["met"] and params["predicted"] == chosen.cost["params"] <= 0.2
    assert latency["met"] and latency["measured"] <= 0.5 * (1 + LATENCY_NOISE), chosen.latency
    assert found["ranks"] == {n: list(r) for n, r in chosen.ranks.items()}
    assert set(found["sensitivity"]["rank_loss"]) == set(table.layers)


# --- the composed step through the pipeline -------------------------------------------------------


def _cell(text: str) -> tuple[dict[str, int], dict[str, list[int]]]:
    """A ``widths`` cell read back: kept channels by group, ranks by factorised layer."""
    widths, ranks = {}, {}
    for item in text.split():
        name, value = item.split("=")
        kept, _, rank = value.partition("r")
        widths |= {name: int(kept)} if kept else {}
        ranks |= {name: [int(r) for r in rank.split("x")]} if rank else {}
    return widths, ranks


@pytest.mark.slow
def test_prune_then_factorise_then_fine_tune_and_the_record_and_table_say_both(trained_layout, tmp_path):
    from shrinkflow.tasks.io import save_checkpoint
    from shrinkflow.tasks.pipeline.stages import Context, run_candidate
    from shrinkflow.tasks.store.tracking import Tracker

    params = parse_params(
        small_raw(
            "shrink.candidates={c: {strategy: prune_l1, ratio: 0.5, lr: 0.01, epochs: 1,"
            " lowrank: {ratio: 0.5}}}",
            "shrink.ladder={epochs: 1, rungs: {rung-10: {params: 0.1}}}",
        )
    )
    layout = trained_layout
    (path,) = sensitivity_stage(params, layout)
    stored = json.loads(path.read_text())
    assert stored["key"]["rank_shares"] == [0.5, 0.25, 0.125, 0.0625] and stored["table"]["layers"]
    composed = shrink_candidate(params, layout, "c")
    ctx = Context(params, layout, Tracker.for_project(layout.root, "joint-test"))
    tracked = run_candidate(ctx, "rung-10")
    rung = tracked.record
    assert composed.steps == ["prune_l1", "lowrank"] and rung.steps == ["prune_l1", "lowrank", "distill"]
    for record in (composed, rung):
        model, _ = load_checkpoint(layout.root / record.checkpoint, sha256=record.sha256)
        layers = low_rank_layers(model)
        assert layers and record.options["ranks"] == {n: list(m.ranks) for n, m in layers.items()}
        assert record.epochs == 1 and model_spec(model)["factorised"] == [
            m.record(n) for n, m in layers.items()
        ]
        again = tmp_path / f"{record.name}.pt"
        rebuilt, _ = load_checkpoint(again, sha256=save_checkpoint(model, again))
        x = torch.randn(16, 1, 8, 8)
        assert torch.equal(rebuilt(x), model(x)), "the fine-tuned, pruned and factorised network rebuilds"
    assert composed.options["lowrank"] == {"ratio": 0.5} and rung.options["lowrank"] == {"allocate": True}
    assert rung.options["allocated"]["cost"]["params"] <= 0.1
    logged = ctx.tracker.run(tracked.run_id).data.params
    assert json.loads(logged["ranks"].replace("'", '"')) == rung.options["ranks"]
    evaluate_models(params, layout)
    table = load_table(layout.candidates_csv).set_index("name")
    assert table.loc["rung-10", "composition"] == "prune_l1+lowrank+distill"
    baseline, _ = load_checkpoint(
        layout.root / json.loads(layout.record("baseline").read_text())["checkpoint"]
    )
    halves = {g: n // 2 for g, n in prunable_groups(baseline, torch.zeros(1, 1, 8, 8)).items()}
    for record, widths in ((composed, halves), (rung, rung.options["widths"])):
        assert _cell(table.loc[record.name, "widths"]) == (widths, record.options["ranks"])
