"""What a compression benchmark run measured, as plain records: every contender, every model of the
pipeline run, the promotion decisions and the efficiency figures (``Figures``, written to the run's
JSON), and the flat list of named figures that two runs are compared by (:func:`named_figures`,
read from a run's JSON, this run's or an older one's)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import binomtest


@dataclass
class Contender:
    """One model of the comparison table and its measured figures."""

    name: str
    how: str
    test_acc: float
    test_low: float  # 95% Wilson interval of the test accuracy (percent)
    test_high: float
    params: int
    flops: int
    size_bytes: int
    latency_ms: float  # batch 1, median, one CPU thread
    throughput: float  # images/s at batch 64 (median batch time), one CPU thread


@dataclass(frozen=True)
class Gap:
    """A promoted model against one torch-pruning peer, paired on the same test images: the
    difference in test points and its two-sided 95% interval."""

    objective: str  # the objective that promoted the model
    winner: str
    peer: str  # the peer's contender name
    delta: float  # winner's test accuracy minus the peer's, points
    low: float
    high: float


@dataclass
class Figures:
    """Everything one benchmark run measured, as written to the JSON file."""

    setup: str
    machine: dict
    config: dict
    contenders: list[Contender] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    decisions: dict = field(default_factory=dict)  # objective -> winner, reason, eligible
    gaps: list[Gap] = field(default_factory=list)
    efficiency: dict = field(default_factory=dict)
    wall_seconds: float = 0.0

    def contender(self, prefix: str) -> Contender:
        return next(c for c in self.contenders if c.name.startswith(prefix))

    def winner(self, objective: str) -> Contender:
        """The contender row of the model promoted by ``objective``."""
        return self.contender(promoted_name(objective, self.decisions[objective]["winner"]))


def promoted_name(objective: str, winner: str) -> str:
    return f"shrinkflow ({objective}): {winner}"


def peer_name(kind: str, measure: str, winner: str) -> str:
    """``torch-pruning uniform, params of l1-50-kd``: the peer pruned to the ``measure`` (params
    or FLOPs) of a promoted model (one peer however many objectives promoted it)."""
    return f"torch-pruning {kind}, {measure} of {winner}"


def wilson(acc: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval, in percent, of an accuracy of ``acc`` percent on ``n`` images."""
    interval = binomtest(round(acc * n / 100), n).proportion_ci(0.95, method="wilson")
    return 100 * interval.low, 100 * interval.high


# --- figures by name, for one run beside another --------------------------------------------

# Contenders by role: the names a role's row has had, newest first (2026-12-01 named the peers at
# the latency winner's params "same params").
ROLES = {
    "baseline": ("baseline",),
    "AdjustedNet (width-50)": ("seed: AdjustedNet",),
}


PEER_KINDS = (("uniform", "params"), ("global", "params"), ("uniform", "FLOPs"), ("global", "FLOPs"))
# The peers at the latency winner's size as 2026-12-01 named them.
OLD_PEERS = {
    ("uniform", "params"): "torch-pruning uniform, same params",
    ("global", "params"): "torch-pruning global, same params",
    ("uniform", "FLOPs"): "torch-pruning same FLOPs",
}


def _find(rows: list[dict], *names: str) -> dict | None:
    return next((r for name in names for r in rows if r["name"] == name), None)


def _peer(rows: list[dict], kind: str, measure: str, objective: str, winner: str) -> dict | None:
    """The peer of ``kind`` at the ``measure`` of ``objective``'s winner, by this run's name or,
    for the latency winner, 2026-12-01's."""
    old = (OLD_PEERS[kind, measure],) if objective == "latency_ms" and (kind, measure) in OLD_PEERS else ()
    return _find(rows, peer_name(kind, measure, winner), *old)


def _model_figures(prefix: str, row: dict | None, base: dict) -> dict[str, Any]:
    if row is None:
        return {}
    return {
        f"{prefix}: test acc %": row["test_acc"],
        f"{prefix}: test drop (pts)": base["test_acc"] - row["test_acc"],
        f"{prefix}: params x fewer": base["params"] / row["params"],
        f"{prefix}: FLOPs x fewer": base["flops"] / row["flops"],
        f"{prefix}: latency b1 x lower": base["latency_ms"] / row["latency_ms"],
    }


