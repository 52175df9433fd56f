"""The budget ladder (issue #31 item 4): rungs of budgets that become candidates with nothing else
to write, in the config, in DVC's stages and in the order the fixed-sequence gate tests them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from shrinkflow.tasks.config import ConfigError, LadderConfig, PromoteConfig, load_params, parse_params
from shrinkflow.tasks.decision.decide import decide
from shrinkflow.tasks.stage_specs import LADDER_KEYS, dvc_yaml
from tests.conftest import REPO, small_raw

LADDER = (
    "shrink.ladder={strategy: prune_taylor, lr: 0.02, epochs: 3, distill: {alpha: 0.5},"
    " rungs: {half: {params: 0.5, latency_ms: 0.8}, tenth: {flops: 0.1}}}"
)


def test_the_rungs_of_a_params_file_are_candidates_by_their_names(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(small_raw(LADDER), sort_keys=False))
    params = load_params(path)
    assert list(params.shrink.candidates) == ["w50", "l1-50", "half", "tenth"], "declared first, then rungs"
    half, tenth = params.shrink.candidates["half"], params.shrink.candidates["tenth"]
    assert [(b.objective, b.keep) for b in half.budgets] == [("params", 0.5), ("latency_ms", 0.8)]
    assert [(b.objective, b.keep) for b in tenth.budgets] == [("flops", 0.1)]
    for rung in (half, tenth):
        assert rung.strategy == "prune_taylor" and rung.allocation == "sensitivity"
        assert rung.lr == 0.02 and rung.epochs == 3 and rung.distill.alpha == 0.5
        assert rung.allocates_ranks and rung.composition() == "prune_taylor+lowrank+distill"
    assert params.shrink.sensitivity_tables() == {"prune_taylor": (0.25, 0.5, 0.75, 0.9)}
    assert params.shrink.ranked_tables() == {"prune_taylor"}
    plain = parse_params(small_raw(LADDER, "shrink.ladder.lowrank=false", "shrink.ladder.distill=null"))
    assert plain.composition("half") == "prune_taylor" and not plain.shrink.ranked_tables()


def test_the_default_params_run_the_ladder_beside_the_declared_candidates():
    params = load_params(REPO / "params.yaml")
    rungs = list(params.shrink.ladder.rungs)
    assert rungs and set(rungs) <= set(params.shrink.candidates)
    keeps = [params.shrink.candidates[r].budgets[0] for r in rungs]
    assert all(b.objective == "params" for b in keeps)
    assert [b.keep for b in keeps] == sorted((b.keep for b in keeps), reverse=True)
    for name in rungs:
        assert params.composition(name) == "prune_l1+lowrank+distill"
        assert {b.objective for b in params.shrink.candidates[name].budgets} == {"params", "latency_ms"}
    assert len(params.shrink.candidates) > len(rungs), "explicit candidates beside the ladder"
    assert set(params.shrink.ranked_tables()) == {"prune_l1"}


def test_the_fixed_sequence_tests_the_rungs_largest_first():
    params = load_params(REPO / "params.yaml")
    rungs = {n: params.shrink.candidates[n].budgets[0].keep for n in reversed(params.shrink.ladder.rungs)}
    labels = np.arange(540) % 10  # the default digits gate, every image right
    table = pd.DataFrame(
        {
            "name": ["baseline", *rungs],
            "strategy": ["baseline", *["prune_l1"] * len(rungs)],
            "ratio": [0.0, *(1 - keep for keep in rungs.values())],
            "status": "ok",
            "params": [10_000, *(round(10_000 * keep) for keep in rungs.values())],
            "val_acc": [99.0, *np.linspace(98.0, 99.0, len(rungs))],  # smaller rungs validate worse
            "gate_acc": 100.0,
            "test_acc": 100.0,
            "latency_ms": 1.0,
            "worst_class_drop": 0.0,
        }
    )
    perfect = pd.DataFrame({"label": labels, **{name: labels for name in table["name"]}})
    verdict = decide(table, {"gate": perfect, "test": perfect}, PromoteConfig())
    assert list(verdict.order) == sorted(rungs, key=rungs.get, reverse=True)
    assert len(verdict.order) == len(rungs)
    assert verdict.winner == verdict.order[-1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "shrink.ladder.rungs={a: {params: 1.5}}",
            r"shrink.ladder.rungs.a.params: Input should be less than 1",
        ),
        (
            "shrink.ladder.rungs={a: {params: 0}}",
            r"shrink.ladder.rungs.a.params: Input should be greater than 0",
        ),
        (
            "shrink.ladder.rungs={a: {energy: 0.5}}",
            r"shrink.ladder.rungs.a.energy.\[key\]: Input should be 'params'",
        ),
        ("shrink.ladder.rungs={a: {}}", r"shrink.ladder.rungs.a: Dictionary should have at least 1 item"),
        ("shrink.ladder.rungs={a: 0.5}", r"shrink.ladder.rungs.a: Input should be a valid dictionary"),
        (
            "shrink.ladder.rungs={w50: {params: 0.5}}",
            "ladder rung 'w50' has the name of a declared candidate",
        ),
        ("shrink.ladder.rungs={a.b: {params: 0.5}}", "candidate name 'a.b' must be letters, digits"),
        ("shrink.ladder.rungs={baseline: {params: 0.5}}", "candidate name 'baseline' must be"),
        ("shrink.ladder.strategy=width", r"shrink.ladder.strategy: Input should be 'prune_fpgm', 'prune_l1'"),
        ("shrink.ladder.strategy=lowrank", "shrink.ladder.strategy: Input should be"),
        ("shrink.ladder.lr=0", "shrink.ladder.lr: Input should be greater than 0"),
        ("shrink.ladder.epochs=0", "shrink.ladder.epochs: Input should be greater than or equal to 1"),
        ("shrink.ladder.lowrank=sometimes", "shrink.ladder.lowrank: Input should be a valid boolean"),
        (
            "shrink.ladder.distill={alpha: 2}",
            "shrink.ladder.distill.alpha: Input should be less than or equal",
        ),
        ("shrink.ladder.ranks=4", "unknown key 'shrink.ladder.ranks'"),
        ("shrink.ladder={strategy: prune_l1}", "missing key 'shrink.ladder.rungs'"),
        ("shrink.ladder=[0.5, 0.25]", "shrink.ladder: Input should be a valid dictionary"),
    ],
)
def test_a_bad_ladder_key_is_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_params(small_raw(override))
    assert "\n" not in str(info.value)


def test_a_ladder_alone_is_enough_and_no_rung_no_candidate_is_refused():
    alone = parse_params(small_raw("shrink.candidates={}", "shrink.ladder.rungs={r: {params: 0.3}}"))
    assert list(alone.shrink.candidates) == ["r"]
    with pytest.raises(ConfigError, match="declare at least one candidate or a shrink.ladder rung"):
        parse_params(small_raw("shrink.candidates={}"))


def test_dvc_runs_each_rung_as_a_shrink_stage_reading_the_keys_the_ladder_has(tmp_path):
    assert set(LADDER_KEYS) == set(LadderConfig.model_fields) - {"rungs"}
    stages = yaml.safe_load(dvc_yaml())["stages"]
    rung, shrink = stages["ladder"], stages["shrink"]
    assert rung["foreach"] == "${shrink.ladder.rungs}" and rung["do"]["cmd"] == shrink["do"]["cmd"]
    assert rung["do"]["outs"] == shrink["do"]["outs"] and rung["do"]["deps"] == shrink["do"]["deps"]
    assert "shrink.ladder.rungs.${key}" in rung["do"]["params"]
    assert not any(p.startswith("shrink.candidates") for p in rung["do"]["params"])
    assert (
        "shrink.ladder" in stages["sensitivity"]["params"] and "shrink.ladder" in stages["evaluate"]["params"]
    )
    # A project whose params have no ladder gets no ladder stage (DVC cannot iterate a missing key).
    raw = small_raw()
    del raw["shrink"]["ladder"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    elsewhere = yaml.safe_load(dvc_yaml(tmp_path / "params.yaml"))["stages"]
    assert "ladder" not in elsewhere and "shrink.ladder" not in elsewhere["evaluate"]["params"]
