"""The targets a benchmark run is read against, by setup (reported, never asserted): each a line
with the figures it was judged on, and whether it passed. #31 set the CIFAR-10 BaseNet targets: a
promoted model >= 10x fewer params and >= 4x lower batch-1 latency, certified within 1.0 point
with a test drop <= 1.0; >= +1.0 point over torch-pruning uniform and global at the params of
the model promoted by params and of the model promoted by latency; the whole run <= 90 minutes;
orchestration overhead <= 1.10. The others are kept from 2026-12-01 where their figure is
still measured."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.figures import Contender, Figures, peer_name

Target = tuple[str, bool]


def _certified(figures: Figures, objective: str) -> tuple[dict, bool]:
    """The promoted model's pipeline row, and whether the gate certified it (not the baseline)."""
    winner = figures.decisions[objective]["winner"]
    row = next(r for r in figures.candidates if r["name"] == winner)
    return row, winner != "baseline" and winner in figures.decisions[objective]["eligible"]


def smaller_and_faster(figures: Figures, params_x: float, latency_x: float) -> Target:
    """Some promoted model is ``params_x`` smaller and ``latency_x`` faster than the baseline,
    certified within the tolerance, with a test drop within it too."""
    base, tol = figures.contender("baseline"), figures.config["tolerance"]
    parts, passed = [], False
    for objective in figures.decisions:
        won, (row, certified) = figures.winner(objective), _certified(figures, objective)
        fewer, faster = base.params / won.params, base.latency_ms / won.latency_ms
        drop = base.test_acc - won.test_acc
        ok = fewer >= params_x and faster >= latency_x and drop <= tol and certified
        passed |= ok
        verdict = "certified" if certified else "not certified"
        parts.append(
            f"{row['name']} ({objective}): {fewer:.2f}x params, {faster:.2f}x latency, test drop "
            f"{drop:+.2f}, gate bound {row['gate_lower']:+.2f} ({verdict})"
        )
    line = (
        f"a promoted model >= {params_x:g}x fewer params and >= {latency_x:g}x lower batch-1 latency, "
        f"certified within {tol:g} point(s), test drop <= {tol:g}: {'; '.join(parts)}"
    )
    return line, passed


def over_peers(
    figures: Figures, objective: str, measure: str, kinds: tuple[str, ...], points: float
) -> Target:
    """The model promoted by ``objective`` at least ``points`` test points above each torch-pruning
    peer of ``kinds`` at its ``measure``."""
    won = figures.winner(objective)
    winner = figures.decisions[objective]["winner"]
    peers = [_peer(figures, kind, measure, winner) for kind in kinds]
    shown = " and ".join(
        f"{p.test_acc:.2f} ({kind}, {p.params:,} params)" if p else f"- ({kind}: no peer)"
        for kind, p in zip(kinds, peers, strict=True)
    )
    passed = all(p is not None and won.test_acc >= p.test_acc + points for p in peers)
    line = (
        f"promoted by {objective} ({winner}) >= {points:+.1f} point(s) over torch-pruning "
        f"{' and '.join(kinds)} at its {measure} ({won.params:,} params, {won.flops:,} FLOPs): "
        f"{won.test_acc:.2f} vs {shown}"
    )
    return line, passed


def _peer(figures: Figures, kind: str, measure: str, winner: str) -> Contender | None:
    name = peer_name(kind, measure, winner)
    return next((c for c in figures.contenders if c.name == name), None)


def beats_adjusted(figures: Figures, objective: str) -> Target:
    won, seed = figures.winner(objective), figures.contender("seed: AdjustedNet")
    ok = won.params < seed.params and won.latency_ms < seed.latency_ms and won.test_acc >= seed.test_acc
    return (
        f"promoted by {objective} smaller and faster at batch 1 than the seed's AdjustedNet at equal or "
        f"better accuracy ({won.params:,} vs {seed.params:,} params, {won.latency_ms:.3f} vs "
        f"{seed.latency_ms:.3f} ms, {won.test_acc:.2f} vs {seed.test_acc:.2f})",
        ok,
    )


def within_minutes(figures: Figures, minutes: float) -> Target:
    took = figures.wall_seconds / 60
    return f"the whole benchmark <= {minutes:g} minutes: {took:.1f}", took <= minutes


def efficiency_targets(figures: Figures) -> list[Target]:
    """The efficiency targets of the figures this run measured."""
    eff, out = figures.efficiency, []
    if "overhead" in eff:
        ratio = eff["overhead"]["ratio"]
        out.append((f"orchestration overhead <= 1.10: {ratio:.3f}", ratio <= 1.10))
    if "throughput" in eff:
        t = eff["throughput"]
        out.append(
            (
                f"training throughput, whole epoch with validation, pipeline ({t['precision']}) vs fp32 "
                f"bare loop >= 1.8x: {t['ratio']:.2f}x (vs the same-precision bare loop: "
                f"{t['ratio_same_precision']:.3f}, target >= 0.9)",
                t["ratio"] >= 1.8 and t["ratio_same_precision"] >= 0.9,
            )
        )
    if "speedup" in eff:
        s = eff["speedup"]
        out.append(
            (
                f"fan-out scaling, 2 single-thread workers vs 1 >= 1.8x, best runner ({s['best_runner']}): "
                f"{s['speedup']:.2f}x",
                s["speedup"] >= 1.8,
            )
        )
    return out


def basenet_targets(figures: Figures, minutes: float) -> list[Target]:
    """#31's targets on CIFAR-10 BaseNet, and those of 2026-12-01 it did not replace."""
    base = figures.contender("baseline")
    return [
        (f"seed BaseNet baseline >= 78% test: {base.test_acc:.2f}%", base.test_acc >= 78),
        smaller_and_faster(figures, 10, 4),
        over_peers(figures, "params", "params", ("uniform", "global"), 1.0),
        over_peers(figures, "latency_ms", "params", ("uniform", "global"), 1.0),
        over_peers(figures, "latency_ms", "FLOPs", ("uniform",), 0.0),
        beats_adjusted(figures, "latency_ms"),
        within_minutes(figures, minutes),
        *efficiency_targets(figures),
    ]


def conv_targets(figures: Figures, minutes: float) -> list[Target]:
    """A network whose parameters sit in convolutions (#31: ResNet-56): the FLOPs and latency
    reduction of the model promoted by FLOPs at <= the tolerance, against torch-pruning at the
    same FLOPs."""
    base, won = figures.contender("baseline"), figures.winner("flops")
    row, certified = _certified(figures, "flops")
    drop, tol = base.test_acc - won.test_acc, figures.config["tolerance"]
    return [
        (
            f"promoted by FLOPs ({row['name']}): {base.flops / won.flops:.2f}x fewer FLOPs, "
            f"{base.latency_ms / won.latency_ms:.2f}x lower batch-1 latency, test drop {drop:+.2f} "
            f"(<= {tol:g}), gate bound {row['gate_lower']:+.2f} "
            f"({'certified' if certified else 'not certified'})",
            certified and drop <= tol and won.flops < base.flops,
        ),
        over_peers(figures, "flops", "FLOPs", ("uniform", "global"), 0.0),
        within_minutes(figures, minutes),
        *efficiency_targets(figures),
    ]


TARGETS: dict[str, Callable[[Figures, float], list[Target]]] = {
    "basenet": basenet_targets,
    "conv": conv_targets,
}