def _winner_figures(raw: dict, objective: str, base: dict) -> dict[str, Any]:
    decision = raw["decisions"].get(objective)
    if not decision:
        return {}
    winner, rows = decision["winner"], raw["contenders"]
    row = _find(rows, promoted_name(objective, winner))
    label = f"promoted by {objective}"
    gate = next((c for c in raw["candidates"] if c["name"] == winner), {})
    out = {f"{label}: model": winner, **_model_figures(label, row, base)}
    out[f"{label}: gate 95% lower bound"] = gate.get("gate_lower")
    for kind, measure in PEER_KINDS:
        peer = _peer(rows, kind, measure, objective, winner)
        if row is not None and peer is not None:
            out[f"{label}: gap to torch-pruning {kind} at its {measure} (pts)"] = (
                row["test_acc"] - peer["test_acc"]
            )
    return out


def _candidate_figures(raw: dict, shared: set[str]) -> dict[str, Any]:
    """The pipeline's own figures of each candidate in ``shared`` (trained in both runs)."""
    out: dict[str, Any] = {}
    for row in raw["candidates"]:
        if row["name"] in shared:
            out[f"candidate {row['name']}: test acc %"] = row["test_acc"]
            out[f"candidate {row['name']}: gate 95% lower bound"] = row["gate_lower"]
    return out


def _efficiency_figures(eff: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "overhead" in eff:
        over = eff["overhead"]
        out["orchestration overhead"] = over["ratio"]
        out["flow wall (s)"] = over["flow_s"]
        out |= {f"stage work: {k} (s)": v for k, v in over["work_s"].items()}
    if "speedup" in eff:
        for runner, r in eff["speedup"]["runners"].items():
            out[f"fan-out scaling, {runner} runner"] = r["speedup"]
    if "throughput" in eff:
        out["training throughput, engine / fp32 bare loop"] = eff["throughput"]["ratio"]
        out["training throughput, engine / same-precision bare loop"] = eff["throughput"][
            "ratio_same_precision"
        ]
    if "dvc" in eff:
        out["dvc repro, nothing changed (s)"] = eff["dvc"]["nothing_changed_s"]
    return out


def named_figures(raw: dict, shared: set[str] = frozenset()) -> dict[str, Any]:
    """Every figure of a run's JSON by a name that means the same in any run (this benchmark's
    JSON of any date since 2026-12-01): the baseline, the seed's AdjustedNet, the promoted models
    with their gaps to torch-pruning, the candidates in ``shared``, the efficiency figures and the
    whole run's minutes."""
    rows = raw["contenders"]
    base = _find(rows, "baseline")
    out: dict[str, Any] = {
        "baseline: test acc %": base["test_acc"],
        "baseline: params": base["params"],
        "baseline: latency b1 (ms)": base["latency_ms"],
    }
    for role, prefixes in ROLES.items():
        if role != "baseline":
            out |= _model_figures(role, _find(rows, *prefixes), base)
    for objective in raw["decisions"]:
        out |= _winner_figures(raw, objective, base)
    out |= _candidate_figures(raw, set(shared))
    out |= _efficiency_figures(raw.get("efficiency", {}))
    out["whole benchmark (min)"] = raw["wall_seconds"] / 60
    return out


def beside(now_raw: dict, before_raw: dict) -> list[tuple[str, Any, Any]]:
    """Every figure of two runs' JSON by name, this run's order first (None where a run has no
    such figure); candidates only where both runs trained one of that name."""
    shared = {r["name"] for r in now_raw["candidates"]} & {r["name"] for r in before_raw["candidates"]}
    now, before = named_figures(now_raw, shared), named_figures(before_raw, shared)
    names = list(now) + [n for n in before if n not in now]
    return [(n, now.get(n), before.get(n)) for n in names]


def shown(value: Any) -> str:
    """A figure as a table cell: counts with separators, small figures (ratios, milliseconds) to
    three decimals, larger ones to two."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.2f}"


def change(now: Any, before: Any) -> str:
    """``now - before`` for two numeric figures, else ``-``."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (now, before))
    if not numbers or any(math.isnan(v) for v in (now, before)):
        return "-"
    return f"{now - before:+,}" if isinstance(now - before, int) else f"{now - before:+,.3f}"
