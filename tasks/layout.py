"""Every path a stage reads or writes, derived from ``params.paths`` (which ``dvc.yaml`` also
interpolates), so file names are declared in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.config import Params

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    root: Path
    prepared: Path
    baseline: Path
    candidates: Path
    reports: Path

    @classmethod
    def from_params(cls, params: Params, root: str | Path = ".") -> Layout:
        root = Path(root).resolve()
        p = params.paths
        return cls(
            root=root,
            prepared=root / p.prepared,
            baseline=root / p.baseline,
            candidates=root / p.candidates,
            reports=root / p.reports,
        )

    def split(self, name: str) -> Path:
        return self.prepared / f"{name}.pt"

    @property
    def manifest(self) -> Path:
        return self.prepared / "manifest.json"

    def model_dir(self, name: str) -> Path:
        """Directory of the baseline (``name == "baseline"``) or of one candidate."""
        return self.baseline if name == "baseline" else self.candidates / name

    def checkpoint(self, name: str) -> Path:
        return self.model_dir(name) / "model.pt"

    def record(self, name: str) -> Path:
        return self.model_dir(name) / "record.json"

    @property
    def candidates_csv(self) -> Path:
        return self.reports / "candidates.csv"

    @property
    def curves(self) -> Path:
        """One ``<model>.csv`` of per-epoch training history per model (``dvc plots`` data)."""
        return self.reports / "curves"

    @property
    def runs(self) -> Path:
        """TensorBoard event files (``tracking.tensorboard``): ``tensorboard --logdir runs``."""
        return self.root / "runs"

    @property
    def metrics_json(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def pareto_png(self) -> Path:
        return self.reports / "pareto.png"

    @property
    def report_md(self) -> Path:
        return self.reports / "report.md"

    @property
    def promotion_json(self) -> Path:
        return self.reports / "promotion.json"
