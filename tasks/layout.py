"""Every path a stage reads or writes: directories from ``params.paths`` and file names from
:class:`Files`, the one place either is spelled (``dvc.yaml`` is generated from both, see
:mod:`shrinkflow.tasks.stage_specs`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shrinkflow.tasks.config import ConfigError, Params

SPLITS = ("train", "val", "gate", "test")


class Files:
    """File names inside the ``paths`` directories."""

    MANIFEST = "manifest.json"  # in paths.prepared, beside <split>-images.npy and <split>-labels.npy
    CHECKPOINT = "model.pt"  # in paths.baseline and in paths.candidates/<name>
    RECORD = "record.json"
    CANDIDATES = "candidates.csv"  # in paths.reports
    PREDICTIONS = "predictions.csv"
    CURVES = "curves"
    METRICS = "metrics.json"
    PARETO = "pareto.png"
    REPORT = "report.md"
    PROMOTION = "promotion.json"
    ONNX = "onnx"  # in paths.reports: <model>.onnx, each checked against its checkpoint
    SENSITIVITY_INDEX = "tables.json"  # in paths.sensitivity, beside sensitivity-<strategy>.json/png
    TRIALS = "trials"  # in paths.candidates/<name>: a search's trials, <ratio>/model.pt and record.json


@dataclass(frozen=True)
class Layout:
    root: Path
    prepared: Path
    baseline: Path
    sensitivity: Path
    candidates: Path
    reports: Path

    @classmethod
    def from_params(cls, params: Params, root: str | Path = ".") -> Layout:
        root = Path(root).resolve()
        p = params.paths
        layout = cls(
            root=root,
            prepared=root / p.prepared,
            baseline=root / p.baseline,
            sensitivity=root / p.sensitivity,
            candidates=root / p.candidates,
            reports=root / p.reports,
        )
        if not p.outside_project:
            layout.check_inside()
        return layout

    def check_inside(self) -> None:
        """Refuse an output directory that a symlink takes outside the project (the config
        already refuses absolute and ``..`` paths)."""
        for key in ("prepared", "baseline", "sensitivity", "candidates", "reports"):
            path = getattr(self, key)
            if not path.resolve().is_relative_to(self.root):
                raise ConfigError(
                    f"paths.{key}: {path} resolves to {path.resolve()}, outside the project {self.root}; "
                    "set paths.outside_project: true to write there"
                )

    def images(self, split: str) -> Path:
        """A split's uint8 pixels, ``N x C x H x W`` in one ``.npy`` file that stages memory-map."""
        return self.prepared / f"{split}-images.npy"

    def labels(self, split: str) -> Path:
        """A split's int64 class indices, ``.npy``."""
        return self.prepared / f"{split}-labels.npy"

    @property
    def manifest(self) -> Path:
        return self.prepared / Files.MANIFEST

    def sensitivity_table(self, strategy: str) -> Path:
        """The measured sensitivity table a budget candidate of ``strategy`` allocates from (a
        plot of it beside, ``.png``)."""
        return self.sensitivity / f"sensitivity-{strategy}.json"

    @property
    def sensitivity_index(self) -> Path:
        """Which tables the sensitivity stage measured, and for what (written even when none)."""
        return self.sensitivity / Files.SENSITIVITY_INDEX

    def model_dir(self, name: str) -> Path:
        """Directory of the baseline (``name == "baseline"``) or of one candidate."""
        return self.baseline if name == "baseline" else self.candidates / name

    def checkpoint(self, name: str) -> Path:
        return self.model_dir(name) / Files.CHECKPOINT

    def record(self, name: str) -> Path:
        return self.model_dir(name) / Files.RECORD

    def trials(self, name: str) -> Path:
        """Where candidate ``name``'s search keeps its trials, one folder per ratio tried."""
        return self.candidates / name / Files.TRIALS

    def trial_dir(self, name: str, ratio: float) -> Path:
        return self.trials(name) / repr(float(ratio))

    def trial_checkpoint(self, name: str, ratio: float) -> Path:
        return self.trial_dir(name, ratio) / Files.CHECKPOINT

    def trial_record(self, name: str, ratio: float) -> Path:
        """The trial's record: the candidate's, were this trial kept, listing this trial alone."""
        return self.trial_dir(name, ratio) / Files.RECORD

    @property
    def candidates_csv(self) -> Path:
        return self.reports / Files.CANDIDATES

    @property
    def predictions_csv(self) -> Path:
        """Every model's predicted class for every val, gate and test image (paired outcomes)."""
        return self.reports / Files.PREDICTIONS

    def onnx(self, name: str) -> Path:
        """The model's ONNX export that evaluate checked against PyTorch (absent: it failed)."""
        return self.reports / Files.ONNX / f"{name}.onnx"

    @property
    def curves(self) -> Path:
        """One ``<model>.csv`` of per-epoch training history per model (``dvc plots`` data)."""
        return self.reports / Files.CURVES

    @property
    def runs(self) -> Path:
        """TensorBoard event files (``tracking.tensorboard``): ``tensorboard --logdir runs``."""
        return self.root / "runs"

    @property
    def metrics_json(self) -> Path:
        return self.reports / Files.METRICS

    @property
    def pareto_png(self) -> Path:
        return self.reports / Files.PARETO

    @property
    def report_md(self) -> Path:
        return self.reports / Files.REPORT

    @property
    def promotion_json(self) -> Path:
        return self.reports / Files.PROMOTION
